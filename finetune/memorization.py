"""Spans of generated samples that appear word for word in a training corpus of any size.

The samples are small (kilobytes) and the corpus may be hundreds of MB, so the index is of the
samples: every K-byte window of every sample (K = 50, the shortest span reported) is hashed with a
polynomial rolling hash mod 2^64 into a sorted array. The corpus is then read once, in blocks; its
K-byte windows are hashed the same way with NumPy (a prefix sum, no Python loop per byte) and
looked up in that array (a 16 M-entry bitmap first, then a binary search for the few that pass).
Memory: the samples' index plus one block's arrays (about 100 MB for 4 MB blocks), whatever the
corpus's size; time: one pass over the corpus. A sample window found at corpus offset p followed
by its next window at p + 1 is one longer span (the same diagonal), so the spans reported are
maximal runs copied from one place. Hash collisions are left unchecked (2^-64 per pair).

Samples are cut at <|startoftext|> / <|endoftext|> first: a span across a text boundary is not
one text copied.
"""
import os
import re
import time

import numpy as np

K = 50  # bytes per window: the shortest span found
BASE = np.uint64(0x100000001B3)  # odd, so it has an inverse mod 2^64
INVERSE = np.uint64(pow(0x100000001B3, -1, 2**64))
BLOCK = 1 << 22  # corpus bytes hashed at a time
BITMAP_BITS = 24
POSITIONS_PER_WINDOW = 64  # corpus places kept per sample window: bounds memory on boilerplate
MARKERS = re.compile(rb"<\|startoftext\|>|<\|endoftext\|>")


def _powers(base, n):
    out = np.empty(n, dtype=np.uint64)
    out[0] = 1
    out[1:] = base
    with np.errstate(over="ignore"):
        return np.cumprod(out, dtype=np.uint64)


_POW = _powers(BASE, BLOCK + K)
_INV = _powers(INVERSE, BLOCK + K)


def window_hashes(data):
    """The hash of every K-byte window of data (bytes, at most BLOCK + K - 1 long):
    h[i] = sum_j data[i + j] * BASE^(K - 1 - j) mod 2^64, via a prefix sum of data[j] * BASE^-j."""
    n = len(data) - K + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    values = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(values) + 1, dtype=np.uint64)
        np.cumsum(values * _INV[:len(values)], dtype=np.uint64, out=prefix[1:])
        return _POW[K - 1:K - 1 + n] * (prefix[K:K + n] - prefix[:n])


class SampleIndex:
    """Every K-byte window of the samples: sorted hashes, with (sample, byte offset) of each."""

    def __init__(self, samples):
        self.samples = [s.encode("utf-8") for s in samples]
        hashes, owners, offsets = [], [], []
        for i, data in enumerate(self.samples):
            for piece in _pieces(data):
                h = window_hashes(data[piece[0]:piece[1]])
                hashes.append(h)
                owners.append(np.full(len(h), i, dtype=np.int64))
                offsets.append(piece[0] + np.arange(len(h), dtype=np.int64))
        hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.owners = np.concatenate(owners)[order] if owners else np.zeros(0, np.int64)
        self.offsets = np.concatenate(offsets)[order] if offsets else np.zeros(0, np.int64)
        self.bitmap = np.zeros(1 << BITMAP_BITS, dtype=bool)
        self.bitmap[(self.hashes & np.uint64((1 << BITMAP_BITS) - 1)).astype(np.int64)] = True
        self.seen = np.zeros(len(self.hashes), dtype=np.int64)

    def lookup(self, hashes, base):
        """(entry, corpus offset) for each window of a block found in the samples; base is the
        block's corpus offset. Keeps at most POSITIONS_PER_WINDOW places per sample window."""
        if not len(self.hashes):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        mask = np.uint64((1 << BITMAP_BITS) - 1)
        candidates = np.flatnonzero(self.bitmap[(hashes & mask).astype(np.int64)])
        found = hashes[candidates]
        left = np.searchsorted(self.hashes, found, "left")
        right = np.searchsorted(self.hashes, found, "right")
        hit = right > left
        candidates, left, counts = candidates[hit], left[hit], (right - left)[hit]
        # one row per (corpus window, sample window with that hash)
        entries = np.repeat(left, counts) + _ranks(counts)
        places = base + np.repeat(candidates, counts)
        order = np.argsort(entries, kind="stable")
        entries, places = entries[order], places[order]
        rank = np.arange(len(entries)) - np.searchsorted(entries, entries, "left")
        keep = rank < POSITIONS_PER_WINDOW - self.seen[entries]
        np.add.at(self.seen, entries[keep], 1)
        return entries[keep], places[keep]


def _ranks(counts):
    """0, 1, ..., c - 1 for each c in counts, concatenated."""
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total) - starts


def _pieces(data):
    """(start, end) of the parts of a sample between text markers."""
    start = 0
    for m in MARKERS.finditer(data):
        yield start, m.start()
        start = m.end()
    yield start, len(data)


def corpus_files(path):
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names if not f.endswith(".npz"))


def find_copies(samples, corpus, min_chars=K, progress=None):
    """For each sample, its spans of at least min_chars characters found word for word in the
    corpus (a file or folder), longest first, as (start, end) byte offsets into the sample's UTF-8;
    and stats: corpus bytes, seconds, the index's bytes."""
    started = time.time()
    index = SampleIndex(samples)
    entries, places = [], []
    base = 0
    total = sum(os.path.getsize(p) for p in corpus_files(corpus))
    for path in corpus_files(corpus):
        with open(path, "rb") as f:
            tail = b""
            while True:
                block = f.read(BLOCK)
                if not block:
                    break
                data = tail + block
                e, p = index.lookup(window_hashes(data), base - len(tail))
                entries.append(e)
                places.append(p)
                tail = data[-(K - 1):]
                base += len(block)
                if progress:
                    progress(len(block), total)
        base += K  # windows never span two files
    entries = np.concatenate(entries) if entries else np.zeros(0, np.int64)
    places = np.concatenate(places) if places else np.zeros(0, np.int64)
    spans = _spans(index, entries, places, min_chars)
    index_bytes = sum(a.nbytes for a in (index.hashes, index.owners, index.offsets, index.bitmap, index.seen))
    return spans, {"corpus_bytes": total, "seconds": time.time() - started, "index_bytes": index_bytes}


def _spans(index, entries, places, min_chars):
    """Maximal runs of consecutive sample windows found at consecutive corpus offsets."""
    owner, offset = index.owners[entries], index.offsets[entries]
    diagonal = places - offset
    order = np.lexsort((offset, diagonal, owner))
    owner, offset, diagonal = owner[order], offset[order], diagonal[order]
    starts_run = np.ones(len(order), dtype=bool)
    starts_run[1:] = ((owner[1:] != owner[:-1]) | (diagonal[1:] != diagonal[:-1])
                      | (offset[1:] != offset[:-1] + 1))
    run_starts = np.flatnonzero(starts_run)
    run_ends = np.append(run_starts[1:], len(order)) - 1
    spans = [[] for _ in index.samples]
    for a, b in zip(run_starts, run_ends):
        sample = int(owner[a])
        start, end = int(offset[a]), int(offset[b]) + K
        if len(index.samples[sample][start:end].decode("utf-8", "ignore")) >= min_chars:
            spans[sample].append((start, end))
    return [_maximal(s) for s in spans]


def _maximal(spans):
    """Distinct spans, longest first, without those inside a longer one."""
    kept = []
    for start, end in sorted(set(spans), key=lambda s: (s[0] - s[1], s[0])):
        if not any(a <= start and end <= b for a, b in kept):
            kept.append((start, end))
    return kept

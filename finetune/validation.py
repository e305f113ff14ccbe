"""Held-out text: which texts of the corpus are kept out of training, and the fixed windows of
them that the validation loss is measured on.

A text is held out when the sha256 of its content (markers and surrounding whitespace stripped)
falls in the lowest `fraction` of the hash range. The choice depends on nothing but the text
itself: a resumed or retried run, a reordered corpus, or one with texts added holds out the same
texts, and copies of a text go the same way (none is trained on while another is held out). The
run folder records the held-out texts' hashes (heldout-sha256.txt), which a resume keeps held out
too, and the windows themselves (val-windows.npy), so the curve compares like with like.
"""
import hashlib
import json
import os
import re

import numpy as np

from finetune import UsageError
from finetune.files import atomic_write_text

DEFAULT_FRACTION = 0.05
MIN_TEXTS = 200  # below this the default is no validation: 5% would be a handful of texts
HASHES_FILE = "heldout-sha256.txt"
WINDOWS_FILE = "val-windows.npy"
INFO_FILE = "validation.json"
BOUNDARY = re.compile(r"(?=<\|startoftext\|>)|(?<=<\|endoftext\|>)")
MARKERS = re.compile(r"<\|startoftext\|>|<\|endoftext\|>")


def split_texts(text):
    """The corpus cut at <|startoftext|> / <|endoftext|> boundaries; joined, the pieces are the corpus."""
    return BOUNDARY.split(text)


def text_hash(piece):
    """sha256 of a text's content, or None for a piece that is only markers and whitespace."""
    content = MARKERS.sub("", piece).strip()
    return hashlib.sha256(content.encode("utf-8")).hexdigest() if content else None


def held_out(digest, fraction):
    return int(digest[:16], 16) < fraction * 2**64


class Split:
    """text: the training text; val_texts: the held-out texts; hashes: theirs (a set); info: what
    validation.json records."""

    def __init__(self, text, val_texts, hashes):
        self.text, self.val_texts, self.hashes, self.info = text, val_texts, hashes, {}


def split_corpus(text, fraction, keep_out=()):
    """Hold out the texts chosen by `fraction`, and any whose hash is in keep_out."""
    keep_out = set(keep_out)
    train, val, hashes = [], [], set()
    for piece in split_texts(text):
        digest = text_hash(piece)
        if digest and (held_out(digest, fraction) or digest in keep_out):
            val.append(piece)
            hashes.add(digest)
        else:
            train.append(piece)
    return Split("".join(train), val, hashes)


def separate(text, val_text):
    """--val-dataset: every text of val_text is held out, and removed from the training text
    where the corpus has it too (text is None for a .npz corpus, which cannot be split)."""
    val = [p for p in split_texts(val_text) if text_hash(p)]
    hashes = {text_hash(p) for p in val}
    train = None if text is None else "".join(p for p in split_texts(text) if text_hash(p) not in hashes)
    return Split(train, val, hashes)


def count_texts(text):
    return sum(1 for piece in split_texts(text) if text_hash(piece))


def windows(tokens, window, max_tokens):
    """At most max_tokens // window windows of `window` tokens, spread evenly over the held-out
    tokens without overlapping; the same tokens give the same windows."""
    n = min(max_tokens // window, len(tokens) // window)
    starts = np.linspace(0, len(tokens) - window, n).astype(np.int64) if n > 1 else np.zeros(n, np.int64)
    return np.stack([tokens[s:s + window] for s in starts]) if n else np.zeros((0, window), np.int32)


# -- the run folder's record ------------------------------------------------------------------------

def recorded_hashes(run_dir):
    path = os.path.join(run_dir, HASHES_FILE)
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        return {line.strip() for line in f if line.strip()}


def recorded_windows(run_dir, window):
    """The windows a run measured before, if they have this window size."""
    path = os.path.join(run_dir, WINDOWS_FILE)
    if not os.path.exists(path):
        return None
    found = np.load(path)
    return found if found.ndim == 2 and found.shape[1] == window else None


def record(run_dir, hashes, val_windows, info):
    atomic_write_text(os.path.join(run_dir, HASHES_FILE), "".join(h + "\n" for h in sorted(hashes)))
    tmp = os.path.join(run_dir, "." + WINDOWS_FILE)
    with open(tmp, "wb") as f:
        np.save(f, val_windows)
    os.replace(tmp, os.path.join(run_dir, WINDOWS_FILE))
    atomic_write_text(os.path.join(run_dir, INFO_FILE), json.dumps(info, indent=1) + "\n")


def read_info(run_dir):
    path = os.path.join(run_dir, INFO_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -- choosing the split -------------------------------------------------------------------------------

def plan(args, text, val_text, enc, window, run_dir):
    """The Split for the parsed command line and the windows to measure, or (None, None) when
    validation is off (a line says why). text is the corpus (None for a .npz one), val_text that
    of --val-dataset. Bad settings raise UsageError."""
    if val_text is not None:
        split = separate(text, val_text)
        source = f"--val-dataset {args.val_dataset}"
    elif text is None:
        print("Validation is off: a .npz dataset cannot be split into texts (give --val-dataset FILE)")
        return None, None
    else:
        fraction = args.val_fraction
        if fraction is None:
            n = count_texts(text)
            if n < MIN_TEXTS:
                print(f"Validation is off: the corpus has {n} texts, fewer than {MIN_TEXTS} to hold some out "
                      "(give --val-fraction F or --val-dataset FILE)")
                return None, None
            fraction = DEFAULT_FRACTION
        elif fraction == 0:
            return None, None
        split = split_corpus(text, fraction, keep_out=recorded_hashes(run_dir))
        source = f"--val-fraction {fraction:g}"
    tokens = np.array([t for piece in split.val_texts for t in enc.encode(piece)], dtype=np.int32)
    if len(tokens) < window:
        message = (f"the held-out part ({source}: {len(split.val_texts)} texts, {len(tokens)} tokens) is too "
                   f"small for one {window}-token window")
        if args.val_fraction is None and not args.val_dataset:  # the default: off, not an error
            print(f"Validation is off: {message} (give a larger --val-fraction or --val-dataset FILE)")
            return None, None
        raise UsageError(f"{message}: give a larger --val-fraction, more text, or a smaller --window")
    if args.val_tokens < window:
        raise UsageError(f"--val-tokens {args.val_tokens} is less than one {window}-token window")
    val_windows = recorded_windows(run_dir, window)
    if val_windows is None or len(val_windows) > args.val_tokens // window:
        val_windows = windows(tokens, window, args.val_tokens)
    split.info = {"source": source, "texts": len(split.val_texts), "tokens": int(len(tokens)),
                  "windows": len(val_windows), "window": window, "hashes": HASHES_FILE}
    print(f"Holding out {len(split.val_texts)} texts ({len(tokens)} tokens, {source}); validation loss over "
          f"{len(val_windows)} windows of {window} tokens")
    return split, val_windows


# -- what the numbers say -----------------------------------------------------------------------------

def verdict(rows):
    """The end-of-run line from loss.csv's rows (step, loss, avg_loss, seconds, val_loss), or None."""
    evaluated = [r for r in rows if r[4] is not None]
    if not evaluated:
        return None
    best = min(evaluated, key=lambda r: r[4])
    last = evaluated[-1]
    if best is last:
        more = "; it was still falling: more steps may help" if len(evaluated) > 1 else ""
        return f"best validation loss {best[4]:.2f} at step {best[0]}, the last evaluation{more}"
    line = f"best validation loss {best[4]:.2f} at step {best[0]}; by step {last[0]} it was {last[4]:.2f}"
    if last[2] < best[2]:
        line += " while training loss kept falling: the later steps overfit"
    return line

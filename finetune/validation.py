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
import sys

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
SHA256 = re.compile(r"[0-9a-f]{64}")
ONE_TEXT = "the corpus is one text (no <|startoftext|> or <|endoftext|> markers to cut it at)"


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
    """Hold out the texts chosen by `fraction`, and any whose hash is in keep_out (the hashes keep
    all of keep_out: a text held out once stays out when a later corpus has it again)."""
    keep_out = set(keep_out)
    train, val, hashes = [], [], set(keep_out)
    for piece in split_texts(text):
        digest = text_hash(piece)
        if digest and (held_out(digest, fraction) or digest in keep_out):
            val.append(piece)
            hashes.add(digest)
        else:
            train.append(piece)
    return Split("".join(train), val, hashes)


def separate(text, val_text, keep_out=()):
    """--val-dataset: every text of val_text is held out, and removed from the training text
    where the corpus has it too, as are those whose hash is in keep_out (text is None for a .npz
    corpus, which cannot be split)."""
    val = [p for p in split_texts(val_text) if text_hash(p)]
    hashes = {text_hash(p) for p in val} | set(keep_out)
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
# A damaged record stops the run before its first step, in one line naming the file and the fix.

FRESH = "or start the run again with --restore-from fresh"


def recorded_hashes(run_dir):
    path = os.path.join(run_dir, HASHES_FILE)
    if not os.path.exists(path):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            hashes = {line.strip() for line in f if line.strip()}
    except UnicodeDecodeError:
        hashes = {""}
    if not all(SHA256.fullmatch(h) for h in hashes):
        raise UsageError(f"{path} is not a list of sha256 hashes: delete it and resume with the same "
                         f"--val-fraction or --val-dataset (they hold out the same texts again), {FRESH}")
    return hashes


def recorded_windows(run_dir, n_vocab, n_ctx, fix="delete it: training measures new windows of the "
                     "held-out texts (earlier validation losses then compare less well)"):
    """The windows a run measured before (checked against the model; maybe none), or None."""
    path = os.path.join(run_dir, WINDOWS_FILE)
    if not os.path.exists(path):
        return None
    try:
        found = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # truncated, not a .npy, an object array
        raise UsageError(f"{path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                         f"{fix}") from None
    if not (isinstance(found, np.ndarray) and found.ndim == 2 and np.issubdtype(found.dtype, np.integer)
            and found.shape[1] >= 2):
        shape = found.shape if isinstance(found, np.ndarray) else type(found).__name__
        raise UsageError(f"{path} does not hold windows of token ids (found {shape}): {fix}")
    if found.shape[1] > n_ctx:
        raise UsageError(f"{path} holds windows of {found.shape[1]} tokens, more than the model's n_ctx "
                         f"{n_ctx}: {fix}")
    if found.size and not 0 <= found.min() <= found.max() < n_vocab:
        raise UsageError(f"{path} holds token ids outside the model's vocabulary (0 to {n_vocab - 1}): {fix}")
    return found


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
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except ValueError:  # not JSON, not UTF-8
        info = None
    if not (isinstance(info, dict) and isinstance(info.get("source", ""), str)):
        raise UsageError(f"{path} is not a JSON object as training writes it: delete it (training writes "
                         f"it again from {HASHES_FILE} and {WINDOWS_FILE}), {FRESH}")
    return info


def recorded_fraction(info):
    """The --val-fraction the record says the run held out with (0 when it used --val-dataset)."""
    match = re.fullmatch(r"--val-fraction (\S+)", (info or {}).get("source", ""))
    try:
        return min(max(float(match.group(1)), 0.0), 0.5) if match else 0.0
    except ValueError:
        return 0.0


# -- choosing the split -------------------------------------------------------------------------------

def plan(args, text, val_text, enc, window, run_dir, hparams):
    """The Split for the parsed command line and the windows to measure (None when validation is
    off; a line says why). text is the corpus (None for a .npz one), val_text that of --val-dataset.

    A run folder that recorded held-out texts (a resume) keeps them out of training, whatever the
    flags, and keeps measuring the windows it recorded (the losses then compare with best.json's):
    without validation flags it measures as it did; --val-fraction 0 turns the measuring off; another
    --val-fraction or --val-dataset holds out its texts too. Bad settings raise UsageError."""
    kept = recorded_hashes(run_dir)
    recorded = recorded_windows(run_dir, hparams.n_vocab, hparams.n_ctx)
    info = read_info(run_dir)
    resumed = bool(kept) or recorded is not None or info is not None
    if val_text is not None:
        split = separate(text, val_text, keep_out=kept)
        source = f"--val-dataset {args.val_dataset}"
        if text is not None and not count_texts(split.text):
            raise UsageError(f"--val-dataset {args.val_dataset} holds every text of the dataset {args.dataset}: "
                             "nothing is left to train on (held-out texts are removed from training)")
    elif args.val_fraction == 0 or (text is None and not resumed):
        if args.val_fraction is None:
            print("Validation is off: a .npz dataset cannot be split into texts (give --val-dataset FILE)")
        if text is None or not kept:
            return None, None
        split = split_corpus(text, 0, keep_out=kept)
        print(f"Validation is off (--val-fraction 0); the {len(kept)} texts this run held out "
              f"({HASHES_FILE}) stay out of training")
        return split, None
    elif resumed and args.val_fraction is None:  # the run's own split, as it was recorded
        source = (info or {}).get("source") or f"the texts {HASHES_FILE} names"
        if text is None:
            print(f"warning: a .npz dataset cannot be split into texts: the {len(kept)} texts this run holds out "
                  f"({HASHES_FILE}) are trained on if it has them", file=sys.stderr)
        split = Split(None, [], kept) if text is None else split_corpus(text, recorded_fraction(info), keep_out=kept)
    else:
        fraction = args.val_fraction
        n = count_texts(text)
        if fraction is None:
            if n < 2:
                print(f"Validation is off: {ONE_TEXT} (give --val-dataset FILE)")
                return None, None
            if n < MIN_TEXTS:
                print(f"Validation is off: the corpus has {n} texts, fewer than {MIN_TEXTS} to hold some out "
                      "(give --val-fraction F or --val-dataset FILE)")
                return None, None
            fraction = DEFAULT_FRACTION
        elif n < 2:
            raise UsageError(f"--val-fraction holds out whole texts, and {ONE_TEXT}: give --val-dataset FILE")
        split = split_corpus(text, fraction, keep_out=kept)
        source = f"--val-fraction {fraction:g}"
    if args.val_tokens < window:
        raise UsageError(f"--val-tokens {args.val_tokens} is less than one {window}-token window")
    if recorded is not None and recorded.shape[1] == window and 0 < len(recorded) <= args.val_tokens // window:
        measured = (info or {}).get("source") or source
        split.info = {**(info or {}), "source": measured, "windows": len(recorded), "window": window,
                      "hashes": HASHES_FILE}
        split.info.setdefault("texts", len(kept))
        split.info.setdefault("tokens", int(recorded.size))
        if measured != source and split.hashes - kept:
            split.info["also_held_out"] = source
            print(f"Measuring the validation loss on the {len(recorded)} windows this run recorded ({measured}), "
                  f"so that it compares with earlier steps; the texts of {source} are held out of training too")
        print(f"Holding out {len(split.hashes)} texts ({source}); validation loss over "
              f"{len(recorded)} windows of {window} tokens ({WINDOWS_FILE})")
        return split, recorded
    tokens = np.array([t for piece in split.val_texts for t in enc.encode(piece)], dtype=np.int32)
    if len(tokens) < window:
        message = (f"the held-out part ({source}: {len(split.val_texts)} texts, {len(tokens)} tokens) is too "
                   f"small for one {window}-token window")
        if args.val_fraction is None and not args.val_dataset and not resumed:  # the default: off, not an error
            print(f"Validation is off: {message} (give a larger --val-fraction or --val-dataset FILE)")
            return None, None
        if resumed and not split.val_texts:
            raise UsageError(f"{message}, and {os.path.join(run_dir, WINDOWS_FILE)} holds no windows of "
                             f"{window} tokens: resume with the validation flags the run had ({source}), {FRESH}")
        raise UsageError(f"{message}: give a larger --val-fraction, more text, or a smaller --window")
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

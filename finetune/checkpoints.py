"""The run folder's checkpoint files: which checkpoints the `checkpoint` file names, their steps,
the best one (best.json), and deleting one. Only base names inside the run folder are read or
deleted: a copied folder never touches the original's files."""
import json
import math
import os
import re

import tensorflow as tf

from finetune import UsageError

BEST_FILE = "best.json"  # the checkpoint with the lowest validation loss (read by export and the server)
SUFFIXES = (".index", ".meta", ".data-00000-of-00001")


def own(run_dir):
    """(latest, all) checkpoint prefixes that RUN_DIR/checkpoint names, each taken by its base name
    inside run_dir and only if its files are there; latest is None when there is none.

    gpt-2-simple's finetune() writes absolute paths for an absolute checkpoint_dir (a Drive folder
    in Colab): followed as written, a copy of the folder would read, and its Saver would delete,
    the original's files."""
    state = tf.train.get_checkpoint_state(run_dir)
    if state is None:
        return None, []

    def here(path):
        prefix = os.path.join(run_dir, os.path.basename(path))
        return prefix if os.path.isfile(prefix + ".index") else None

    latest = here(state.model_checkpoint_path)
    found = [here(p) for p in state.all_model_checkpoint_paths]
    kept = list(dict.fromkeys(p for p in found if p and p != latest))  # oldest first, the latest last
    return latest, (kept + [latest] if latest else kept)


def step(prefix):
    """The step a checkpoint was saved at, from its name (model-1194 -> 1194), as gpt-2-simple
    names them; the counter file is only a copy and may lag behind after a kill mid-save."""
    match = re.search(r"-(\d+)$", prefix)
    if match:
        return int(match.group(1))
    counter = os.path.join(os.path.dirname(prefix), "counter")
    if not os.path.exists(counter):
        return 0
    with open(counter, encoding="utf-8", errors="replace") as f:
        text = f.read().strip() or "0"
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"{counter} holds {text[:20]!r}, not a step number: fix or delete it")
    return int(text)


def read_best(folder):
    """best.json's record ({"checkpoint": a base name, "step", "val_loss"}) if its checkpoint's files
    are in folder, else None. A file training cannot have written raises UsageError (a resume would
    otherwise fail at its first measurement, or delete what it names)."""
    path = os.path.join(folder, BEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            best = json.load(f)
    except ValueError:  # not JSON, not UTF-8
        best = None
    fix = "delete it (the next validation loss measured names the best again) or restore it"
    if not isinstance(best, dict):
        raise UsageError(f"{path} is not a JSON object as training writes it: {fix}")
    name, step, val_loss = best.get("checkpoint"), best.get("step"), best.get("val_loss")
    if not (isinstance(name, str) and type(step) is int and type(val_loss) in (int, float)
            and math.isfinite(val_loss)):
        raise UsageError(f"{path} holds checkpoint {name!r}, step {step!r}, val_loss {val_loss!r}: "
                         f"not a checkpoint name, a step and a finite validation loss; {fix}")
    name = os.path.basename(name)  # only this folder's own files, as for the `checkpoint` file
    if name in ("", ".", "..") or not os.path.isfile(os.path.join(folder, name + ".index")):
        return None
    return {**best, "checkpoint": name}


def delete(folder, name):
    """Delete checkpoint NAME's files in folder (those already gone are no error)."""
    for suffix in SUFFIXES:
        try:
            os.unlink(os.path.join(folder, name + suffix))
        except FileNotFoundError:
            pass

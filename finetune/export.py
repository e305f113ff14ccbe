"""Export a run's best checkpoint as a GGUF file for the server (llama.cpp, no TensorFlow).

    python -m finetune.export checkpoint/run1 [--quant Q8_0]
    python -m finetune.export checkpoint/run1 --format hf   # RUN_DIR/hf for transformers (finetune/hf_export.py)

Writes RUN_DIR/weights/ (model.gguf, manifest.json) into a new folder and renames it into place
only when complete: a failed export never replaces a good one, and no file a running server has
mapped is ever rewritten (the old folder is renamed aside, then deleted). The checkpoint is the one
with the lowest validation loss (RUN_DIR/best.json, written by training) when the run has one, else
the latest. The manifest names it, its step, its validation loss (null when unknown), why it was
chosen, and the sha256 of its .index file: the server compares them with the `checkpoint` and
best.json files to refuse a stale export. Weights that are not finite (a diverged run) are refused.

Imports numpy, tensorflow and gguf only (plus llama_cpp for the K-quants): the Docker build stage
and the training image run it alone.
"""
import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from finetune import text_format
from finetune.gguf_export import DEFAULT_QUANT, QUANTS, write_gguf

GGUF_NAME = "model.gguf"


class ExportError(Exception):
    pass


def latest_checkpoint_name(run_dir):
    """Basename of the latest checkpoint named by RUN_DIR/checkpoint, e.g. 'model-200'."""
    path = os.path.join(run_dir, "checkpoint")
    if not os.path.isfile(path):
        raise ExportError(f"{run_dir} has no 'checkpoint' file: not a gpt-2-simple run folder")
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model_checkpoint_path":
                return os.path.basename(value.strip().strip('"'))
    raise ExportError(f"{path} names no model_checkpoint_path")


def chosen_checkpoint(run_dir, which="best"):
    """(name, step, validation loss or None, why) of the checkpoint to export: the best, else the
    latest; or the latest (which="latest")."""
    latest = latest_checkpoint_name(run_dir)
    step = int(latest.rsplit("-", 1)[1]) if latest.rsplit("-", 1)[-1].isdigit() else None
    if which == "latest":
        return latest, step, logged_val_loss(run_dir, step), "the latest checkpoint (--checkpoint latest)"
    try:
        with open(os.path.join(run_dir, "best.json"), encoding="utf-8") as f:
            best = json.load(f)
        # a base name in this folder, whatever best.json says (as the `checkpoint` file is read)
        name, best_step, val_loss = os.path.basename(best["checkpoint"]), int(best["step"]), float(best["val_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return latest, step, None, "the latest checkpoint (no validation loss was measured)"
    if not os.path.isfile(os.path.join(run_dir, name + ".index")):
        return latest, step, None, f"the latest checkpoint ({name}, the best, is missing)"
    if name == latest:
        return name, best_step, val_loss, "the lowest validation loss, at the latest checkpoint"
    if logged_val_loss(run_dir, step) is None:  # never measured: not known to be worse
        return name, best_step, val_loss, (f"the lowest validation loss measured (the latest, {latest}, "
                                           "was not measured)")
    return name, best_step, val_loss, f"the lowest validation loss (the latest, {latest}, is not better)"


def logged_val_loss(run_dir, step):
    """The validation loss loss.csv holds for step, or None."""
    try:
        with open(os.path.join(run_dir, "loss.csv"), newline="") as f:
            for row in csv.DictReader(f):
                if row["step"] == str(step) and row.get("val_loss"):
                    return float(row["val_loss"])
    except (OSError, KeyError, ValueError):
        pass
    return None


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate(run_dir, which="best"):
    """(name, step, validation loss or None, why, hparams) of the checkpoint to export from run_dir."""
    if not os.path.isdir(run_dir):
        raise ExportError(f"run folder {run_dir} does not exist")
    name, step, val_loss, reason = chosen_checkpoint(run_dir, which)
    index_path = os.path.join(run_dir, name + ".index")
    if not os.path.isfile(index_path):
        raise ExportError(f"{index_path} is missing: the checkpoint file names {name} but it is not there")
    with open(os.path.join(run_dir, "hparams.json"), encoding="utf-8") as f:
        hparams = json.load(f)
    return name, step, val_loss, reason, hparams


def read_tensors(prefix):
    """{variable: float32 array} of the checkpoint at prefix; refused when unreadable or not finite."""
    import tensorflow as tf  # here, so that a wrong RUN_DIR is reported without TF's start-up time

    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
    except Exception as e:  # TF raises its own error types for a corrupt bundle
        raise ExportError(f"cannot read checkpoint {prefix}: {str(e).splitlines()[0]}") from None
    tensors = {}
    for var in sorted(shapes):
        try:
            value = reader.get_tensor(var)
        except Exception as e:
            raise ExportError(f"cannot read {var} from {prefix}: {str(e).splitlines()[0]}") from None
        if value.dtype != np.float32:
            raise ExportError(f"{var} in {prefix} is {value.dtype}, expected float32")
        if not np.isfinite(value).all():
            raise ExportError(f"{var} in {prefix} holds NaN or infinite values: the training diverged; "
                              "train again with a lower --learning-rate or from an earlier checkpoint")
        tensors[var] = value
    return tensors


def export(run_dir, quant=DEFAULT_QUANT, which="best", dataset=None):
    """Write run_dir/weights/ for the chosen checkpoint; return the path of manifest.json. The
    manifest carries the run's text format (finetune/text_format.py; `dataset` tells it for a run
    trained before the run folder recorded it)."""
    if quant not in QUANTS:
        raise ExportError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    run_dir = os.path.abspath(run_dir)
    name, step, val_loss, reason, hparams = locate(run_dir, which)
    index_path = os.path.join(run_dir, name + ".index")
    tensors = read_tensors(os.path.join(run_dir, name))

    out_dir = os.path.join(run_dir, "weights")
    tmp_dir = tempfile.mkdtemp(prefix=".weights.partial-", dir=run_dir)
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes 0700; the serving container may run as another user
    try:
        try:
            write_gguf(os.path.join(tmp_dir, GGUF_NAME), tensors, hparams, run_dir, quant,
                       name=os.path.basename(run_dir))
        except ImportError as e:  # gguf (every type), llama-cpp-python (K-quants)
            package, pinned = {"llama_cpp": ("llama-cpp-python", "requirements.txt")}.get(
                e.name, (e.name, "requirements-train.txt"))
            raise ExportError(f"--quant {quant} needs the {package} package (pinned in {pinned})") from None
        except ValueError as e:  # shapes that do not match hparams.json, a vocabulary that does not fit
            raise ExportError(str(e)) from None
        manifest = {
            "checkpoint": name,
            "step": step,
            "val_loss": val_loss,
            "reason": reason,
            "index_sha256": sha256_of(index_path),
            "hparams": hparams,
            "gguf": GGUF_NAME,
            "quant": quant,
            "text_format": text_format.read(run_dir, dataset),
            "tensors": {var: list(value.shape) for var, value in tensors.items()},
        }
        with open(os.path.join(tmp_dir, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        # Swap: the old export goes aside, the new one takes its name, then the old one is removed.
        old_dir = None
        if os.path.exists(out_dir):
            old_dir = tempfile.mkdtemp(prefix=".weights.old-", dir=run_dir)
            os.rename(out_dir, os.path.join(old_dir, "weights"))
        os.rename(tmp_dir, out_dir)
        if old_dir:
            shutil.rmtree(old_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return os.path.join(out_dir, "manifest.json")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (usage: python -m finetune.export RUN_DIR [--quant TYPE | --format hf])\n")


def main(argv=None):
    # Keep TensorFlow's start-up chatter out of the output (oneDNN announces itself otherwise; it
    # only speeds up arithmetic, and an export does none). Here, not at import: `python -m finetune`
    # imports this module before TensorFlow, and its training needs oneDNN (--precision bf16 runs on it).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    parser = Parser(prog="python -m finetune.export",
                    description="Export a run's best checkpoint (else its latest) as GGUF.")
    parser.add_argument("run_dir", help="the run folder, e.g. checkpoint/run1")
    parser.add_argument("--format", default="gguf", choices=["gguf", "hf"],
                        help="gguf: RUN_DIR/weights for the server (default); hf: RUN_DIR/hf, a Hugging Face "
                             "GPT-2 folder for transformers (docs/huggingface.md)")
    parser.add_argument("--quant", choices=list(QUANTS),
                        help=f"weight type of the GGUF file (default {DEFAULT_QUANT})")
    parser.add_argument("--checkpoint", default="best", choices=["best", "latest"],
                        help="best: the lowest validation loss (the latest when none was measured); latest")
    parser.add_argument("--dataset", help="the corpus the run was trained on, for a run folder without "
                        f"{text_format.RECORD}: its <|startoftext|> markers tell the text format")
    args = parser.parse_args(argv)
    if args.format == "hf":
        if args.quant:
            parser.error("--quant is for --format gguf; the Hugging Face folder holds the checkpoint's float32 weights")
        from finetune.hf_export import export_hf
        try:
            print(f"exported {export_hf(args.run_dir, args.checkpoint)}")
        except (ExportError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        manifest_path = export(args.run_dir, args.quant or DEFAULT_QUANT, args.checkpoint, args.dataset)
    except (ExportError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    print(f"exported {manifest['checkpoint']} as {manifest['quant']} to "
          f"{os.path.join(os.path.dirname(manifest_path), manifest['gguf'])} (texts: {manifest['text_format']})")
    return 0


if __name__ == "__main__":
    from finetune.export import main  # the package's copy: finetune.hf_export raises its ExportError
    sys.exit(main())

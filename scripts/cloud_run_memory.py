"""Cloud Run's --memory for a run's export, from the server's peaks measured in docs/benchmarks.md.

    python scripts/cloud_run_memory.py RUN_DIR [MEMORY]     # prints e.g. 1Gi

MEMORY is `auto` (the default: the measured setting) or a Cloud Run size such as 2Gi, which is
printed back unless the measurements say the model needs more. With no measurement that covers the
model, `auto` stops with one line asking for _MEMORY. cloudbuild.yaml runs it inside the built image
(the image's export is the one deployed); standard library only, no NumPy.
"""
import json
import re
import sys
from pathlib import Path

# The server's peak RSS, 100-token answers, 1 thread (2026-11-23, AMD EPYC, 2 cores; docs/benchmarks.md,
# bench/results/2026-11-23-gguf.md), and the smallest Cloud Run setting 25% above it. A model no bigger
# than a row's GPT-2 shape in every hparam, with a GGUF file no bigger than the row's, peaks no higher:
# the peak is the mapped weights plus buffers that grow with the shape. The largest requests (1,000
# tokens, or 4 samples) added 39 MB at 124M Q8_0 (281 MB); the 25% covers such growth at these shapes.
MEASURED = [  # (shape, n_layer, n_embd, n_vocab, n_ctx, GGUF MB, peak MB, memory)
    ("GPT-2 124M F16", 12, 768, 50257, 1024, 251, 350, "512Mi"),
    ("GPT-2 355M Q8_0", 24, 1024, 50257, 1024, 380, 490, "1Gi"),
    ("GPT-2 774M Q8_0", 36, 1280, 50257, 1024, 826, 938, "2Gi"),
]
UNITS = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class Refused(Exception):
    pass


def size_bytes(memory):
    match = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi|Ti|K|M|G|T)", memory)
    if not match:
        raise Refused(f"_MEMORY={memory} is not a Cloud Run memory size such as 512Mi or 2Gi (or auto)")
    return int(match.group(1)) * UNITS[match.group(2)]


def export_of(run_dir):
    """(hparams, GGUF size in bytes) of RUN_DIR/weights."""
    weights = Path(run_dir) / "weights"
    try:
        manifest = json.loads((weights / "manifest.json").read_text(encoding="utf-8"))
        hparams = {k: int(manifest["hparams"][k]) for k in ("n_layer", "n_embd", "n_vocab", "n_ctx")}
        return hparams, (weights / Path(manifest["gguf"]).name).stat().st_size
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Refused(f"{weights} holds no readable export ({e.__class__.__name__}): "
                      f"run python -m finetune.export {run_dir}") from None


def covering_row(hparams, gguf_bytes):
    for row in MEASURED:
        _, n_layer, n_embd, n_vocab, n_ctx, gguf_mb, _, _ = row
        if (hparams["n_layer"] <= n_layer and hparams["n_embd"] <= n_embd and hparams["n_vocab"] <= n_vocab
                and hparams["n_ctx"] <= n_ctx and gguf_bytes <= gguf_mb * 10**6):
            return row
    return None


def memory_for(run_dir, requested="auto"):
    if requested != "auto":
        size_bytes(requested)  # a typo stops here, not at the deploy after the push
    hparams, gguf_bytes = export_of(run_dir)
    row = covering_row(hparams, gguf_bytes)
    model = (f"{hparams['n_layer']} layers, {hparams['n_embd']} wide, "
             f"a {gguf_bytes / 1e6:,.0f} MB GGUF file")
    if row is None:
        if requested != "auto":
            return requested  # beyond what was measured: the builder's own figure
        raise Refused(f"no measured peak covers this model ({model}; docs/benchmarks.md measured up to "
                      f"{MEASURED[-1][0]}): measure it and set --substitutions=_MEMORY=SIZE "
                      "(1.25 x the peak, e.g. _MEMORY=4Gi)")
    shape, *_, peak_mb, needed = row
    if requested == "auto":
        return needed
    if size_bytes(requested) < size_bytes(needed):
        raise Refused(f"_MEMORY={requested} is too small for this model ({model}: {shape} peaks at {peak_mb} MB, "
                      f"docs/benchmarks.md): set _MEMORY={needed} or _MEMORY=auto")
    return requested


def main(argv):
    if len(argv) not in (1, 2):
        print("usage: python scripts/cloud_run_memory.py RUN_DIR [auto|SIZE]", file=sys.stderr)
        return 2
    try:
        print(memory_for(*argv))
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

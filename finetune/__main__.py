"""python -m finetune: fine-tune GPT-2 with gpt-2-simple into checkpoint/<run-name>, then export it.

    python -m finetune --dataset data/corpus.txt --steps 1000                 # GPT-2 124M, downloaded
    python -m finetune --from-scratch --n-layer 2 --n-embd 64 --n-head 2 \\
        --vocab-size 1000 --dataset corpus.txt --steps 200                    # tiny model, offline
    python -m finetune --dataset corpus.txt --upload gs://bucket/runs/run1    # then copy to GCS

Bad input is one line on stderr and exit status 2; a step it cannot go past (the loss diverged, out
of memory, disk full) is one line and exit status 1, with the last checkpoint untouched; Ctrl-C or
SIGTERM saves a checkpoint that `--restore-from latest` continues from (exit status 128 + signal).
"""
import argparse
import os
import signal
import sys
import tempfile

from finetune import UsageError
from finetune.arguments import fraction, gs_url, non_negative_int, positive_float, positive_int, seed_number

MODELS = ["124M", "355M", "774M", "1558M"]
DEFAULT_MODEL_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
MODEL_URL_ENV = "GPT2_MODEL_URL"
REQUIRE_GPU_ENV = "FINETUNE_REQUIRE_GPU"
RELEASE_N_CTX = 1024  # every GPT-2 release's


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see python -m finetune --help)")


def build_parser():
    p = Parser(prog="python -m finetune", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", help="plain text, <|startoftext|>...<|endoftext|> text, or a .npz "
                   "from gpt_2_simple.encode_dataset (a folder of such files works too); or a "
                   "gs://BUCKET/FILE to download first")
    p.add_argument("--model", default="124M", help="GPT-2 release to start from: " + ", ".join(MODELS))
    p.add_argument("--steps", type=int, default=1000, help="training steps in this run (-1: until Ctrl-C)")
    p.add_argument("--until-step", type=positive_int, default=None,
                   help="instead of --steps: train until the run's counter reaches N, so a resumed or "
                   "retried run does only what is left (the cloud job uses this)")
    p.add_argument("--run-name", default="run1", help="run folder name under --checkpoint-dir")
    p.add_argument("--checkpoint-dir", default="checkpoint", help="where run folders are kept")
    p.add_argument("--learning-rate", type=positive_float, default=1e-4, help="the optimizer's learning rate")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per batch")
    p.add_argument("--accumulate-gradients", type=positive_int, default=5,
                   help="batches per optimizer step (gpt-2-simple's default)")
    # Memory and speed (docs/training-memory.md): what lets 774M and 1558M train on one L4.
    p.add_argument("--train-layers", choices=["all", "transformer"], default="all",
                   help="transformer: train only the transformer blocks, embeddings frozen and without "
                   "optimizer state (gpt-2-simple's only_train_transformer_layers)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="sgd keeps no moments: 8 bytes a parameter less than adam")
    p.add_argument("--recompute", action="store_true",
                   help="keep only each transformer block's input and recompute the block in the "
                   "backward pass: far less activation memory, ~1.3x the time a step")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on CPUs with AMX or AVX512-BF16, fp16 (dynamic loss scaling) on GPUs "
                   "of compute capability 7.0+, else fp32; weights and checkpoints stay float32")
    p.add_argument("--window", type=positive_int, default=None,
                   help="tokens per training window (default: the model's n_ctx, 1024 for GPT-2); "
                   "comments are short, and 256 costs about a quarter per step")
    p.add_argument("--sample-every", type=non_negative_int, default=200,
                   help="write samples to RUN/samples/samples-N every N steps (0: never)")
    p.add_argument("--sample-length", type=positive_int, default=200, help="tokens per sample")
    p.add_argument("--sample-num", type=positive_int, default=1, help="samples each time")
    p.add_argument("--save-every", type=non_negative_int, default=500,
                   help="checkpoint every N steps (0: only at the end); the run always saves at its end")
    p.add_argument("--max-checkpoints", type=positive_int, default=1,
                   help="latest checkpoints kept (the best one is kept besides)")
    p.add_argument("--val-fraction", type=fraction, default=None,
                   help="share of the corpus's texts held out to measure the validation loss on (default "
                   "0.05 with at least 200 texts, else none; 0: no validation); the same texts every run")
    p.add_argument("--val-dataset", help="held-out text to measure the validation loss on instead (a file, "
                   "folder or gs://BUCKET/FILE); its texts are removed from the training text")
    p.add_argument("--val-every", type=positive_int, default=None,
                   help="measure the validation loss every N steps (default: every --sample-every) and at the end")
    p.add_argument("--val-tokens", type=positive_int, default=32768,
                   help="held-out tokens per measurement (a fixed set of windows): bounds its time")
    p.add_argument("--early-stop", type=non_negative_int, default=0,
                   help="stop after N measurements without a lower validation loss (0: never)")
    p.add_argument("--report-samples", type=non_negative_int, default=50,  # finetune/report.py SAMPLES
                   help="after training, samples for the memorization report (python -m finetune.report; 0: none)")
    p.add_argument("--restore-from", default="latest",
                   help="latest: continue RUN's checkpoint if any; fresh: start again from the base model")
    p.add_argument("--seed", type=seed_number, default=None, help="seed for weights, windows and samples")
    p.add_argument("--model-dir", default="models", help="where GPT-2 releases are kept")
    p.add_argument("--model-url", default=os.environ.get(MODEL_URL_ENV) or DEFAULT_MODEL_URL,
                   help=f"base URL of the releases (files at URL/MODEL/FILE); env {MODEL_URL_ENV}")
    p.add_argument("--from-scratch", action="store_true",
                   help="train a tokenizer on the dataset and start from random weights")
    p.add_argument("--n-layer", type=positive_int, default=2, help="--from-scratch: transformer blocks")
    p.add_argument("--n-embd", type=positive_int, default=64, help="--from-scratch: embedding width")
    p.add_argument("--n-head", type=positive_int, default=2, help="--from-scratch: attention heads")
    p.add_argument("--vocab-size", type=positive_int, default=1000,
                   help="--from-scratch: upper bound of the tokenizer's vocabulary")
    p.add_argument("--n-ctx", type=positive_int, default=1024,
                   help="--from-scratch: positions (and the default --window)")
    p.add_argument("--upload", type=gs_url, metavar="gs://BUCKET/PREFIX",
                   help="copy the run folder to Cloud Storage after every checkpoint and at the end; "
                   "with no local run to continue, a run already there is fetched and continued")
    p.add_argument("--download", type=gs_url, metavar="gs://BUCKET/PREFIX",
                   help="fetch a run (into RUN) or a GPT-2 release (into --model-dir/MODEL) first")
    p.add_argument("--require-gpu", action="store_true",
                   default=os.environ.get(REQUIRE_GPU_ENV) == "1",
                   help=f"stop at once if TensorFlow sees no GPU (env {REQUIRE_GPU_ENV}=1)")
    return p


def validate(args):
    if args.restore_from not in ("latest", "fresh"):
        raise UsageError(f"--restore-from must be 'latest' or 'fresh', not {args.restore_from!r}")
    if not args.from_scratch and args.model not in MODELS:
        raise UsageError(f"unknown model {args.model!r}: choose one of {', '.join(MODELS)}")
    if args.from_scratch:
        if args.dataset and args.dataset.endswith(".npz"):
            raise UsageError("--from-scratch needs a text dataset to build its tokenizer, not a .npz")
        if args.n_embd % args.n_head:
            raise UsageError(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
        if args.vocab_size < 258:
            raise UsageError(f"--vocab-size {args.vocab_size} is too small: the 256 byte tokens and "
                             "<|endoftext|> need at least 258")
        if args.n_ctx < 16:
            raise UsageError(f"--n-ctx {args.n_ctx} is too small (at least 16)")
    n_ctx = args.n_ctx if args.from_scratch else RELEASE_N_CTX  # a resumed run is checked on loading
    if args.window is not None and args.window > n_ctx:
        raise UsageError(f"--window {args.window} is above the model's n_ctx {n_ctx}")
    if args.window == 1:
        raise UsageError("--window 1 is too small: a window predicts its tokens from the ones before")
    if args.steps == 0 or args.steps < -1:
        raise UsageError(f"--steps must be a positive number of steps or -1, not {args.steps}")
    if not args.model_url.startswith(("http://", "https://")):
        raise UsageError(f"--model-url must be an http(s) URL, not {args.model_url!r}")
    for name in (args.run_name, args.model):
        if not name or "/" in name or name.startswith("."):
            raise UsageError(f"{name!r} is not a usable folder name")
    if args.dataset is None:
        if not (args.upload or args.download):
            raise UsageError("--dataset is required (the text to fine-tune on)")
    elif args.dataset.startswith("gs://"):
        gs_url(args.dataset)
    else:
        check_dataset(args.dataset)
    if args.val_dataset is not None:
        if args.val_fraction is not None:
            raise UsageError("give --val-fraction or --val-dataset, not both")
        if args.val_dataset.startswith("gs://"):
            gs_url(args.val_dataset)
        else:
            check_dataset(args.val_dataset, "--val-dataset")
            if any(f.endswith(".npz") for f in dataset_files(args.val_dataset)):
                raise UsageError(f"--val-dataset {args.val_dataset} must be text, not a .npz")
    if args.val_fraction and (args.dataset or "").endswith(".npz"):
        raise UsageError("a .npz dataset is already encoded and cannot be split into texts: "
                         "hold out text with --val-dataset FILE instead of --val-fraction")


def dataset_files(path):
    return [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]


def check_dataset(path, label="dataset"):
    if not os.path.exists(path):
        raise UsageError(f"{label} {path} does not exist")
    files = dataset_files(path)
    if not any(os.path.getsize(f) for f in files):
        raise UsageError(f"{label} {path} is empty")
    texts = [f for f in files if not f.endswith(".npz")]
    for name in texts[:100]:
        check_text(name, path, label)
    if len(files) == 1 and texts and os.path.getsize(files[0]) < (1 << 20):
        with open(files[0], encoding="utf-8", errors="ignore") as f:
            if not f.read().strip():
                raise UsageError(f"{label} {path} is empty (only whitespace)")


def check_text(name, dataset, label="dataset"):
    """Refuse a file that is mostly not UTF-8 text (a binary file, an image, UTF-16): gpt-2-simple
    would silently drop what it cannot decode and train on the crumbs."""
    with open(name, "rb") as f:
        head = f.read(1 << 20)
    text = head.decode("utf-8", errors="replace")
    bad = sum(text.count(c) for c in "\ufffd\x00")
    if text and bad > 0.1 * len(text):
        raise UsageError(f"{label} {dataset} is not text: {bad / len(text):.0%} of the start of "
                         f"{name} is not UTF-8 (a binary file?)")


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        validate(args)
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: the message says which file
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: stopped without saving (a checkpoint saved before is intact)", file=sys.stderr)
        return 130


def run(args):
    # Until the training loop takes over signals, SIGTERM unwinds like Ctrl-C so that work
    # folders are cleaned up.
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    if args.require_gpu:
        from finetune import device
        device.require_gpu()  # in the first seconds, not after hours billed for a GPU
    from finetune.files import run_lock
    with run_lock(args.checkpoint_dir, args.run_name):
        if not any((path or "").startswith("gs://") for path in (args.dataset, args.val_dataset)):
            return run_locked(args)
        with tempfile.TemporaryDirectory(prefix=".dataset-", dir=args.checkpoint_dir) as tmp:
            from finetune import gcs
            for name, label in (("dataset", "dataset"), ("val_dataset", "--val-dataset")):
                url = getattr(args, name)
                if (url or "").startswith("gs://"):
                    local = os.path.join(tmp, name, os.path.basename(url) or "dataset")
                    os.makedirs(os.path.dirname(local))
                    gcs.download_file(url, local)
                    check_dataset(local, label)
                    setattr(args, name, local)
            return run_locked(args)


def run_locked(args):
    run_dir = os.path.join(args.checkpoint_dir, args.run_name)
    after_save = None
    if args.upload:
        from finetune import gcs
        gcs.check_bucket(args.upload)  # fail before hours of training, not after
        after_save = upload_after_save(args.upload)
        if (args.restore_from == "latest" and args.dataset and not args.download
                and not os.path.isfile(os.path.join(run_dir, "checkpoint")) and gcs.holds_run(args.upload)):
            print(f"Continuing the run at {args.upload}")  # a re-run or a retried cloud task
            gcs.download(args.upload, run_dir=run_dir, model_dir=os.path.join(args.model_dir, args.model))
    if args.download:
        from finetune import gcs
        gcs.download(args.download, run_dir=run_dir, model_dir=os.path.join(args.model_dir, args.model))
    if args.dataset:
        from finetune import export, train
        try:
            train.run(args, after_save=after_save)
        except train.TrainingFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except train.Interrupted as stop:
            if not stop.saved:
                print(f"{stop}: stopped before the first step, nothing saved", file=sys.stderr)
                return 128 + stop.signum
            export.export(run_dir, dataset=args.dataset)
            where = f"{run_dir} and {args.upload}" if args.upload else run_dir
            print(f"{stop}: saved {export.latest_checkpoint_name(run_dir)} in {where}; "
                  "continue with --restore-from latest", file=sys.stderr)
            return 128 + stop.signum
        try:
            manifest = export.export(run_dir, dataset=args.dataset)
        except export.ExportError as e:
            raise UsageError(str(e)) from None
        print(f"Exported weights to {os.path.dirname(manifest)} ({exported_what(manifest)})")
        if args.report_samples:
            memorization_report(run_dir, args)
    if args.upload:
        from finetune import gcs
        gcs.upload(run_dir, args.upload)
    return 0


def exported_what(manifest_path):
    import json
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    return f"{manifest['checkpoint']}: {manifest['reason']}"


def memorization_report(run_dir, args):
    """The report after training. Where the server's packages are missing (the training image) or
    the report fails, a line says so: the trained model is saved either way."""
    try:
        from finetune import report
        result = report.make_report(run_dir, args.dataset, samples=args.report_samples, seed=args.seed or 1)
    except ImportError as e:
        print(f"Memorization report skipped: it needs the server's packages ({e.name} is missing); "
              f"run python -m finetune.report {run_dir} --dataset FILE where they are installed")
        return
    except Exception as e:  # noqa: BLE001 -- a report must not fail a finished training run
        print(f"warning: the memorization report failed: {e}", file=sys.stderr)
        return
    report.print_report(result)
    print(f"Wrote {os.path.join(run_dir, 'report.md')}")


def upload_after_save(url):
    """After each checkpoint, copy the run to url, so that a task stopped later resumes from there.
    A failed upload is a warning: training goes on, and the upload at the end tries again."""
    def upload(run_dir):
        from finetune import gcs
        from tqdm import tqdm
        try:
            gcs.upload(run_dir, url)
        except UsageError as e:
            tqdm.write(f"warning: {e}; training goes on", file=sys.stderr)
    return upload


if __name__ == "__main__":
    sys.exit(main())

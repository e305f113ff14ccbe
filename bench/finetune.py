"""Seconds per training step of `python -m finetune` (and tokens per second), by --window and
--accumulate-gradients, and the time one validation pass adds.

    python bench/finetune.py            # GPT-2 124M shape (random weights), ~25 minutes on 2 busy cores
    python bench/finetune.py --quick    # a small model, ~1 minute
    python bench/finetune.py --options  # --precision and the memory options, 124M and 355M shapes

Each of window 1,024/256 x accumulate 5/1 is one `python -m finetune` run, one after the other, on
a random-weight run folder from bench/make_model.py (speed does not depend on the values), on the
CPU or the GPU TensorFlow sees. The first step pays for TensorFlow's warm-up and is left out; the
others are timed from the run's own loss.csv, and their median (robust to a burst of other jobs on a
shared machine) is the row's figure. The defaults (1,024 x 5) are what a user gets
without flags, and every row is compared with them. Each run measures the validation loss once, at
its end, on --val-tokens' default 32,768 held-out tokens (--val-dataset): the seconds that pass
takes are read from the progress line. Writes finetune.md (the table), finetune.png
(the chart) and finetune.json (every raw figure) to --out.

--options instead runs each --precision and memory option (OPTION_RUNS) once at the 124M shape
(--window 256, --accumulate-gradients 1, one window a step): seconds a step, tokens a second, peak
memory (the run's peak RSS, from wait4) against finetune.fit's estimate for the CPU, and the loss
after the same steps from the same checkpoint and seed, per precision; then the memory runs again at
the 355M shape (the options marked in OPTION_RUNS). Writes options.md, options.png and options.json.
"""
import argparse
import csv
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from finetune import fit  # noqa: E402
from report import fmt, write_outputs  # noqa: E402
from serve import SMALL_SHAPE, BenchError, machine, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [(1024, 5), (256, 5), (1024, 1), (256, 1)]  # (window, accumulate); the first is the default
CHECKPOINT_FILES = ["model-1.data-00000-of-00001", "model-1.index", "model-1.meta"]
CORPUS = "".join(f"<|startoftext|>comment {i}: the weather was fine today and the dog was happy.<|endoftext|>\n"
                 for i in range(400))
VAL_CORPUS = "".join(f"<|startoftext|>held-out comment {i}: it rained all week and the cat stayed inside, "
                     f"watching the birds.<|endoftext|>\n" for i in range(2000))  # over 32,768 tokens
VAL_TOKENS = 32768  # python -m finetune's default --val-tokens


def build_model(args, models_dir, logs):
    shape, name = (SMALL_SHAPE, "small-random") if args.quick else (make_model.SHAPE_124M, "gpt2-124M-random")
    model = models_dir / name  # the same cache as bench/serve.py's
    cmd = [sys.executable, str(ROOT / "bench" / "make_model.py"), str(model)]
    for key, value in shape.items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    run(cmd, f"building the {name} model (bench/make_model.py)", logs / "make_model.log")
    return model


def copy_run(model, run_dir):
    """A run folder to continue from model's checkpoint. The big files are hard links: the run
    saves new ones and deletes (unlinks) model-1, so the cached model stays as it was."""
    run_dir.mkdir(parents=True)
    for name in ["checkpoint", "counter", "hparams.json", "encoder.json", "vocab.bpe"]:
        shutil.copyfile(model / name, run_dir / name)
    for name in CHECKPOINT_FILES:
        os.link(model / name, run_dir / name)


def train(model, corpus, val, work, window, accumulate, steps, log_path):
    """One `python -m finetune` run; returns (seconds of each step, device, wall seconds, seconds
    of the validation pass)."""
    parent = work / f"w{window}-a{accumulate}"
    copy_run(model, parent / "run1")
    cmd = [sys.executable, "-m", "finetune", "--dataset", str(corpus), "--checkpoint-dir", str(parent),
           "--steps", str(steps), "--window", str(window), "--accumulate-gradients", str(accumulate),
           "--sample-every", "0", "--save-every", "0", "--val-dataset", str(val), "--report-samples", "0"]
    started = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    wall = time.time() - started
    text = log_path.read_text()
    if code:
        last = text.strip().splitlines()[-1] if text.strip() else ""
        raise BenchError(f"python -m finetune --window {window} --accumulate-gradients {accumulate} failed "
                         f"(exit {code}): {last}; see {log_path}")
    device = next(line[len("Training on "):] for line in text.splitlines() if line.startswith("Training on "))
    passes = re.findall(r"val=\S+ \(([\d.e+-]+)s\)", text)
    if not passes:
        raise BenchError(f"python -m finetune --window {window} measured no validation loss; see {log_path}")
    with open(parent / "run1" / "loss.csv", newline="") as f:
        averages = [float(row["seconds_per_step"]) for row in csv.DictReader(f)]
    shutil.rmtree(parent)
    # loss.csv keeps the running mean since the start; step k took k*mean_k - (k-1)*mean_(k-1)
    elapsed = [k * mean for k, mean in enumerate(averages, 1)]
    return [b - a for a, b in zip([0.0] + elapsed, elapsed)], device, wall, float(passes[-1])


def load():
    return round(os.getloadavg()[0], 2)


def table(results):
    hp = results["model"]["hparams"]
    m = results["machine"]
    loads = [r["load_before"] for r in results["runs"]] + [results["runs"][-1]["load_after"]]
    lines = [f"python -m finetune ({results['mode']}), {results['date']}: {results['device']}; {m['cpu']}, "
             f"{m['cores']} cores, {m['memory_gb']} GB; tensorflow-cpu {m['tensorflow-cpu']}, "
             f"gpt-2-simple {m['gpt-2-simple']}.",
             f"Model: n_layer {hp['n_layer']}, n_embd {hp['n_embd']}, n_head {hp['n_head']}, n_vocab {hp['n_vocab']}, "
             f"n_ctx {hp['n_ctx']} (random weights); median of {results['steps'] - 1} timed steps per row after "
             f"one warm-up step; load average {min(loads):.1f} to {max(loads):.1f} on {m['cores']} cores during the run.",
             "",
             "| --window | --accumulate-gradients | tokens/step | s/step | tokens/s | vs defaults | 1,000 steps "
             f"| one validation pass ({VAL_TOKENS:,} tokens) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["runs"]:
        name = " (defaults)" if (r["window"], r["accumulate"]) == CONFIGS[0] else ""
        lines.append(f"| {r['window']:,}{name} | {r['accumulate']} | {r['window'] * r['accumulate']:,} | "
                     f"{fmt(r['seconds_per_step'])} | {r['tokens_per_second']:,.0f} | {r['vs_defaults']:.2f}x | "
                     f"{hours(r['seconds_per_step'] * 1000)} | {fmt(r['validation_seconds'])} s "
                     f"({r['validation_seconds'] / r['seconds_per_step']:.2g} steps) |")
    return "\n".join(lines)


def hours(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['window']:,} x {r['accumulate']}" + ("\n(defaults)" if i == 0 else "") for i, r in enumerate(runs)]
    values = [r["seconds_per_step"] for r in runs]
    ax.bar(labels, values, color=["#999999"] + ["#1f77b4"] * (len(runs) - 1))
    for i, r in enumerate(runs):
        ax.annotate(f"{fmt(r['seconds_per_step'])} s ({r['vs_defaults']:.2f}x)\n1,000 steps: "
                    f"{hours(r['seconds_per_step'] * 1000)}", (i, values[i]), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(values) * 1.25)
    ax.set_xlabel("--window x --accumulate-gradients")
    ax.set_ylabel("seconds per step (lower is better)")
    hp = results["model"]["hparams"]
    ax.set_title(f"python -m finetune, n_layer {hp['n_layer']}, n_embd {hp['n_embd']} ({results['mode']}, "
                 f"{results['date']})\n{results['device']}, {results['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def at_least_2(text):
    value = int(text)
    if value < 2:
        raise ValueError
    return value


at_least_2.__name__ = "number of steps (at least 2: the first is warm-up)"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        sys.exit(f"bench/finetune.py: {message} (see --help)")


# -- --options: precision and memory (issue 21) -------------------------------------------------
SHAPE_355M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 24}
OPTION_RUNS = [  # (label, flags, at 124M, at 355M)
    ("fp32", ["--precision", "fp32"], True, True),
    ("bf16", ["--precision", "bf16"], True, False),
    ("fp32 --recompute", ["--precision", "fp32", "--recompute"], True, True),
    # --train-layers transformer and --optimizer sgd: add rows here to measure them (the tests run them
    # at a tiny shape; the 2026-11-30 run left them out for time)
]
MEMORY_STEPS = 1  # the peak is reached in the first step
OPTIONS_WINDOW = 256  # 1,024 would take hours on a shared 2-core machine
GIB = 2 ** 30


def option_run(model, corpus, work, label, flags, steps, log_path, window=OPTIONS_WINDOW):
    """One `python -m finetune` run with flags; its step seconds, losses, peak RSS and device."""
    parent = work / label.replace(" ", "_").replace("-", "")
    copy_run(model, parent / "run1")
    cmd = [sys.executable, "-m", "finetune", "--dataset", str(corpus), "--checkpoint-dir", str(parent),
           "--steps", str(steps), "--window", str(window), "--accumulate-gradients", "1", "--seed", "1",
           "--learning-rate", "1e-4", "--sample-every", "0", "--save-every", "0", *flags]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log_path.read_text()
    if proc.returncode:
        last = text.strip().splitlines()[-1] if text.strip() else ""
        raise BenchError(f"python -m finetune {' '.join(flags)} failed (exit {proc.returncode}): {last}; "
                         f"see {log_path}")
    device = next(line[len("Training on "):] for line in text.splitlines() if line.startswith("Training on "))
    with open(parent / "run1" / "loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))  # the model folder has no loss.csv: every row is this run's
    shutil.rmtree(parent)
    averages = [float(r["seconds_per_step"]) for r in rows]
    elapsed = [k * mean for k, mean in enumerate(averages, 1)]
    seconds = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    return {"label": label, "flags": flags, "window": window, "step_seconds": seconds,
            "seconds_per_step": float(np.median(seconds[1:])) if len(seconds) > 1 else seconds[0],
            "tokens_per_second": window / float(np.median(seconds[1:] or seconds)),
            "losses": [float(r["loss"]) for r in rows], "peak_rss_gib": usage.ru_maxrss * 1024 / GIB,
            "device": device}


def estimate_gib(hparams, flags, window, device):
    """finetune.fit's estimate for this run on the CPU (GiB)."""
    def value(flag, default):
        return flags[flags.index(flag) + 1] if flag in flags else default
    precision = value("--precision", "fp32")
    options = fit.Options(window=window, accumulate=1, optimizer=value("--optimizer", "adam"),
                          train_layers=value("--train-layers", "all"), recompute="--recompute" in flags,
                          precision=precision)
    return fit.needed(fit.Shape(**hparams), options, cpu=not device.startswith("GPU")) / GIB


def options_table(results):
    m = results["machine"]
    lines = [f"python -m finetune options ({results['mode']}), {results['date']}: {results['device']}; {m['cpu']}, "
             f"{m['cores']} cores, {m['memory_gb']} GB; tensorflow-cpu {m['tensorflow-cpu']}; load average "
             f"{results['load'][0]:.1f} to {results['load'][1]:.1f} during the run. Random weights; "
             "--accumulate-gradients 1, --batch-size 1; peak memory is the process's peak RSS.", ""]
    for key, title in (("speed", "speed and memory"), ("memory", "memory")):
        block = results[key]
        if not block["runs"]:
            continue
        hp = block["hparams"]
        lines += [f"{title}: n_layer {hp['n_layer']}, n_embd {hp['n_embd']}, window {block['runs'][0]['window']:,}, "
                  f"median of the timed steps after one warm-up step ({len(block['runs'][0]['step_seconds']) - 1})", "",
                  "| options | s/step | vs fp32 | tokens/s | peak RSS GiB | estimate GiB | estimate / measured |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        base = block["runs"][0]["seconds_per_step"]
        for r in block["runs"]:
            lines.append(f"| {r['label']} | {fmt(r['seconds_per_step'])} | {r['seconds_per_step'] / base:.2f}x | "
                         f"{r['tokens_per_second']:.0f} | {r['peak_rss_gib']:.2f} | {r['estimate_gib']:.2f} | "
                         f"{r['estimate_gib'] / r['peak_rss_gib']:.2f} |")
        lines.append("")
    runs = {r["label"]: r for r in results["speed"]["runs"]}
    lines += [f"loss after {results['steps']} steps from the same checkpoint and seed, by precision "
              f"(n_layer {results['speed']['hparams']['n_layer']}):", "",
              "| options | loss at the last step | vs fp32 |", "| --- | ---: | ---: |"]
    for bf16, fp32 in (("bf16", "fp32"), ("bf16 --recompute", "fp32 --recompute")):
        for label in (fp32, bf16) if bf16 in runs else ():
            lines.append(f"| {label} | {runs[label]['losses'][-1]:.4f} | "
                         f"{runs[label]['losses'][-1] / runs[fp32]['losses'][-1] - 1:+.2%} |")
    return "\n".join(lines)


def options_chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(13, 5))
    runs = results["speed"]["runs"]
    speed.barh([r["label"] for r in runs], [r["seconds_per_step"] for r in runs], color="#1f77b4")
    for i, r in enumerate(runs):
        speed.annotate(f" {fmt(r['seconds_per_step'])} s, {r['tokens_per_second']:.0f} tok/s", (r["seconds_per_step"], i),
                       va="center", fontsize=8)
    speed.invert_yaxis()
    speed.set_xlabel(f"seconds per step, window {runs[0]['window']:,} (lower is better)")
    speed.set_xlim(0, max(r["seconds_per_step"] for r in runs) * 1.5)
    labels, measured, estimated = [], [], []
    for key in ("speed", "memory"):
        hp = results[key]["hparams"]
        for r in results[key]["runs"]:
            labels.append(f"{r['label']}\n(n_layer {hp['n_layer']})")
            measured.append(r["peak_rss_gib"])
            estimated.append(r["estimate_gib"])
    y = np.arange(len(labels))
    memory.barh(y - 0.2, measured, 0.4, label="measured peak RSS")
    memory.barh(y + 0.2, estimated, 0.4, label="finetune.fit estimate")
    memory.set_yticks(y, labels, fontsize=7)
    memory.invert_yaxis()
    memory.set_xlabel("GiB")
    memory.legend()
    fig.suptitle(f"python -m finetune precision and memory options ({results['mode']}, {results['date']})\n"
                 f"{results['device']}, {results['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_options(args, models_dir, out, logs):
    quick = args.quick
    shapes = {"speed": (SMALL_SHAPE, "small-random") if quick else (make_model.SHAPE_124M, "gpt2-124M-random"),
              "memory": (SMALL_SHAPE, "small-random") if quick else (SHAPE_355M, "gpt2-355M-random")}
    results = {"date": datetime.date.today().isoformat(), "mode": "quick" if quick else "full",
               "machine": machine(), "steps": args.steps}
    loads = [load()]
    todo = [(key, label, flags) for key in ("speed", "memory") for label, flags, at_124m, at_355m in OPTION_RUNS
            if (at_124m, at_355m)[key == "memory"]]
    models = {}
    for key, (shape, name) in shapes.items():
        cmd = [sys.executable, str(ROOT / "bench" / "make_model.py"), str(models_dir / name)]
        for k, v in shape.items():
            cmd += ["--" + k.replace("_", "-"), str(v)]
        run(cmd, f"building the {name} model (bench/make_model.py)", logs / f"make_model-{name}.log")
        models[key] = models_dir / name
        results[key] = {"hparams": json.loads((models[key] / "hparams.json").read_text()), "runs": []}
    with tempfile.TemporaryDirectory(prefix=".finetune-bench-", dir=models_dir) as work:
        work = Path(work)
        corpus = work / "corpus.txt"
        corpus.write_text(CORPUS)
        for key, label, flags in tqdm(todo, desc="python -m finetune runs", disable=None):
            r = option_run(models[key], corpus, work, label, flags, MEMORY_STEPS if key == "memory" else args.steps,
                           logs / f"options-{key}-{label.replace(' ', '_')}.log")
            r["estimate_gib"] = estimate_gib(results[key]["hparams"], flags, r["window"], r["device"])
            results[key]["runs"].append(r)
            results["device"] = r["device"].split(" in ")[0]
            loads.append(load())
            tqdm.write(f"{key} {label}: {r['seconds_per_step']:.2f} s/step, peak RSS {r['peak_rss_gib']:.2f} GiB "
                       f"(estimate {r['estimate_gib']:.2f}), last loss {r['losses'][-1]:.4f}")
    results["load"] = [min(loads), max(loads)]
    print(write_outputs(out, results, "options", options_table, options_chart))
    print(f"\nwrote {out / 'options.md'}, {out / 'options.png'}, {out / 'options.json'}")


def main():
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small model (n_layer 2, n_embd 64)")
    p.add_argument("--options", action="store_true",
                   help="the --precision and memory options instead (124M and 355M shapes)")
    p.add_argument("--steps", type=at_least_2, default=4, help="steps per run; the first is not timed")
    p.add_argument("--out", help="output folder (default bench/out, or bench/out/quick with --quick)")
    p.add_argument("--models", help="where built models are cached (default bench/out/models)")
    args = p.parse_args()
    out = Path(args.out or ROOT / "bench" / "out" / ("quick" if args.quick else "")).resolve()
    if out.exists() and not out.is_dir():
        sys.exit(f"bench/finetune.py: --out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    if args.options:
        try:
            return run_options(args, Path(args.models or ROOT / "bench" / "out" / "models").resolve(), out, logs)
        except BenchError as e:
            sys.exit(f"bench/finetune.py: {e}")
    started = time.time()
    runs = []
    try:
        model = build_model(args, Path(args.models or ROOT / "bench" / "out" / "models").resolve(), logs)
        # the work folder sits next to the model: hard links need one file system
        with tempfile.TemporaryDirectory(prefix=".finetune-bench-", dir=model.parent) as work:
            work = Path(work)
            corpus = work / "corpus.txt"
            corpus.write_text(CORPUS)
            val = work / "val.txt"
            val.write_text(VAL_CORPUS)
            # minutes per run at the 124M shape: tqdm's estimate of the time left is per configuration
            for window, accumulate in tqdm(CONFIGS, desc="python -m finetune runs", disable=None):
                before = load()
                seconds, device, wall, validation = train(model, corpus, val, work, window, accumulate, args.steps,
                                                          logs / f"finetune-w{window}-a{accumulate}.log")
                per_step = float(np.median(seconds[1:]))
                runs.append({"window": window, "accumulate": accumulate, "step_seconds": seconds,
                             "seconds_per_step": per_step, "tokens_per_second": window * accumulate / per_step,
                             "validation_seconds": validation, "wall_seconds": round(wall, 1),
                             "load_before": before, "load_after": load()})
                tqdm.write(f"--window {window} --accumulate-gradients {accumulate}: {per_step:.2f} s/step, "
                           f"{runs[-1]['tokens_per_second']:,.0f} tokens/s; a validation pass {validation:.3g} s")
    except BenchError as e:
        sys.exit(f"bench/finetune.py: {e}")
    except KeyboardInterrupt:
        sys.exit("bench/finetune.py: interrupted; no figures written")
    for r in runs:
        r["vs_defaults"] = r["seconds_per_step"] / runs[0]["seconds_per_step"]
    results = {"date": datetime.date.today().isoformat(), "mode": "quick" if args.quick else "full",
               "machine": machine(), "device": device, "steps": args.steps,
               "wall_seconds": round(time.time() - started, 1),
               "model": {"run_dir": str(model), "hparams": json.loads((model / "hparams.json").read_text()),
                         "weights": "random weights"},
               "runs": runs}
    print(write_outputs(out, results, "finetune", table, chart))
    print(f"\nwrote {out / 'finetune.md'}, {out / 'finetune.png'}, {out / 'finetune.json'}")


if __name__ == "__main__":
    main()

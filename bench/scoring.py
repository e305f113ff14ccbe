"""Scoring text on /v1/completions: the time to score a 1,000-token prompt (echo + logprobs), and the
peak memory of scoring a whole-context prompt against generating, on this machine.

    python bench/scoring.py              # the GPT-2 124M shape (random weights), 3-5 minutes (8 on a busy machine)
    python bench/scoring.py --quick      # a small model, ~1 minute

Our server runs as `python -m app` (THREADS=1, as on Cloud Run), driven over HTTP. Times: the median
of --repeats requests of the same 1,000 random token ids with `echo: true, max_tokens: 0` and no
logprobs (the forward pass alone, decoded in one go), `logprobs: 0` (each position's log-softmax,
64 positions decoded at a time: app/llama_engine.py Scores) and `logprobs: 5` (and the five likeliest). Memory: the peak
resident set (VmHWM) of a fresh server after one request: scoring n_ctx tokens with logprobs 5, or
generating to the end of the context from a short prompt. Writes scoring.md, scoring.png and
scoring.json to --out (default bench/out).
"""
import argparse
import datetime
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import SMALL_SHAPE, Server, build_random, machine  # noqa: E402
import make_model  # noqa: E402
from report import write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT_TOKENS = 1000


def body(name, ids, **params):
    return {"model": name, "prompt": ids, "echo": True, "max_tokens": 0, **params}


def score_times(model, ids, repeats, logs):
    """Seconds to score `ids`, per mode, every repeat: on the client's clock, and the server's CPU
    seconds (steadier on a busy machine, where the wall clock also counts other jobs' time)."""
    server = Server(model, 1, logs / "scoring-times.log")
    try:
        name = model.name  # the served model's name: its run folder's
        server.first_answer(body=body(name, ids[:8]))  # loaded and warm
        modes = {"forward pass only": {}, "logprobs 0": {"logprobs": 0}, "logprobs 5": {"logprobs": 5}}
        times = {mode: {"wall": [], "cpu": []} for mode in modes}
        for _ in range(repeats):  # interleaved, so that a busy moment of the machine hits every mode
            for mode, params in modes.items():
                cpu = server.cpu_seconds()
                answer, seconds = server.post(body(name, ids, **params))
                if params:
                    assert len(answer["choices"][0]["logprobs"]["token_logprobs"]) == len(ids)
                times[mode]["wall"].append(seconds)
                times[mode]["cpu"].append(server.cpu_seconds() - cpu)
        return times
    finally:
        server.stop()


def peak_mb(model, request, log_path):
    """VmHWM of a fresh server after its first answer to `request` (and its RSS before it)."""
    server = Server(model, 1, log_path)
    try:
        _, before, _ = server.first_answer(body=request)
        return {"before": before["rss"], "peak": server.memory()["peak"]}
    finally:
        server.stop()


def markdown(results):
    m, hp = results["machine"], results["model"]["hparams"]
    lines = [f"Scoring on {m['cpu']} ({m['cores']} cores), {results['date']}, llama-cpp-python "
             f"{m['llama-cpp-python']}; model: n_layer {hp['n_layer']}, n_embd {hp['n_embd']}, n_vocab "
             f"{hp['n_vocab']} (random weights, {results['model']['quant']}), THREADS=1.", "",
             f"| {results['prompt_tokens']}-token prompt, echo, max_tokens 0 | server CPU s (median) | tokens/CPU s "
             "| wall s (median) | wall s, each run |", "|---|---|---|---|---|"]
    for mode, times in results["times"].items():
        cpu, wall = statistics.median(times["cpu"]), statistics.median(times["wall"])
        lines.append(f"| {mode} | {cpu:.2f} | {results['prompt_tokens'] / cpu:.0f} | {wall:.2f} | "
                     f"{', '.join(f'{t:.2f}' for t in times['wall'])} |")
    lines += ["", "| one request on a fresh server | RSS before (MB) | peak RSS (MB) |", "|---|---|---|"]
    for what, figures in results["memory"].items():
        lines.append(f"| {what} | {figures['before']:.0f} | {figures['peak']:.0f} |")
    return "\n".join(lines)


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    m, hp = results["machine"], results["model"]["hparams"]
    fig.suptitle(f"Scoring a {results['prompt_tokens']}-token prompt ({results['date']}, {m['cpu']}, "
                 f"n_layer {hp['n_layer']}, n_embd {hp['n_embd']}, THREADS=1)")
    modes = list(results["times"])
    left.bar(modes, [statistics.median(results["times"][mode]["cpu"]) for mode in modes], color="#1f77b4")
    for i, mode in enumerate(modes):
        left.plot([i] * len(results["times"][mode]["cpu"]), results["times"][mode]["cpu"], "k.")
    left.set_ylabel("server CPU seconds (median; dots: each run)")
    whats = list(results["memory"])
    right.bar(whats, [results["memory"][w]["peak"] for w in whats], color="#ff7f0e", label="peak RSS")
    right.bar(whats, [results["memory"][w]["before"] for w in whats], color="#1f77b4", label="RSS before")
    right.set_ylabel("MB")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small model (n_embd 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="output folder (default bench/out)")
    p.add_argument("--models", help="where built models are cached (default bench/out/models)")
    args = p.parse_args()
    out = Path(args.out or ROOT / "bench" / "out").resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shape, name = (SMALL_SHAPE, "small-random") if args.quick else (make_model.SHAPE_124M, "gpt2-124M-random")
    model = build_random(Path(args.models or ROOT / "bench" / "out" / "models").resolve(), name, shape, logs)
    hparams = json.loads((model / "hparams.json").read_text())
    rng = random.Random(0)
    ids = [rng.randrange(hparams["n_vocab"] - 1) for _ in range(hparams["n_ctx"])]  # never the end token

    times = score_times(model, ids[:PROMPT_TOKENS], args.repeats, logs)
    memory = {
        f"score {hparams['n_ctx']} tokens, logprobs 5": peak_mb(model, body(model.name, ids, logprobs=5),
                                                               logs / "scoring-peak.log"),
        f"generate {hparams['n_ctx'] - 24} tokens": peak_mb(
            model, {"model": model.name, "prompt": ids[:24], "max_tokens": hparams["n_ctx"] - 24, "seed": 1},
            logs / "generating-peak.log"),
    }
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "prompt_tokens": PROMPT_TOKENS,
               "model": {"hparams": hparams, "quant": json.loads((model / "weights" / "manifest.json").read_text())
                         .get("quant", "Q8_0")},
               "times": times, "memory": memory}
    print(write_outputs(out, results, "scoring", markdown, chart))
    print(f"\nwrote {out / 'scoring.md'}, {out / 'scoring.png'}, {out / 'scoring.json'}")


if __name__ == "__main__":
    main()

"""`make demo`: the whole product on this machine, offline, with no Google Cloud account.

1. starts a local BigQuery emulator and loads the bundled sample dump files into it with `python -m data.load`
   (data/sample/reddit_comments.zst and reddit_submissions.zst: made-up comments and posts shaped like
   the Pushshift / Arctic Shift archives),
2. extracts r/AmItheAsshole comments from 2019 matching (?i)\\bYTA\\b with `python -m data.extract`,
3. trains a small GPT-2 from scratch on them with `python -m finetune --from-scratch` (which also
   exports the weights the server loads); after 3 steps it prints the time left, measured as it runs,
4. serves it with `python -m app` on http://localhost:8080 (127.0.0.1 only; --host to choose) until Ctrl-C.

Everything is written under .demo/ (corpus.txt, checkpoint/run1, the emulator's log; --dir to choose),
never to data/corpus.txt or checkpoint/run1, so a real corpus or model is left alone; each run replaces
the previous demo's corpus and run folder there.
Ctrl-C at any point stops every process the demo started; while serving, that is how the demo ends
(exit status 0; before that, 130).
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.emulator import SAMPLE, SAMPLE_PROJECT, Emulator, EmulatorError, port_in_use  # noqa: E402
from data.extract import whole_number  # noqa: E402

DEMO = ROOT / ".demo"
SUBREDDIT, MATCH, SINCE = "AmItheAsshole", r"(?i)\bYTA\b", "2019-01"
# The comments are short, so 256-token windows hold several of them. How long 400 steps take depends
# on the machine and its load: the training prints its own estimate after 3 steps.
VOCAB = 2000  # the tokenizer's upper bound; the sample's small vocabulary fills fewer
MODEL = ["--from-scratch", "--n-layer", "4", "--n-embd", "256", "--n-head", "8", "--vocab-size", str(VOCAB),
         "--n-ctx", "256"]
TRAIN = ["--batch-size", "8", "--accumulate-gradients", "1", "--learning-rate", "0.001",
         "--sample-every", "0", "--save-every", "0", "--seed", "1"]

started = []  # every process the demo started, stopped on the way out
serving = []  # the server, once it serves: Ctrl-C then is the demo's normal end


class DemoError(Exception):
    pass


def stage(number, text):
    print(f"\n[{number}/4] {text}", flush=True)


def start(args, env=None, **kwargs):
    shown = [Path(sys.executable).name if a == sys.executable else a for a in args]
    print("  $ " + shlex.join(shown), flush=True)
    process = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})}, **kwargs)
    started.append(process)
    return process


def run(args, what, env=None):
    process = start(args, env)
    if process.wait() != 0:
        raise DemoError(f"{what} failed (exit status {process.returncode}); see its message above")


def stop_all():
    for process in reversed(started):
        if process.poll() is None:
            process.terminate()
    for process in started:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_server(process, url, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(f"the server exited (status {process.returncode}); see its log above")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise DemoError(f"the server did not answer on {url} within {timeout} s")


def shown(path):
    """path relative to the repository when it is inside it (shorter to read), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def demo(args):
    began = time.monotonic()
    if port_in_use(args.port):
        raise DemoError(f"port {args.port} is in use; stop what uses it, or run .venv/bin/python scripts/demo.py --port N")
    workdir = args.dir.resolve()
    if workdir == ROOT:  # its checkpoint/run1 is the real model, which the demo would replace
        raise DemoError("--dir must not be the repository itself; the default is .demo")
    corpus, run_dir = workdir / "corpus.txt", workdir / "checkpoint" / "run1"
    # start afresh, removing only what an earlier demo wrote there (--dir may be any folder)
    shutil.rmtree(run_dir, ignore_errors=True)
    corpus.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)

    stage(1, "Starting a local BigQuery emulator (bqemulator) and loading the bundled sample dump files into it")
    with Emulator(log_path=workdir / "bqemulator.log") as emulator:
        started.append(emulator.process)
        print(f"  emulator on {emulator.url} (log {shown(emulator.log_path)})\n"
              "  Each sample file holds one corrupt line on purpose, as real dumps do: the summary counts it\n"
              "  under `bad: not JSON` and the load skips it.")
        for path, table in SAMPLE.items():
            run([sys.executable, "-m", "data.load", shown(path), "--table", f"{SAMPLE_PROJECT}.{table}",
                 "--endpoint", emulator.url, "--quiet"], "loading the sample")

        stage(2, f"Extracting r/{SUBREDDIT} comments since {SINCE} matching {MATCH} into {shown(corpus)} "
                 "(same command as against real BigQuery, plus --endpoint)")
        run([sys.executable, "-m", "data.extract", "--endpoint", emulator.url, "--project", SAMPLE_PROJECT,
             "--subreddit", SUBREDDIT, "--since", SINCE, "--match", MATCH, "--out", shown(corpus)], "the extraction")
    print(f"  stopped the emulator ({time.monotonic() - began:.0f} s so far)")

    stage(3, f"Training a small GPT-2 from scratch for {args.steps} steps, then exporting it to {shown(run_dir)}/weights")
    print(f"  First a tokenizer is trained on the corpus: up to {VOCAB} tokens are allowed, and the sample's\n"
          "  small vocabulary fills fewer (the model's n_vocab below). After 3 steps the training prints\n"
          "  the time left, measured on this machine as it runs.", flush=True)
    trained = time.monotonic()
    run([sys.executable, "-m", "finetune", *MODEL, "--dataset", shown(corpus), "--steps", str(args.steps),
         *TRAIN, "--run-name", run_dir.name, "--checkpoint-dir", shown(run_dir.parent)], "fine-tuning")
    print(f"  trained and exported in {time.monotonic() - trained:.0f} s")
    if (run_dir / "loss.png").exists():
        print(f"  loss curve: {shown(run_dir / 'loss.png')}")
    if (run_dir / "report.json").exists():  # python -m finetune.report's summary line
        print(f"  memorization: {json.loads((run_dir / 'report.json').read_text())['summary']}")

    stage(4, f"Serving {shown(run_dir)} with `python -m app` on {args.host}, port {args.port}")
    server = start([sys.executable, "-m", "app"],
                   env={"MODEL_DIR": shown(run_dir), "PORT": str(args.port), "HOST": args.host})
    local = args.host in ("127.0.0.1", "0.0.0.0")
    base = f"http://{'localhost' if local else args.host}:{args.port}"
    reach = f"http://{'127.0.0.1' if local else args.host}:{args.port}"  # what the demo itself calls
    wait_for_server(server, f"{reach}/")
    # The corpus is <|startoftext|>...<|endoftext|> comments: the server's defaults make one whole comment.
    with urllib.request.urlopen(f"{reach}/?length=80&seed=1", timeout=60) as r:
        first = json.load(r)
    print(f"\nReady in {time.monotonic() - began:.0f} s. A first generated comment:\n  {first['text']}\n")
    print(f"Open {base}/ui/ for the page, or try:\n"
          f"  {base}/?length=100&temperature=0.8\n"
          f"  {base}/?length=80&temperature=0.9&nsamples=3\n"
          f"  curl -s -X POST {base}/ -H 'Content-Type: application/json' "
          "-d '{\"length\": 80, \"temperature\": 0.9, \"prefix\": \"YTA.\"}'\n"
          f"  {base}/limits   (every parameter and its allowed range)\n"
          "Ctrl-C stops the server.", flush=True)
    serving.append(server)
    server.wait()
    if server.returncode not in (0, None):
        raise DemoError(f"the server stopped with status {server.returncode}")


def interrupted(signum, frame):
    raise KeyboardInterrupt  # `kill` (SIGTERM) stops the demo the same way Ctrl-C does


def main():
    p = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=whole_number, default=8080, help="port to serve on (default 8080)")
    p.add_argument("--steps", type=whole_number, default=400, help="training steps (default 400)")
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"),
                   help="address to serve on (default $HOST, else 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--dir", type=Path, default=DEMO, help="folder for the corpus, checkpoint/run1 and the emulator's log (default .demo)")
    args = p.parse_args()
    if args.steps < 1 or not 0 < args.port < 65536:
        p.error("--steps must be at least 1 and --port from 1 to 65535")
    signal.signal(signal.SIGTERM, interrupted)
    try:
        demo(args)
    except (DemoError, EmulatorError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if serving:  # the way the demo ends: not an error, so `make demo` reports none
            print("\ndemo: stopped the server; done", file=sys.stderr)
            return 0
        print("\ndemo: interrupted; stopping everything it started ...", file=sys.stderr)
        return 130
    finally:
        stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where our server's cold start and memory go, phase by phase, in one fresh process.

    python bench/startup.py RUN_DIR [--rounds 5]

Each round is a new interpreter that does what `python -m app` does before it serves (imports, then
app.engine.GPT2's steps one by one: the GGUF model and its context, the
start-up forward pass), recording after each phase the wall and CPU seconds and the resident memory (anonymous
and file-backed, i.e. the memory-mapped model) from /proc. Prints a table of medians. CPU seconds
are the steadier figure on a busy machine.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

PHASES = r"""
import json, os, sys, time
def mark(name):
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    mb = {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
    print(json.dumps({"phase": name, "wall": time.time(), "cpu": time.process_time(), **mb}), flush=True)
mark("interpreter")
import uvicorn, app.logs
mark("import uvicorn")
import app.main
mark("import app.main (starlette, prometheus_client, llama.cpp bindings)")
from pathlib import Path
from app import engine
run_dir = Path(sys.argv[1])
hp = json.loads((run_dir / "hparams.json").read_text())
manifest = engine.check_export(run_dir, hp)
mark("check the export (hash the checkpoint index)")
llama = engine.LlamaModel(run_dir / "weights" / manifest["gguf"], hp["n_ctx"], engine.MAX_NSAMPLES, 1)
mark("load the GGUF model, make the context")
llama.prompt([llama.end_token])
mark("start-up forward pass")
"""


def one_round(run_dir):
    env = dict(os.environ, THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", PHASES, str(run_dir)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"bench/startup.py: the round failed: {proc.stderr.strip()[-500:]}")
    marks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rows, wall, cpu = [], started, 0.0
    for m in marks:
        rows.append({"phase": m["phase"], "wall_s": m["wall"] - wall, "cpu_s": m["cpu"] - cpu, "rss_mb": m["VmRSS"],
                     "anon_mb": m["RssAnon"], "file_mb": m["RssFile"], "peak_mb": m["VmHWM"]})
        wall, cpu = m["wall"], m["cpu"]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="an exported run folder (python -m finetune.export RUN_DIR)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if not (Path(args.run_dir) / "weights" / "manifest.json").is_file():
        sys.exit(f"bench/startup.py: {args.run_dir} has no weights/manifest.json (python -m finetune.export RUN_DIR)")
    if args.rounds < 1:
        sys.exit("bench/startup.py: --rounds must be at least 1")
    rounds = [one_round(Path(args.run_dir).resolve()) for _ in range(args.rounds)]
    print(f"{args.rounds} rounds, medians; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")
    print("| phase | wall (s) | CPU (s) | RSS after (MB) | anonymous | file-backed | peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, row in enumerate(rounds[0]):
        m = {key: float(np.median([r[i][key] for r in rounds])) for key in row if key != "phase"}
        print(f"| {row['phase']} | {m['wall_s']:.3f} | {m['cpu_s']:.3f} | {m['rss_mb']:.1f} | {m['anon_mb']:.1f} "
              f"| {m['file_mb']:.1f} | {m['peak_mb']:.1f} |")
    total = [sum(r["wall_s"] for r in rows) for rows in rounds], [sum(r["cpu_s"] for r in rows) for rows in rounds]
    print(f"| total | {np.median(total[0]):.3f} | {np.median(total[1]):.3f} | | | | |")


if __name__ == "__main__":
    main()

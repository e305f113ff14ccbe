"""Cold start, speed and memory of our server against gpt-2-simple and llama.cpp alone, on this machine.

    python bench/serve.py            # GPT-2 124M shape (random weights), then 355M and 774M; 25-40 minutes
    python bench/serve.py --quick    # a small model and few requests, ~2 minutes
    python bench/serve.py --llama-server-only   # only our server against llama-server, ~5 minutes

Contenders, each in its own processes: gpt-2-simple's load_gpt2 + a fresh generate() per request,
as gpt-2-cloud-run serves it (bench/baseline.py); our server started as `python -m app`, driven
over HTTP, at each --quant of the same checkpoint; and llama.cpp's engine alone on the same GGUF
file through llama-cpp-python's Llama class (bench/llama_alone.py); and llama-server, llama.cpp's
own C++ server (bench/llama_server.sh builds it once), side by side with ours over /v1/completions in
interleaved rounds (skipped with --quick unless --llama-server names a binary). Thread count is pinned through
the environment (THREADS, OMP/OpenBLAS/MKL/TF) and, for gpt-2-simple, start_tf_sess(threads=N).
Writes serve.md (the tables), serve.png (the chart) and serve.json (every raw figure) to --out.
"""
import argparse
import datetime
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bandwidth  # noqa: E402
from baseline import memory_mb  # noqa: E402
import make_model  # noqa: E402
import report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The benchmark starts here, and the model"  # same prompt for both contenders
END = "<|endoftext|>"


class BenchError(Exception):
    """A failure worth one line to the user (no traceback)."""


def settings_for(quick):
    if quick:
        return {"lengths": [20, 100, 500], "repeats": 2, "cold_repeats": 1, "growth_requests": 20,
                "baseline_growth_seconds": 8, "early_stop_length": 200, "early_stop_seeds": [1, 2, 3],
                "engine_threads": [1], "peer_rounds": 1}
    return {"lengths": [20, 100, 500], "repeats": 3, "cold_repeats": 3, "growth_requests": 200,
            "baseline_growth_seconds": 45, "early_stop_length": 300, "early_stop_seeds": [1, 2, 3, 4, 5],
            "engine_threads": [1, 2], "peer_rounds": 4}


def thread_env(threads):
    names = ["THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "RAYON_NUM_THREADS"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **{name: str(threads) for name in names})
    env.pop("PYTHONPATH", None)
    return env


# ----------------------------------------------------------------------------- models

SMALL_SHAPE = {"n_vocab": 1000, "n_ctx": 1024, "n_embd": 64, "n_head": 2, "n_layer": 2}
QUANTS = ["Q8_0", "F16", "Q5_K_M", "Q4_K_M"]  # the default first
BIG_SHAPES = {"355M": {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 24},
              "774M": {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1280, "n_head": 20, "n_layer": 36}}
BIG_SHAPE_QUANTS = ["Q8_0", "Q4_K_M"]


def build_models(args, models_dir, logs):
    """(speed model, early-stop model). Speed runs need every answer to run to its full length,
    which random weights do (the end marker is 1 of n_vocab tokens): the GPT-2 124M shape, or
    with --quick a small one. Early stop needs a model that learned to end its texts."""
    shape, name = (SMALL_SHAPE, "small-random") if args.quick else (make_model.SHAPE_124M, "gpt2-124M-random")
    speed = build_random(models_dir, name, shape, logs)
    if args.llama_server_only:
        return speed, None
    early = Path(args.tiny_model).resolve() if args.tiny_model else build_tiny_trained(models_dir)
    return speed, early


def build_random(models_dir, name, shape, logs):
    path = models_dir / name
    cmd = [sys.executable, str(ROOT / "bench" / "make_model.py"), str(path)]
    for key, value in shape.items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    run(cmd, f"building the {name} model (bench/make_model.py)", logs / f"make_model-{name}.log")
    return path


def quant_variant(model, quant, logs):
    """The run folder exported at `quant`: the model itself at its own quant, else a sibling folder
    sharing its checkpoint files (symbolic links) with its own weights/. Cached."""
    def quant_of(run_dir):
        manifest = run_dir / "weights" / "manifest.json"
        return manifest.exists() and json.loads(manifest.read_text()).get("quant")

    if quant_of(model) == quant:
        return model
    variant = model.parent / f"{model.name}-{quant}"
    spec = json.loads((model / make_model.SPEC_FILE).read_text()) if (model / make_model.SPEC_FILE).exists() else None
    if quant_of(variant) == quant and (variant / "spec.json").exists() and \
            json.loads((variant / "spec.json").read_text()) == spec:
        return variant
    shutil.rmtree(variant, ignore_errors=True)
    variant.mkdir(parents=True)
    for path in model.iterdir():
        if path.name not in ("weights", make_model.SPEC_FILE) and not path.name.startswith("."):
            (variant / path.name).symlink_to(path.resolve())
    run([sys.executable, "-m", "finetune.export", str(variant), "--quant", quant],
        f"exporting {model.name} as {quant}", logs / f"export-{model.name}-{quant}.log")
    (variant / "spec.json").write_text(json.dumps(spec))
    return variant


def build_tiny_trained(models_dir):
    """A small from-scratch model fine-tuned on short `<|startoftext|>...<|endoftext|>` texts with the
    product's own CLI (python -m finetune), so it learns to end its answers. Cached."""
    run_dir = models_dir / "tiny-trained"
    if (run_dir / "weights" / "model.gguf").exists():
        return run_dir
    models_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    subjects = ["the cat", "my neighbour", "this town", "the old bridge", "our team", "the weather",
                "a small boat", "the new library", "her garden", "the night train"]
    verbs = ["looks", "feels", "seems", "was", "is"]
    adjectives = ["quiet today", "really nice", "a bit strange", "far too loud", "just fine", "lovely"]
    with tempfile.TemporaryDirectory(dir=models_dir) as tmp:
        dataset = Path(tmp) / "corpus.txt"
        with open(dataset, "w") as f:
            for _ in range(400):
                text = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(adjectives)}."
                f.write(f"<|startoftext|>{text.capitalize()}<|endoftext|>\n")
        run([sys.executable, "-m", "finetune", "--from-scratch", "--n-layer", "2", "--n-embd", "64",
             "--n-head", "2", "--vocab-size", "1000", "--dataset", str(dataset), "--steps", "150",
             "--learning-rate", "0.003", "--accumulate-gradients", "1", "--sample-every", "0",
             "--save-every", "0", "--seed", "0", "--run-name", "run", "--checkpoint-dir", tmp],
            "training the small model (python -m finetune)", models_dir / "tiny-trained.log")
        shutil.rmtree(run_dir, ignore_errors=True)
        os.rename(Path(tmp) / "run", run_dir)
    return run_dir


def run(cmd, what, log_path):
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=thread_env(2))
    if code:
        raise BenchError(f"{what} failed (exit {code}); see {log_path}")


def measure_bandwidth(threads):
    """bench/bandwidth.py in a process with the thread settings of the contenders."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bandwidth.py"), str(threads)], cwd=ROOT,
                          capture_output=True, text=True, env=thread_env(threads))
    if proc.returncode:
        raise BenchError(f"measuring memory bandwidth failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout)


# ----------------------------------------------------------------------------- baseline

def run_baseline(model_dir, plan, log_path):
    """Run bench/baseline.py with a plan; returns (spawn time, list of its JSON events)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    spawned = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "baseline.py"), str(model_dir),
                               json.dumps(plan)], cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
                              env=thread_env(plan["threads"]), text=True)
    if proc.returncode:
        raise BenchError(f"gpt-2-simple baseline failed (exit {proc.returncode}); see {log_path}")
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return spawned, events


def bench_baseline(model, early_model, s, logs, progress):
    result = {"cold_start_s": [], "warm": {}, "early_stop": []}
    warm_plan = [[length, seed] for length in s["lengths"] for seed in range(1, s["repeats"] + 1)]
    for threads in (1, 2):
        progress.set_description(f"gpt-2-simple, {threads} thread(s)")
        plan = {"threads": threads, "prefix": PROMPT, "first_length": 20, "warm": warm_plan}
        if threads == 1:
            plan.update(growth_seconds=s["baseline_growth_seconds"], growth_length=20)
        spawned, events = run_baseline(model, plan, logs / f"baseline-{threads}.log")
        by = lambda name: [e for e in events if e["event"] == name]  # noqa: E731
        result["warm"][str(threads)] = {str(length): [{"seconds": e["seconds"], "tokens": e["length"]}
                                                      for e in by("warm") if e["length"] == length]
                                        for length in s["lengths"]}
        if threads == 1:
            result["cold_start_s"].append(by("first_answer")[0]["t"] - spawned)
            loaded = by("loaded")[0]["memory"]
            growth = by("growth")
            before = by("warm")[-1]["memory"]["rss"]
            result["memory"] = {
                "after_load_mb": loaded["rss"], "after_first_answer_mb": by("first_answer")[0]["memory"]["rss"],
                "peak_mb": by("done")[0]["memory"]["peak"], "growth_start_mb": before,
                "growth": [{"request": e["request"], "rss_mb": e["memory"]["rss"], "seconds": e["seconds"]}
                           for e in growth]}
        progress.update()
    progress.set_description("gpt-2-simple cold starts")
    for _ in range(s["cold_repeats"] - 1):
        spawned, events = run_baseline(model, {"threads": 1, "first_length": 20, "prefix": PROMPT},
                                       logs / "baseline-cold.log")
        result["cold_start_s"].append(next(e["t"] for e in events if e["event"] == "first_answer") - spawned)
    progress.update()
    progress.set_description("gpt-2-simple early stop")
    early = {"length": s["early_stop_length"], "prefix": "<|startoftext|>", "truncate": END,
             "seeds": s["early_stop_seeds"]}
    _, events = run_baseline(early_model, {"threads": 1, "early_stop": early}, logs / "baseline-early.log")
    result["early_stop"] = [{key: e[key] for key in ["seed", "length", "tokens_computed", "untruncated_tokens",
                                                     "seconds", "text"]}
                            for e in events if e["event"] == "early_stop"]
    progress.update()
    return result


# ----------------------------------------------------------------------------- our server

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server in a child process, on a free port, with its log in a file: `python -m app` serving
    model_dir (with the settings `env` adds), or the process `command(port)` starts (llama-server)."""

    def __init__(self, model_dir, threads, log_path, command=None, env=None):
        self.port = free_port()
        self.name = "llama-server" if command else "our server"
        env = {**thread_env(threads), **(env or {})}
        env.update(PORT=str(self.port), MODEL_DIR=str(model_dir))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.spawned = time.time()
        self.proc = subprocess.Popen(command(self.port) if command else [sys.executable, "-m", "app"], cwd=ROOT,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def first_answer(self, params=None, body=None, timeout=120):
        """Connect as soon as the port accepts and send one request: GET / with `params`, or POST
        /v1/completions with `body`, again while it answers 503 (llama-server listens before its model
        is loaded). Returns (seconds from process start to the first byte of the answer, memory when
        the port first accepted, answer)."""
        if body is None:
            request = f"GET /?{urllib.parse.urlencode(params)} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
            request = request.encode()
        else:
            data = json.dumps(body).encode()
            request = (f"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
        deadline = time.time() + timeout
        memory = None
        while True:
            sock = self._connect(deadline, timeout)
            memory = memory or self.memory()  # ours listens only once its model is loaded
            with sock:
                sock.sendall(request)
                chunks = [sock.recv(1)]
                first_byte = time.time() - self.spawned
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            head, _, answer = b"".join(chunks).partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 503") or time.time() > deadline:
                break
            time.sleep(0.005)
        if not head.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"{self.name} answered {head.splitlines()[0] if head else b''!r}: {answer[:200]!r}")
        return first_byte, memory, json.loads(answer)

    def _connect(self, deadline, timeout):
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with code {self.proc.returncode} before answering; "
                                 f"see {self.log_path}")
            try:
                return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
            except OSError:
                if time.time() > deadline:
                    raise BenchError(f"{self.name} did not accept connections within {timeout} s")
                time.sleep(0.005)

    def request(self, method, path, body=None, headers=None):
        """One request; returns (answer JSON, seconds on the client's clock)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        start = time.perf_counter()
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        answer = resp.read()
        seconds = time.perf_counter() - start
        conn.close()
        if resp.status != 200:
            raise BenchError(f"{self.name} answered {resp.status} to {method} {path} {body or ''}: {answer[:200]!r}")
        return json.loads(answer), seconds

    def post(self, body):
        return self.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})

    def get(self, **params):
        return self.request("GET", "/?" + urllib.parse.urlencode(params))

    def memory(self):
        return memory_mb(self.proc.pid)

    def cpu_seconds(self):
        """CPU time (user + system, all threads) the process has used so far: on a busy machine a
        steadier measure of start-up work than the wall clock."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def full_length(server, length, seed):
    """A speed sample of exactly `length` computed tokens: a seed whose text happens to reach the
    end marker (rare with random weights) is replaced by the next one, and counted."""
    for attempt in range(10):
        answer, seconds = server.get(prefix=PROMPT, length=length, temperature=0.7, seed=seed + 1000 * attempt)
        if answer["tokens"] == length:
            return {"seconds": seconds, "tokens": answer["tokens"], "server_seconds": answer["seconds"],
                    "seed": seed + 1000 * attempt, "early_stops_skipped": attempt}
    raise BenchError(f"our server stopped early on 10 seeds at length {length}")


def bench_ours(model, early_model, s, logs, progress):
    result = {"cold_start_s": [], "warm": {}, "early_stop": []}
    for threads in (1, 2):
        progress.set_description(f"our server, {threads} thread(s)")
        server = Server(model, threads, logs / f"ours-{threads}.log")
        try:
            cold, loaded, _ = server.first_answer({"prefix": PROMPT, "length": 20, "seed": 0})
            warm = result["warm"][str(threads)] = {}
            for length in s["lengths"]:
                warm[str(length)] = [full_length(server, length, seed) for seed in range(1, s["repeats"] + 1)]
            if threads == 1:
                result["cold_start_s"].append(cold)
                before = server.memory()["rss"]
                growth = []
                for n in tqdm(range(1, s["growth_requests"] + 1), desc="our server, memory growth",
                              leave=False, disable=None):
                    _, seconds = server.get(prefix=PROMPT, length=20, seed=n)
                    growth.append({"request": n, "rss_mb": server.memory()["rss"], "seconds": seconds})
                # The kernel's high-water mark lags per-thread RSS counters by a few pages: a sample
                # taken between its updates can read above it.
                peak = max([server.memory()["peak"]] + [g["rss_mb"] for g in growth])
                result["memory"] = {"after_load_mb": loaded["rss"], "peak_mb": peak,
                                    "growth_start_mb": before, "growth": growth}
        finally:
            server.stop()
        progress.update()
    progress.set_description("our server cold starts")
    for _ in range(s["cold_repeats"] - 1):
        server = Server(model, 1, logs / "ours-cold.log")
        try:
            result["cold_start_s"].append(server.first_answer({"prefix": PROMPT, "length": 20, "seed": 0})[0])
        finally:
            server.stop()
    progress.update()
    progress.set_description("our server early stop")
    server = Server(early_model, 1, logs / "ours-early.log")
    try:
        server.first_answer({"length": 1})
        for seed in s["early_stop_seeds"]:
            answer, seconds = server.get(prefix="<|startoftext|>", truncate=END, length=s["early_stop_length"],
                                         temperature=0.7, seed=seed)
            result["early_stop"].append({"seed": seed, "length": s["early_stop_length"],
                                         "tokens_computed": answer["tokens"], "stop_reason": answer["stop_reason"],
                                         "seconds": seconds, "text": answer["text"]})
    finally:
        server.stop()
    progress.update()
    return result


# ----------------------------------------------------------------------------- llama.cpp alone, quants, shapes

def run_llama_alone(model_dir, plan, log_path):
    """bench/llama_alone.py on the run's GGUF file; returns (spawn time, its JSON events)."""
    gguf = model_dir / "weights" / json.loads((model_dir / "weights" / "manifest.json").read_text())["gguf"]
    spawned = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "llama_alone.py"), str(gguf), json.dumps(plan)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=log, env=thread_env(plan["threads"]), text=True)
    if proc.returncode:
        raise BenchError(f"llama.cpp alone failed (exit {proc.returncode}); see {log_path}")
    return spawned, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def serve_figures(model_dir, threads, length, repeats, log_path):
    """Our server on model_dir: cold start, `repeats` answers of `length` tokens, peak RSS."""
    server = Server(model_dir, threads, log_path)
    try:
        cold, _, _ = server.first_answer({"prefix": PROMPT, "length": 20, "seed": 0})
        warm = [full_length(server, length, seed) for seed in range(1, repeats + 1)]
        return {"cold_start_s": cold, "warm": warm, "peak_mb": server.memory()["peak"]}
    finally:
        server.stop()


def llama_figures(model_dir, threads, length, repeats, log_path):
    plan = {"threads": threads, "prefix": PROMPT, "first_length": 20,
            "warm": [[length, seed] for seed in range(1, repeats + 1)]}
    spawned, events = run_llama_alone(model_dir, plan, log_path)
    by = lambda name: [e for e in events if e["event"] == name]  # noqa: E731
    return {"cold_start_s": by("first_answer")[0]["t"] - spawned,
            "warm": [{"seconds": e["seconds"], "tokens": e["tokens"]} for e in by("warm")],
            "peak_mb": by("done")[0]["memory"]["peak"]}


def bench_engines(model, s, logs, progress):
    """Every quant of the speed model: our server and llama.cpp alone, 100 tokens, at each of
    s["engine_threads"] threads."""
    result = {}
    for quant in QUANTS:
        variant = quant_variant(model, quant, logs)
        entry = result[quant] = {"gguf_mb": os.path.getsize(variant / "weights" / "model.gguf") / 1e6}
        for threads in s["engine_threads"]:
            progress.set_description(f"{quant}, {threads} thread(s): our server, llama.cpp alone")
            entry[str(threads)] = {
                "server": serve_figures(variant, threads, 100, s["repeats"], logs / f"ours-{quant}-{threads}.log"),
                "llama": llama_figures(variant, threads, 100, s["repeats"], logs / f"llama-{quant}-{threads}.log")}
        progress.update()
    return result


def bench_shapes(models_dir, names, s, logs, progress):
    """The bigger GPT-2 shapes at Q8_0 and Q4_K_M: our server, 1 thread, 100 tokens, peak RSS."""
    result = {}
    for name in names:
        progress.set_description(f"building the {name} shape")
        model = build_random(models_dir, f"gpt2-{name}-random", BIG_SHAPES[name], logs)
        result[name] = {"hparams": BIG_SHAPES[name]}
        for quant in BIG_SHAPE_QUANTS:
            variant = quant_variant(model, quant, logs)
            progress.set_description(f"{name} {quant}: our server")
            result[name][quant] = serve_figures(variant, 1, 100, s["repeats"], logs / f"ours-{name}-{quant}.log")
            result[name][quant]["gguf_mb"] = os.path.getsize(variant / "weights" / "model.gguf") / 1e6
        progress.update()
    return result


# ----------------------------------------------------------------------------- llama-server, side by side

# llama-server samples as ours does by default (temperature over the whole vocabulary), computes every
# token asked for (ignore_eos) and, like ours, computes the prompt afresh for each request.
LLAMA_SERVER_SAMPLING = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "ignore_eos": True,
                         "cache_prompt": False}


def find_llama_server(path, quick):
    """The llama-server binary: `path`, else bench/llama_server.sh's (compiled on first use: minutes);
    None with --quick (the tests must not need it)."""
    if path:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise BenchError(f"--llama-server {path} is not an executable file")
        return Path(path).resolve()
    if quick:
        return None
    proc = subprocess.run(["sh", str(ROOT / "bench" / "llama_server.sh")], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True)  # its progress goes to our stderr
    if proc.returncode:
        raise BenchError(f"building llama-server failed (exit {proc.returncode}): bench/llama_server.sh")
    return Path(proc.stdout.strip().splitlines()[-1])


def completion(model, server, length, seed):
    body = {"model": model.resolve().name, "prompt": PROMPT, "max_tokens": length, "temperature": 0.7, "seed": seed}
    return body | (LLAMA_SERVER_SAMPLING if server.name == "llama-server" else {})


def peer_figures(model, command, repeats, log_path):
    """One server, 1 thread: cold start to a 20-token /v1/completions answer, `repeats` answers of 100
    tokens, peak RSS (the kernel's high-water mark) at the end."""
    server = Server(model, 1, log_path, command)
    try:
        cold, _, _ = server.first_answer(body=completion(model, server, 20, 0))
        cold_cpu = server.cpu_seconds()
        warm = []
        for seed in range(1, repeats + 1):
            for attempt in range(10):  # ours stops at a sampled end token: rare with random weights
                cpu = server.cpu_seconds()
                answer, seconds = server.post(completion(model, server, 100, seed + 1000 * attempt))
                # all 100 computed (completion_tokens counts the text's tokens again: random weights'
                # tokens re-encode differently)
                if answer["choices"][0]["finish_reason"] == "length":
                    break
            else:
                raise BenchError(f"{server.name} stopped early on 10 seeds at 100 tokens")
            warm.append({"seconds": seconds, "cpu_seconds": server.cpu_seconds() - cpu, "tokens": 100,
                         "seed": seed + 1000 * attempt})
        return {"cold_start_s": cold, "cold_start_cpu_s": cold_cpu, "warm": warm, "peak_mb": server.memory()["peak"]}
    finally:
        server.stop()


def bench_peer(model, binary, s, logs, progress):
    """Our server and llama-server on the same GGUF file, one thread each, in interleaved rounds (the
    order swapped each round) so that the machine's load falls on both alike."""
    gguf = model / "weights" / json.loads((model / "weights" / "manifest.json").read_text())["gguf"]
    n_ctx = json.loads((model / "hparams.json").read_text())["n_ctx"]
    # Our code compiled, as the image has it (Dockerfile: compileall): a cold start there compiles nothing.
    run([sys.executable, "-m", "compileall", "-q", "app"], "compiling app/", logs / "compileall.log")
    # As deployed: its defaults, but the model's context (ours keeps n_ctx positions too) and 1 thread.
    command = lambda port: [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),  # noqa: E731
                            "-t", "1", "-tb", "1", "-c", str(n_ctx)]
    rounds = []
    for r in range(s["peer_rounds"]):
        progress.set_description(f"our server vs llama-server, round {r + 1} of {s['peer_rounds']}")
        order = [("ours", None), ("llama_server", command)][::-1 if r % 2 else 1]
        rounds.append({name: peer_figures(model, cmd, s["repeats"], logs / f"peer-{name}-{r + 1}.log")
                       for name, cmd in order})
    progress.update()
    return {"llama_server": str(binary), "gguf": str(gguf), "gguf_mb": os.path.getsize(gguf) / 1e6,
            "rounds": rounds}


# ----------------------------------------------------------------------------- main

def machine():
    model_name = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    versions = {name: metadata.version(name) for name in
                ["numpy", "tensorflow-cpu", "gpt-2-simple", "llama-cpp-python", "tokenizers", "starlette", "uvicorn"]}
    return {"cpu": model_name, "cores": os.cpu_count(), "python": platform.python_version(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1), **versions}


def image_mb():
    """The serving image's size as tests/test_container.py last measured it (None if never run here)."""
    path = ROOT / "tests" / "out" / "container" / "report.json"
    return json.loads(path.read_text()).get("image_mb") if path.exists() else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small model and few requests")
    p.add_argument("--out", help="output folder (default bench/out, or bench/out/quick with --quick)")
    p.add_argument("--models", help="where built models are cached (default bench/out/models)")
    p.add_argument("--tiny-model", help="an exported small trained run folder (it must end its texts) for "
                   "the early-stop figure, instead of training one")
    p.add_argument("--repeats", type=int, help="runs per figure (default 3, 2 with --quick); fewer when time is short")
    p.add_argument("--shapes", default=None, help="bigger GPT-2 shapes to measure, comma-separated: 355M,774M "
                   "(the default; none with --quick); '' for none")
    p.add_argument("--llama-server", metavar="PATH", help="the llama-server binary to measure ours against "
                   "(default: bench/llama_server.sh's, compiled on first use; none with --quick)")
    p.add_argument("--llama-server-only", action="store_true",
                   help="only the side-by-side rounds of our server and llama-server")
    args = p.parse_args()
    shapes = [n for n in (args.shapes if args.shapes is not None else "" if args.quick else "355M,774M").split(",") if n]
    if set(shapes) - set(BIG_SHAPES):
        sys.exit(f"bench/serve.py: --shapes takes {', '.join(BIG_SHAPES)}, got {args.shapes!r}")
    out = Path(args.out or ROOT / "bench" / "out" / ("quick" if args.quick else "")).resolve()
    if args.tiny_model and not (Path(args.tiny_model) / "weights" / "manifest.json").exists():
        sys.exit(f"bench/serve.py: --tiny-model {args.tiny_model} has no weights/manifest.json "
                 "(an exported run folder is needed: python -m finetune.export RUN_DIR)")
    if out.exists() and not out.is_dir():
        sys.exit(f"bench/serve.py: --out {out} is a file, not a folder")
    if args.llama_server_only and args.quick and not args.llama_server:
        sys.exit("bench/serve.py: --llama-server-only with --quick needs --llama-server PATH")
    s = settings_for(args.quick)
    if args.repeats:
        if args.repeats < 1:
            sys.exit("bench/serve.py: --repeats must be at least 1")
        s.update(repeats=args.repeats, cold_repeats=min(s["cold_repeats"], args.repeats))
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    started = time.time()
    try:
        binary = find_llama_server(args.llama_server, args.quick)
        steps = 2 if args.llama_server_only else 10 + len(QUANTS) + len(shapes) + bool(binary)
        with tqdm(total=steps, desc="models", disable=None) as progress:
            models_dir = Path(args.models or ROOT / "bench" / "out" / "models").resolve()
            model, early_model = build_models(args, models_dir, logs)
            progress.update()
            if not args.llama_server_only:
                progress.set_description("memory bandwidth")
                bw = {str(t): measure_bandwidth(t) for t in (1, 2)}
                progress.update()
                baseline = bench_baseline(model, early_model, s, logs, progress)
                ours = bench_ours(model, early_model, s, logs, progress)
                engines = bench_engines(model, s, logs, progress)
                big = bench_shapes(models_dir, shapes, s, logs, progress)
            peer = bench_peer(model, binary, s, logs, progress) if binary else None
    except BenchError as e:
        sys.exit(f"bench/serve.py: {e}")
    except KeyboardInterrupt:  # the finally blocks above have stopped every process it started
        sys.exit("bench/serve.py: interrupted; no figures written")
    results = {
        "date": datetime.date.today().isoformat(), "mode": "quick" if args.quick else "full",
        "machine": machine(), "settings": s, "prompt": PROMPT, "wall_seconds": round(time.time() - started, 1),
        "model": {"run_dir": str(model), "hparams": json.loads((model / "hparams.json").read_text()),
                  "weights": "random weights, Q8_0",
                  "weight_bytes_per_token": bandwidth.weight_bytes_per_token(model / "weights" / "model.gguf")},
    }
    if not args.llama_server_only:
        results |= {
            "early_stop_model": {"run_dir": str(early_model),
                                 "hparams": json.loads((early_model / "hparams.json").read_text())},
            "bandwidth_bytes_per_s": bw,  # per thread count: {"numpy_sum": .., "blas_gemv": ..}
            "contenders": {"baseline": baseline, "ours": ours},
            "engines": engines,  # per quant, per thread count: our server and llama.cpp alone
            "shapes": big,
            "image_mb": image_mb(),
        }
    results["peer"] = peer  # our server and llama-server, round by round
    results["summary"] = report.summarize(results)
    print(report.write_outputs(out, results, "serve", report.table, report.chart))
    print(f"\nwrote {out / 'serve.md'}, {out / 'serve.png'}, {out / 'serve.json'}")


if __name__ == "__main__":
    main()

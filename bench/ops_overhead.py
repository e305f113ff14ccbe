"""Do API keys, /metrics and trace-correlated logs slow a generation? Two `python -m app` on the same model,
one with all three on (API_KEYS, METRICS=1, GOOGLE_CLOUD_PROJECT, a traceparent on every request) and one
with all off, asked in turn (interleaved, so machine load hits both alike) for the same generation;
prints tokens per second of each and the median of each round's ratio. First, in this process, what the
added code costs per request and per token (timeit), which the end-to-end figure cannot resolve on a busy machine.

    python bench/ops_overhead.py RUN_DIR [--rounds 8] [--length 100]
"""
import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEY = "overhead-key-0123456789"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run_dir, **env):
    port = free_port()
    env = {**os.environ, "MODEL_DIR": str(run_dir), "PORT": str(port), "HOST": "127.0.0.1", **env}
    env = {name: value for name, value in env.items() if value is not None}  # None: unset (API_KEYS="" refuses)
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.head(url + "/", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"the server on {run_dir} did not start")


def micro():
    sys.path.insert(0, str(ROOT))
    from app import auth, metrics, tracing

    def per_call(function, n=20000):
        return min(timeit.repeat(function, number=n, repeat=5)) / n * 1e6

    keys = [KEY.encode(), b"another-key-0123456789"]
    traceparent = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    metrics._request.set({"arrived": time.perf_counter(), "first_token": False})
    print(f"per request: key check (2 keys) {per_call(lambda: auth.known(KEY.encode(), keys)):.2f} us, "
          f"trace fields {per_call(lambda: tracing.trace_fields(traceparent, 'p')):.2f} us")
    print(f"per token: metrics {per_call(metrics.Timing().token):.3f} us")

    async def endpoint(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def nothing(message):
        pass

    async def calls(app, n=2000):
        for _ in range(n):
            await app({"type": "http", "method": "POST", "path": "/", "state": {"log": {"tokens": 100}},
                       "headers": [(b"traceparent", traceparent["traceparent"].encode())]}, None, nothing)

    for name, app in (("no middleware", endpoint), ("Metrics", metrics.Metrics(endpoint, routes=[])),
                      ("Trace", tracing.Trace(endpoint, project_id="p"))):
        seconds = min(timeit.repeat(lambda: asyncio.run(calls(app)), number=1, repeat=5)) / 2000
        print(f"an empty request through {name}: {seconds * 1e6:.2f} us")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--length", type=int, default=100)
    args = parser.parse_args()
    micro()
    on = start(args.run_dir, API_KEYS=KEY, METRICS="1", GOOGLE_CLOUD_PROJECT="overhead")
    off = start(args.run_dir, API_KEYS=None, API_KEYS_FILE=None, METRICS="0", GOOGLE_CLOUD_PROJECT="")
    headers = {"on": {"Authorization": f"Bearer {KEY}",
                      "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}, "off": {}}
    body = {"prefix": "The cat ", "length": args.length, "seed": 1, "temperature": 1.0, "top_k": 0}
    rates = {"on": [], "off": []}
    try:
        for i in range(args.rounds + 1):  # round 0 warms both up and is not counted
            for name, (_, url) in (("on", on), ("off", off))[::1 if i % 2 else -1]:  # alternate who goes first
                started = time.perf_counter()
                answer = httpx.post(url + "/", json=body, headers=headers[name], timeout=300).json()
                if i:
                    rates[name].append(answer["tokens"] / (time.perf_counter() - started))
        if httpx.get(on[1] + "/metrics", timeout=10).status_code != 200:
            sys.exit("metrics are not on in the 'on' server")
    finally:
        for proc, _ in (on, off):
            proc.terminate()
            proc.wait(timeout=15)
    for name in ("on", "off"):
        print(f"{name:>3}: median {statistics.median(rates[name]):.1f} tokens/s "
              f"(min {min(rates[name]):.1f}, max {max(rates[name]):.1f}, {args.rounds} requests of {args.length})")
    ratios = [on / off for on, off in zip(rates["on"], rates["off"])]  # each round's pair ran back to back
    print(f"on / off: {statistics.median(ratios):.3f} (median of the rounds' ratios; "
          f"quartiles {statistics.quantiles(ratios, n=4)[0]:.3f} to {statistics.quantiles(ratios, n=4)[2]:.3f})")


if __name__ == "__main__":
    main()

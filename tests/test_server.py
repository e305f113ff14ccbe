"""The HTTP API over real HTTP: `python -m app` in a subprocess (TensorFlow and NumPy made unimportable in it)
on a free port, driven with httpx.

Two models: the trained `tiny_run` (it ends its texts, for stop reasons and parity of GET/POST), and a
larger random one written here in the export format, slow enough (a few ms per token) that requests
overlap: queueing, 429s, client disconnects and SIGTERM during a generation.
"""
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from finetune.gguf_export import variable_shapes, write_gguf

ROOT = Path(__file__).resolve().parent.parent
# python -m app, where importing TensorFlow or NumPy fails: every server start_server launches shows that
# serving needs neither (the image has no TensorFlow; NumPy is installed but would cost 20 MB and 50 ms).
RUN_WITHOUT_TF_OR_NUMPY = ("import sys; sys.modules['tensorflow'] = sys.modules['numpy'] = None; import runpy; "
                           "runpy.run_module('app', run_name='__main__', alter_sys=True)")


class Server:
    def __init__(self, proc, url, log_path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def logs(self):
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]


def start_server(model_dir, port, log_path, command=None, **env):
    env = {**os.environ, "MODEL_DIR": str(model_dir), "PORT": str(port), "HOST": "127.0.0.1", **env}
    log = open(log_path, "w")
    proc = subprocess.Popen(command or [sys.executable, "-c", RUN_WITHOUT_TF_OR_NUMPY], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            if httpx.head(url + "/", timeout=1).status_code == 200:
                return Server(proc, url, log_path)
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{log_path.read_text()}")
        time.sleep(0.05)


def stop_server(server):
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()


@contextlib.contextmanager
def running_server(model_dir, port, log_path, **env):
    server = start_server(model_dir, port, log_path, **env)
    try:
        yield server
    finally:
        stop_server(server)


def write_random_run(run_dir, tokenizer_from, n_layer=2, n_embd=768, n_head=12, seed=0, nan=False, final_gain=1.0):
    """A random-weights run folder in the export format (what the server reads: checkpoint name,
    .index hash, weights/model.gguf (Q8_0, as served by default) and manifest.json), with a trained
    run's tokenizer."""
    run_dir.mkdir(parents=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(tokenizer_from / name, run_dir / name)
    n_vocab = json.loads((tokenizer_from / "hparams.json").read_text())["n_vocab"]
    hparams = {"n_vocab": n_vocab, "n_ctx": 1024, "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer}
    (run_dir / "hparams.json").write_text(json.dumps(hparams))
    (run_dir / "checkpoint").write_text('model_checkpoint_path: "model-1"\nall_model_checkpoint_paths: "model-1"\n')
    (run_dir / "model-1.index").write_bytes(b"random weights " + str(seed).encode())
    (run_dir / "weights").mkdir()
    rng = np.random.default_rng(seed)
    values = {name: np.ones(shape, np.float32) if name.endswith("/g") else rng.normal(0, 0.02, shape).astype(np.float32)
              for name, shape in variable_shapes(hparams).items()}
    # Keep the end token improbable (logit about -25), so that generations run to their full length:
    # the final layer norm's bias points one way, the end token's embedding the other. (A prompt
    # without prefix starts from the end token at position 0: wpe[0] cancels its embedding there.)
    direction = rng.normal(0, 1, n_embd).astype(np.float32)
    direction *= 5 / np.linalg.norm(direction)
    end_token = json.loads((tokenizer_from / "encoder.json").read_text())["<|endoftext|>"]
    values["model/ln_f/b"] = direction
    values["model/wte"][end_token] = -direction
    values["model/wpe"][0] += direction
    if nan:
        values["model/h0/mlp/c_fc/b"][0] = np.nan
    values["model/ln_f/g"] *= final_gain
    quant = "F32" if nan or final_gain != 1 else "Q8_0"  # llama.cpp won't quantize NaN; F16 can't hold big gains
    write_gguf(str(run_dir / "weights" / "model.gguf"), values, hparams, str(run_dir), quant)
    manifest = {"checkpoint": "model-1", "hparams": hparams, "gguf": "model.gguf", "quant": quant,
                "index_sha256": hashlib.sha256((run_dir / "model-1.index").read_bytes()).hexdigest()}
    (run_dir / "weights" / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    from conftest import find_free_port

    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(tiny_run, find_free_port(), log, ALLOWED_ORIGINS="http://allowed.example") as s:
        yield s


@pytest.fixture(scope="module")
def slow_run(tiny_run, tmp_path_factory):
    return write_random_run(tmp_path_factory.mktemp("slow") / "run1", tiny_run)


@pytest.fixture(scope="module")
def slow_server(slow_run, tmp_path_factory):
    from conftest import find_free_port

    log = tmp_path_factory.mktemp("slow_server") / "server.log"
    with running_server(slow_run, find_free_port(), log) as s:
        yield s


def client_ports(server):
    """The client ports of the connections the server process holds open."""
    port = int(server.url.rsplit(":", 1)[1])
    return {c.raddr.port for c in psutil.Process(server.proc.pid).net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port}


def wait_for_new_client(server, before, timeout=30):
    """Until the server holds a connection that is not in `before`: a request sent meanwhile reached it
    (sleeping a fixed time instead is not enough on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while not client_ports(server) - before:
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.02)


def read_sse(response):
    """Server-Sent Events as a browser reads them: (event name, data) per blank-line-ended block."""
    events, name, data = [], "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                events.append((name, json.loads("\n".join(data))))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return events


# ---------------------------------------------------------------- routes and parameters


def test_get_generates(server):
    # prefix "": gpt-2-simple's start (the run's default whole text may be empty in 8 tokens of this model)
    r = httpx.get(server.url + "/", params={"length": 8, "seed": 1, "prefix": ""}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"text", "tokens", "stop_reason", "seconds"}
    assert isinstance(body["text"], str) and 1 <= body["tokens"] <= 8
    assert body["stop_reason"] in ("length", "end_token", "truncate") and body["seconds"] >= 0


def test_post_json_matches_get(server):
    params = {"length": 20, "temperature": 0.9, "top_k": 5, "prefix": "<|startoftext|>my dog", "seed": 42}
    got = httpx.get(server.url + "/", params=params, timeout=30).json()
    posted = httpx.post(server.url + "/", json=params, timeout=30).json()
    assert posted["text"] == got["text"] and posted["tokens"] == got["tokens"]
    assert got["text"].startswith("<|startoftext|>my dog")
    # A bare POST (no body) uses every default.
    assert httpx.post(server.url + "/", timeout=30).status_code == 200
    # Content-Type parameters besides a UTF-8 charset are fine.
    for content_type in ("application/json; charset=UTF-8", 'Application/JSON; charset="utf-8"; x=y'):
        r = httpx.post(server.url + "/", content=json.dumps(params), headers={"Content-Type": content_type},
                       timeout=30)
        assert r.status_code == 200 and r.json()["text"] == got["text"], (content_type, r.text)


def test_seed_temperature_top_k_top_p(server):
    def text(**params):
        return httpx.post(server.url + "/", json={"length": 15, "prefix": "<|startoftext|>", **params},
                          timeout=30).json()["text"]

    assert text(seed=5) == text(seed=5)
    assert len({text(seed=s, temperature=1.5) for s in range(6)}) > 1
    assert text(top_k=1, seed=1) == text(top_k=1, seed=2)  # greedy: the seed does not matter
    assert text(top_p=1e-6, seed=1) == text(top_k=1, seed=2)  # a tiny nucleus is greedy too
    assert text(top_p=0.9, top_k=1, seed=3) == text(top_p=0.9, seed=3)  # top_p > 0 overrides top_k


def test_prefix_truncate_include_prefix(server):
    base = {"prefix": "<|startoftext|>my dog", "length": 60, "top_k": 1}
    ended = httpx.post(server.url + "/", json=base, timeout=30).json()
    # the trained model ends its texts: stopped early, at its run's default truncate (<|endoftext|>: the
    # run is trained on delimited texts, tests/test_whole_texts.py)
    assert ended["stop_reason"] == "truncate"
    assert ended["tokens"] < 60 and "<|endoftext|>" not in ended["text"]
    assert ended["text"].startswith("<|startoftext|>my dog")

    cut = httpx.post(server.url + "/", json={**base, "truncate": ".", "include_prefix": False}, timeout=30).json()
    assert cut["stop_reason"] == "truncate"
    assert ended["text"].startswith("<|startoftext|>my dog" + cut["text"] + ".")
    assert not cut["text"].startswith("<|startoftext|>")
    kept = httpx.get(server.url + "/", params={**base, "truncate": ".", "include_prefix": "true"}, timeout=30).json()
    assert kept["text"] == "<|startoftext|>my dog" + cut["text"]


def test_nsamples(server):
    body = httpx.post(server.url + "/", json={"nsamples": 3, "length": 10, "seed": 3, "prefix": "<|startoftext|>"},
                      timeout=30).json()
    assert len(body["texts"]) == 3 and body["text"] == body["texts"][0]
    assert len(body["stop_reasons"]) == 3 and body["tokens"] <= 30
    assert len(set(body["texts"])) > 1


def test_length_and_prefix_must_fit_the_context(server):
    r = httpx.get(server.url + "/", params={"length": 1023, "prefix": "my dog"}, timeout=30)
    assert r.status_code == 400 and r.json()["parameter"] == "length"
    assert "1024" in r.json()["error"] and "at most 10" in r.json()["error"]
    r = httpx.get(server.url + "/", params={"length": 1023, "top_k": 1, "temperature": 2, "prefix": ""}, timeout=60)
    assert r.status_code == 200  # the longest possible answer without a prefix
    r = httpx.get(server.url + "/", params={"length": 1023}, timeout=30)  # the run's default prefix takes room
    assert r.status_code == 400 and "with the default prefix <|startoftext|> (" in r.json()["error"]


def test_head_limits_and_page(server):
    r = httpx.head(server.url + "/")
    assert r.status_code == 200 and r.content == b""
    limits = httpx.get(server.url + "/limits").json()
    for name in ("length", "temperature", "top_k", "top_p", "prefix", "truncate", "include_prefix", "seed",
                 "nsamples", "stream"):
        assert "default" in limits[name], name
    assert limits["length"] == {"type": "integer", "default": 100, "min": 1, "max": 1023}
    assert limits["prefix_max_chars"] == 500 and limits["n_ctx"] == 1024
    page = httpx.get(server.url + "/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower()


def test_streaming_sse(server):
    for method, kwargs in (("GET", {"params": {"stream": "true", "length": 30, "prefix": "<|startoftext|>",
                                               "seed": 9}}),
                           ("POST", {"json": {"stream": True, "length": 30, "prefix": "<|startoftext|>",
                                              "seed": 9}})):
        with httpx.stream(method, server.url + "/", timeout=30, **kwargs) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = read_sse(r)
        pieces = [data["text"] for name, data in events if name == "message"]
        name, done = events[-1]
        assert name == "done" and len(pieces) >= 2
        assert "".join(pieces) == done["text"]
        assert done["tokens"] >= 1 and done["stop_reason"] in ("length", "end_token", "truncate") and "seconds" in done
        plain = httpx.post(server.url + "/", json={"length": 30, "prefix": "<|startoftext|>", "seed": 9},
                           timeout=30).json()
        assert plain["text"] == done["text"]


def test_cors(server):
    allowed = {"Origin": "http://allowed.example"}
    preflight = httpx.options(server.url + "/", headers={**allowed, "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://allowed.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()

    r = httpx.post(server.url + "/", json={"length": 2}, headers=allowed, timeout=30)
    assert r.headers["access-control-allow-origin"] == "http://allowed.example"
    bad = httpx.post(server.url + "/", json={"length": 0}, headers=allowed)  # errors are readable cross-origin
    assert bad.status_code == 400 and bad.headers["access-control-allow-origin"] == "http://allowed.example"

    other = httpx.options(server.url + "/", headers={"Origin": "http://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    r = httpx.get(server.url + "/limits", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_json_lines_logs(server):
    httpx.get(server.url + "/", params={"length": 3, "seed": 1}, timeout=30)
    httpx.get(server.url + "/", params={"length": "x"})
    entries = server.logs()  # every line parses as JSON (json.loads would raise otherwise)
    assert all(entry["severity"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") for entry in entries)
    generated = [e for e in entries if e.get("params", {}).get("length") == 3 and "tokens" in e]
    assert generated and generated[-1]["severity"] == "INFO" and generated[-1]["seconds"] >= 0
    assert generated[-1]["httpRequest"]["status"] == 200
    refused = [e for e in entries if e.get("parameter") == "length" and e["httpRequest"]["status"] == 400]
    assert refused and refused[-1]["severity"] == "WARNING"


# ---------------------------------------------------------------- start-up


def test_uvicorn_entry_point_and_default_origins(tiny_run, free_port, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    server = start_server(tiny_run, port, tmp_path / "log", command=command)
    try:
        r = httpx.get(server.url + "/", params={"length": 3}, headers={"Origin": "http://any.example"}, timeout=30)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    finally:
        stop_server(server)


@pytest.mark.parametrize("damage, message", [
    ("no_folder", "does not exist"),
    ("no_export", "python -m finetune.export"),
    ("stale_export", "python -m finetune.export"),
    ("corrupt_weights", "python -m finetune.export"),
    ("non_finite_weights", "not finite (NaN or infinity)"),
    ("corrupt_hparams", "hparams.json"),
    ("port_out_of_range", "PORT must be a number from 1 to 65535"),
    # issue 14, item 10: each of these was a traceback
    ("empty_gguf", "llama.cpp cannot load"),
    ("n_ctx_infinity", "n_ctx is inf, not an integer"),
    ("n_ctx_1e999", "n_ctx is inf, not an integer"),
    ("n_layer_fraction", "n_layer is 2.5, not an integer"),
    ("checkpoint_not_utf8", "checkpoint is not text"),
    ("port_superscript", "PORT must be a number from 1 to 65535, got '²'"),
    ("queue_size_superscript", "QUEUE_SIZE must be a whole number, got '²'"),
    ("queue_size_arabic_digits", "QUEUE_SIZE must be a whole number, got '١٢'"),
    ("bad_threads", "THREADS must be a whole number from 1 to 256, got '²'"),
])
def test_refuses_to_start_without_a_good_model(tiny_run, tmp_path, free_port, damage, message):
    run_dir = tmp_path / "run1"
    if damage == "non_finite_weights":  # a diverged run, exported by something that did not check
        write_random_run(run_dir, tiny_run, n_embd=64, n_head=2, nan=True)  # F32: llama.cpp won't quantize NaN
    elif damage != "no_folder":
        shutil.copytree(tiny_run, run_dir)
    if damage == "no_export":
        shutil.rmtree(run_dir / "weights")
    elif damage == "stale_export":
        (run_dir / "checkpoint").write_text('model_checkpoint_path: "model-999"\n')
        shutil.copy(next(run_dir.glob("model-*.index")), run_dir / "model-999.index")
    elif damage == "corrupt_weights":
        gguf = run_dir / "weights" / "model.gguf"
        gguf.write_bytes(gguf.read_bytes()[:1000])
    elif damage == "corrupt_hparams":
        (run_dir / "hparams.json").write_text("{not json")
    elif damage == "empty_gguf":
        (run_dir / "weights" / "model.gguf").write_bytes(b"")
    elif damage.startswith(("n_ctx", "n_layer")):
        name, value = {"n_ctx_infinity": ("n_ctx", "Infinity"), "n_ctx_1e999": ("n_ctx", "1e999"),
                       "n_layer_fraction": ("n_layer", "2.5")}[damage]
        text = (run_dir / "hparams.json").read_text()
        (run_dir / "hparams.json").write_text(re.sub(rf'"{name}": *[0-9]+', f'"{name}": {value}', text))
    elif damage == "checkpoint_not_utf8":
        (run_dir / "checkpoint").write_bytes(b'model_checkpoint_path: "model-\xff\xfe"\n')
    port = free_port()
    env = {**os.environ, "MODEL_DIR": str(run_dir), "PORT": str(port), "HOST": "127.0.0.1"}
    env.update({"port_out_of_range": {"PORT": "99999"}, "port_superscript": {"PORT": "²"},
                "queue_size_superscript": {"QUEUE_SIZE": "²"},
                "queue_size_arabic_digits": {"QUEUE_SIZE": "١٢"}, "bad_threads": {"THREADS": "²"}}.get(damage, {}))
    result = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TF_OR_NUMPY], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert message in output and "Traceback" not in output
    assert json.loads(output.strip().splitlines()[-1])["severity"] == "ERROR"


# ---------------------------------------------------------------- load, disconnects, shutdown


def test_head_stays_responsive_during_a_generation(slow_server):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        before = client_ports(slow_server)
        long = pool.submit(httpx.get, slow_server.url + "/", params={"length": 400, "seed": 1}, timeout=60)
        wait_for_new_client(slow_server, before)
        time.sleep(0.1)  # into the generation
        started = time.perf_counter()
        assert httpx.head(slow_server.url + "/").status_code == 200
        assert httpx.get(slow_server.url + "/limits").status_code == 200
        assert time.perf_counter() - started < 1  # not queued behind the generation (seconds)
        assert not long.done()  # it really overlapped the generation
        assert long.result().status_code == 200


def test_40_concurrent_requests(slow_server):
    process = psutil.Process(slow_server.proc.pid)

    def one(i):
        try:
            r = httpx.get(slow_server.url + "/", params={"length": 60, "seed": i}, timeout=120)
            return r.status_code, r.headers.get("retry-after"), r.json()
        except httpx.HTTPError as e:
            return "lost", None, repr(e)

    def burst():
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            return list(pool.map(one, range(40)))

    burst()  # warm up: the cache pages and the allocator reach their working size
    rss = [process.memory_info().rss]
    for _ in range(3):
        answers = burst()
        rss.append(process.memory_info().rss)
        statuses = [status for status, _, _ in answers]
        assert set(statuses) <= {200, 429}, answers
        assert 1 <= statuses.count(200) and 1 <= statuses.count(429)
        for status, retry_after, body in answers:
            if status == 429:
                assert int(retry_after) >= 1 and body["retry_after"] == int(retry_after) and "busy" in body["error"]
            else:
                assert body["tokens"] == 60
    assert slow_server.proc.poll() is None
    assert httpx.head(slow_server.url + "/").status_code == 200
    assert max(rss) - rss[0] < 10 * 2**20, [r >> 20 for r in rss]


def test_client_disconnect_stops_the_stream(slow_server):
    with httpx.stream("GET", slow_server.url + "/", params={"stream": "true", "length": 1000, "seed": 1},
                      timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one piece, then hang up
    started = time.perf_counter()
    r = httpx.get(slow_server.url + "/", params={"length": 5}, timeout=30)
    assert r.status_code == 200
    assert time.perf_counter() - started < 2  # far less than the 1000 tokens it was asked for
    time.sleep(0.2)
    stream_logs = [e for e in slow_server.logs() if e.get("params", {}).get("length") == 1000]
    assert stream_logs[-1]["disconnected"] is True and stream_logs[-1]["tokens"] < 1000


def test_sigterm_finishes_the_request_in_flight(slow_run, free_port, tmp_path):
    server = start_server(slow_run, free_port(), tmp_path / "log")
    try:
        results = {}

        def ask():
            results["response"] = httpx.get(server.url + "/", params={"length": 300, "seed": 1}, timeout=60)

        thread = threading.Thread(target=ask)
        before = client_ports(server)
        thread.start()
        wait_for_new_client(server, before)
        time.sleep(0.2)  # into the generation (300 tokens take over a second)
        assert thread.is_alive()
        server.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=30)
        assert results["response"].status_code == 200 and results["response"].json()["tokens"] == 300
        assert server.proc.wait(timeout=15) == 0
        with pytest.raises(httpx.TransportError):
            httpx.head(server.url + "/", timeout=2)
        assert any(e["message"] == "shut down" for e in server.logs())
    finally:
        stop_server(server)

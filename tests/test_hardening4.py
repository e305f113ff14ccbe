"""Issue 27, fourth hardening pass, the server's items: /metrics labels from fixed sets (3), API keys that
fail closed (4), and the smaller answers of item 8 (Triton generate and V2 infer parameters, a stream's
499 in /metrics, ASCII digits, trace headers, the metadata server's deadline, the bind, Ctrl-C while
starting). Each over real HTTP against `python -m app` in a subprocess (test_server's running_server),
or the real command."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import httpx
import pytest

from conftest import find_free_port
from test_operations import delta, scrape
from test_server import ROOT, RUN_WITHOUT_TF_OR_NUMPY, running_server, start_server, stop_server, write_random_run

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
KEY = "bom-key-" + "z" * 24
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "other"}


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """Random weights (milliseconds a token, no early end), no keys, metrics on, a project for trace fields,
    LOG_PROMPTS=1 (the query string is logged: it marks each request's line)."""
    folder = tmp_path_factory.mktemp("hardening4")
    model = write_random_run(folder / "run1", tiny_run)
    with running_server(model, find_free_port(), folder / "server.log", GOOGLE_CLOUD_PROJECT="p",
                        LOG_PROMPTS="1") as s:
        yield s


@pytest.fixture(scope="module")
def keyed(tiny_run, tmp_path_factory):
    """A key file as an editor might leave it: a byte-order mark, comments, blank lines; LOG_PROMPTS=1."""
    folder = tmp_path_factory.mktemp("hardening4_keyed")
    (folder / "keys").write_bytes(f"\ufeff{KEY}\n# production keys, rotate monthly\n#rotate-monthly\n\n"
                                  .encode("utf-8"))
    with running_server(tiny_run, find_free_port(), folder / "server.log", API_KEYS_FILE=str(folder / "keys"),
                        LOG_PROMPTS="1") as s:
        yield s


def line_of(server, marker, timeout=10):
    """The request log line whose URL holds `marker` (LOG_PROMPTS=1 logs the query string)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in server.logs() if marker in e.get("httpRequest", {}).get("requestUrl", "")]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, (marker, found)
            return found[0]
        time.sleep(0.05)


def run_app(env, timeout=60, **kwargs):
    """`python -m app` (no TensorFlow, no NumPy) to its end: (exit status, its output's lines)."""
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TF_OR_NUMPY], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HOST": "127.0.0.1", **env}, **kwargs)
    return done.returncode, (done.stdout + done.stderr).strip().splitlines()


# ---------------------------------------------------------------- item 3: /metrics cannot be grown


def test_made_up_methods_are_counted_as_other(server):
    before = scrape(server.url)
    for i in range(40):
        r = httpx.request(f"MADEUP{i}{'X' * 200}", server.url + "/limits", timeout=10)
        assert r.status_code == 405
    r = httpx.request("PATCH", server.url + "/limits", timeout=10)
    assert r.status_code == 405
    after = scrape(server.url)
    methods = {dict(labels).get("method") for name, labels in after if name == "gpt2_requests_total"}
    assert methods <= METHODS, methods - METHODS  # was: one series per made-up method, never freed
    assert delta(before, after, "gpt2_requests_total", route="/limits", method="other", status="405") == 40
    assert delta(before, after, "gpt2_requests_total", route="/limits", method="PATCH", status="405") == 1


# ---------------------------------------------------------------- item 4: API keys fail closed


@pytest.mark.parametrize("name, value, message", [
    ("API_KEYS", "", "API_KEYS is set but holds no key"),  # was: every route open
    ("API_KEYS", " , ", "API_KEYS is set but holds no key"),
    ("API_KEYS_FILE", "comments", "has no key"),  # was: the comment was a key
    ("API_KEYS_FILE", "fifo", "is not a regular file"),  # was: the start hung, reading it
    ("API_KEYS_FILE", "folder", "is not a regular file"),
])
def test_keys_that_are_set_but_hold_none_stop_the_start(tiny_run, tmp_path, name, value, message):
    path = tmp_path / "keys"
    if value == "comments":
        path.write_text("# production keys, rotate monthly\n\n   \n#\n")
    elif value == "fifo":
        os.mkfifo(path)
    elif value == "folder":
        path.mkdir()
    setting = str(path) if name == "API_KEYS_FILE" else value
    status, lines = run_app({"MODEL_DIR": str(tiny_run), "PORT": str(find_free_port()), name: setting})
    assert status == 1 and len(lines) == 1, lines
    entry = json.loads(lines[0])
    assert entry["severity"] == "ERROR" and message in entry["message"], entry


def test_the_key_file_has_no_comment_keys_and_no_byte_order_mark(keyed):
    def status(key):
        return httpx.post(keyed.url + "/v2/models/run1/generate", json={"text_input": "a", "max_tokens": 2},
                          headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code

    assert status(KEY) == 200  # was: 401, the file's BOM read as part of the first key
    assert status("#rotate-monthly") == 401  # was: 200, a comment taken for a key
    r = httpx.post(keyed.url + "/", json={"length": 2},
                   headers={"Authorization": "Bearer # production keys, rotate monthly"}, timeout=10)
    assert r.status_code == 401


def test_a_key_in_the_url_is_no_way_in_and_never_logged(keyed):
    r = httpx.get(keyed.url + "/", params={"length": 2, "api_key": KEY, "m": "url1"}, timeout=10)
    assert r.status_code == 401 and "in the URL is not accepted" in r.json()["error"]
    assert line_of(keyed, "m=url1")["error"] == "API key in the URL"
    r = httpx.post(keyed.url + "/v1/completions", params={"api_key": KEY, "m": "url2"},
                   json={"model": "run1", "max_tokens": 2}, timeout=10)
    assert r.status_code == 401
    # With the key in its header too: an unknown parameter (its value unsaid), the log's URL redacted.
    r = httpx.get(keyed.url + "/", params={"length": 2, "API_KEY": KEY, "m": "url3"},
                  headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 400 and KEY not in r.text
    line = line_of(keyed, "m=url3")
    assert "API_KEY=[redacted]" in line["httpRequest"]["requestUrl"] and "length=2" in line["httpRequest"]["requestUrl"]
    line_of(keyed, "m=url2")
    assert KEY not in keyed.log_path.read_text(encoding="utf-8")  # LOG_PROMPTS=1 logs query strings, not keys


def test_a_tab_after_bearer_is_a_malformed_header(keyed):
    for i, header in enumerate((f"Bearer\t{KEY}", f"Bearer{KEY}", "Bearer", f"Basic {KEY}")):
        r = httpx.get(keyed.url + "/", params={"length": 2, "m": f"tab{i}x"}, headers={"Authorization": header},
                      timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "Authorization header is malformed" in r.json()["error"], header  # was: "needs an API key"
        assert line_of(keyed, f"m=tab{i}x")["error"] == "malformed Authorization header"
    r = httpx.get(keyed.url + "/", params={"length": 2}, headers={"Authorization": f"Bearer   {KEY}"}, timeout=60)
    assert r.status_code == 200  # RFC 6750's 1*SP: more than one space is fine
    assert KEY not in keyed.log_path.read_text(encoding="utf-8")


# ---------------------------------------------------------------- item 8: Triton generate and V2 infer


def v2_infer(server, parameters, texts=("a",)):
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}],
            "parameters": parameters}
    return httpx.post(server.url + "/v2/models/run1/infer", json=body, timeout=60)


def generate(server, body):
    return httpx.post(server.url + "/v2/models/run1/generate", json=body, timeout=60)


def test_null_for_an_alias_means_absent(server):
    for body in ({"text_input": "a", "max_tokens": None, "length": 3},
                 {"text_input": "a", "parameters": {"length": 3, "max_new_tokens": None, "stop": None}},
                 {"text_input": "a", "max_tokens": None, "parameters": {"max_tokens": 3}}):
        r = generate(server, {**body, "parameters": {**body.get("parameters", {}), "seed": 1,
                                                      "include_prefix": False}})
        assert r.status_code == 200, (body, r.text)  # was: 400, "max_tokens and length are two names for length"
    r = v2_infer(server, {"max_tokens": None, "length": 3, "truncate": None, "stop": None, "seed": 1})
    assert r.status_code == 200, r.text


def test_prefix_beside_text_input_is_named_as_the_unknown_parameter(server):
    r = generate(server, {"text_input": "a", "prefix": "b"})
    assert r.status_code == 400 and r.json()["error"].startswith("unknown parameter 'prefix'")  # was: 'text_input'
    r = generate(server, {"text_input": "a", "parameters": {"prefix": "b"}})
    assert r.status_code == 400 and r.json()["error"].startswith("unknown parameter 'prefix'")
    r = v2_infer(server, {"prefix": "b"})
    assert r.status_code == 400 and r.json()["error"].startswith("unknown parameter 'prefix'")
    # The text's own checks still call it text_input.
    r = generate(server, {"text_input": "x" * 501})
    assert r.status_code == 400 and r.json()["error"].startswith("text_input must be")


@pytest.mark.parametrize("parameters", [[], "", 0, False])
def test_parameters_that_are_not_an_object_are_a_400(server, parameters):
    r = generate(server, {"text_input": "a", "parameters": parameters})
    assert r.status_code == 400 and '"parameters" must be an object' in r.json()["error"]  # was: 200 for [] and ""
    r = v2_infer(server, parameters)
    assert r.status_code == 400 and '"parameters" must be an object' in r.json()["error"]


def test_a_stream_whose_client_leaves_is_499_in_metrics_as_in_the_log(server):
    before = scrape(server.url)
    with httpx.stream("GET", server.url + "/", params={"stream": "true", "length": 1000, "seed": 1},
                      timeout=60) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # it generates now; then hang up
    deadline = time.monotonic() + 15
    while not (left := [e for e in server.logs() if e.get("disconnected")]):
        assert time.monotonic() < deadline, "the server never noticed the client leave"
        time.sleep(0.05)
    assert [e["httpRequest"]["status"] for e in left] == [499]
    after = scrape(server.url)
    assert delta(before, after, "gpt2_requests_total", route="/", method="GET", status="499") == 1  # was: 200
    assert delta(before, after, "gpt2_requests_total", route="/", method="GET", status="200") == 0
    assert delta(before, after, "gpt2_client_disconnects_total") == 1


@pytest.mark.parametrize("name, value", [("seed", "\uff15"), ("length", "\uff13"), ("seed", "\u0665"),
                                         ("temperature", "0.\uff15"), ("top_p", "\uff10.5")])
def test_numbers_are_ascii_digits_only(server, name, value):
    r = httpx.get(server.url + "/", params={"length": 3, name: value}, timeout=60)
    assert r.status_code == 400 and r.json()["parameter"] == name, r.text  # was: seed=５ was seed 5
    r = generate(server, {"text_input": "a", "max_tokens": 3, name: value})
    assert r.status_code == 400, r.text


# ---------------------------------------------------------------- item 8: trace headers


@pytest.mark.parametrize("headers, trace", [
    ([("traceparent", f"00-{TRACE}-{SPAN}-01")], TRACE),
    ([("traceparent", f"ff-{TRACE}-{SPAN}-01")], None),  # version ff is invalid (was: taken)
    ([("traceparent", f"00-{'0' * 32}-{SPAN}-01")], None),
    ([("traceparent", f"00-{TRACE}-{'0' * 16}-01")], None),
    ([("traceparent", f"00-{TRACE}-{SPAN}-01-more")], None),  # version 00 is exactly 55 characters
    ([("traceparent", f"cc-{TRACE}-{SPAN}-01-what-the-future-will-be-like")], TRACE),  # a later version may add
    ([("traceparent", f"cc-{TRACE}-{SPAN}-01.what-the-future-will-be-like")], None),
    ([("traceparent", f"00-{TRACE.upper()}-{SPAN}-01")], None),
    # Two traceparent headers: neither (W3C's test suite); X-Cloud-Trace-Context then, if valid.
    ([("traceparent", f"00-{TRACE}-{SPAN}-01"), ("traceparent", f"00-{'1' * 32}-{SPAN}-01")], None),
    ([("traceparent", f"00-{TRACE}-{SPAN}-01"), ("traceparent", f"00-{TRACE}-{SPAN}-01"),
      ("X-Cloud-Trace-Context", f"{'2' * 32}/1;o=1")], "2" * 32),
    ([("X-Cloud-Trace-Context", f"{TRACE}/{int(SPAN, 16)};o=1")], TRACE),
    ([("X-Cloud-Trace-Context", f"{'0' * 32}/5;o=1")], None),  # all-zero trace id (was: taken)
    ([("X-Cloud-Trace-Context", f"{TRACE}/5;o=1"), ("X-Cloud-Trace-Context", f"{TRACE}/5;o=1")], None),
    ([("traceparent", f"ff-{TRACE}-{SPAN}-01"), ("X-Cloud-Trace-Context", f"{'3' * 32};o=1")], "3" * 32),
])
def test_trace_headers_follow_w3c_and_google(server, headers, trace):
    marker = f"t{abs(hash(repr(headers)))}"
    r = httpx.get(server.url + "/v2/health/live", params={"m": marker}, headers=headers, timeout=10)
    assert r.status_code == 200
    line = line_of(server, f"m={marker}")
    assert line.get("logging.googleapis.com/trace") == (trace and f"projects/p/traces/{trace}"), (headers, line)


# ---------------------------------------------------------------- item 8: start-up


def test_a_metadata_server_that_trickles_holds_the_start_about_1_s(tiny_run, tmp_path):
    """K_SERVICE set, no GOOGLE_CLOUD_PROJECT: a stand-in metadata server that answers one byte every 0.5 s
    (was: the port stayed closed past 40 s; urlopen's timeout bounds each read, not the answer)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted, done = [], threading.Event()

    def trickle():
        listener.settimeout(60)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        accepted.append(time.time())
        with conn:
            conn.recv(4096)
            for byte in b"HTTP/1.1 200 OK\r\nMetadata-Flavor: Google\r\n" * 100:
                if done.wait(0.5):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    threading.Thread(target=trickle, daemon=True).start()
    env = {"K_SERVICE": "gpt2", "GCE_METADATA_HOST": f"127.0.0.1:{listener.getsockname()[1]}",
           "GOOGLE_CLOUD_PROJECT": ""}
    try:
        s = start_server(tiny_run, find_free_port(), tmp_path / "server.log", **env)
        try:
            [warning] = [e for e in s.logs() if "metadata server" in e["message"]]
            [serving] = [e for e in s.logs() if e["message"].startswith("serving")]
        finally:
            stop_server(s)
    finally:
        done.set()
        listener.close()
    assert warning["severity"] == "WARNING" and "within 1 s" in warning["message"]
    gave_up = datetime.strptime(warning["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
    assert accepted and gave_up - accepted[0] < 2.5, gave_up - accepted[0]  # about 1 s in all
    assert serving["trace_project"] is None


def test_a_port_in_use_or_an_address_not_here_is_one_line_and_exit_1(tiny_run):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        status, lines = run_app({"MODEL_DIR": str(tiny_run), "PORT": str(port)})
    assert status == 1 and len(lines) == 1, lines  # was: "serving ..." logged first, then uvicorn's errors
    entry = json.loads(lines[0])
    assert entry["severity"] == "ERROR" and entry["message"] == \
        f"cannot listen on HOST '127.0.0.1' PORT {port}: Address already in use"
    # 192.0.2.1 (TEST-NET-1, RFC 5737) is no address of this machine
    status, lines = run_app({"MODEL_DIR": str(tiny_run), "PORT": str(find_free_port()), "HOST": "192.0.2.1"})
    assert status == 1 and len(lines) == 1, lines
    assert json.loads(lines[0])["message"].startswith("cannot listen on HOST '192.0.2.1' PORT ")


def catches(pid, sig):
    """Whether process `pid` has a handler for `sig` (Linux: /proc/PID/status's SigCgt mask)."""
    status = open(f"/proc/{pid}/status").read()
    return bool(int(status.split("SigCgt:")[1].split()[0], 16) & (1 << (sig - 1)))


@pytest.mark.parametrize("after", [0, 0.15])
def test_ctrl_c_while_starting_is_one_line_and_no_traceback(tiny_run, after):
    """Ctrl-C `after` seconds past the earliest moment the app can catch it: Python's own start (about
    0.1 s on a busy machine, where no code of ours runs yet) is outside anything the app can answer.
    SIGTERM, which Python leaves alone, is caught from that moment on: it marks it."""
    env = {**os.environ, "MODEL_DIR": str(tiny_run), "PORT": str(find_free_port()), "HOST": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        started = time.monotonic()
        while not catches(proc.pid, signal.SIGTERM):
            assert time.monotonic() - started < 10 and proc.poll() is None
            time.sleep(0.001)
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output  # was: a traceback
    lines = output.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 1, output
    assert json.loads(lines[0])["message"] == "stopped while starting (SIGINT)"

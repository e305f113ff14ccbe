"""Issue 18, third hardening pass, the server's items (2, 7, 8, 9, 10, 12): each over real HTTP against
`python -m app` in a subprocess (test_server's running_server), through the official clients (`openai`,
`tritonclient`) where a client would meet it."""
import json
import re
import socket
import time

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from conftest import find_free_port
from test_hardening import raw_request, sigterm, wait_for_log
from test_server import running_server, start_server, stop_server, write_random_run

ORIGIN = "http://allowed.example"
INFER = "/v2/models/run1/infer"


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("hardening3") / "server.log"
    with running_server(tiny_run, find_free_port(), log, ALLOWED_ORIGINS=ORIGIN) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-checked", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def big_run(tiny_run, tmp_path_factory):
    return write_random_run(tmp_path_factory.mktemp("big3") / "run1", tiny_run, n_layer=12)


def v2_body(texts, **parameters):
    return {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [len(texts)], "data": texts}],
            "parameters": parameters}


def log_text(server):
    return server.log_path.read_text(encoding="utf-8")


# ---------------------------------------------------------------- item 2: one request's work is bounded


def test_a_v2_requests_texts_share_the_context(server):
    v2 = triton.InferenceServerClient(server.url.removeprefix("http://"))
    texts = triton.InferInput("text_input", [4], "BYTES")
    texts.set_data_from_numpy(np.array([b""] * 4, dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:  # was: 4 x 1023 tokens, 99 s on the 124M shape
        v2.infer("run1", [texts], parameters={"length": 1023})
    assert e.value.status() == "400"
    # an empty text_input starts a text (the run is delimited): <|startoftext|>'s tokens take their share
    room = int(re.search(r"at most (\d+) with the default text_input", e.value.message()).group(1))
    assert 250 <= room < 256 and "256 tokens with 4 texts" in e.value.message()
    assert "1024" in e.value.message()
    result = v2.infer("run1", [texts], parameters={"length": room, "seed": 1})  # the whole budget is fine
    assert len(result.as_numpy("text_output")) == 4
    v2.close()
    entry = wait_for_log(server, lambda e: e.get("texts") == 4 and "tokens" in e)
    assert entry["tokens"] + sum(entry["prompt_tokens"]) <= 1024

    # Every protocol states the bound in /openapi.json and keeps to it.
    spec = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert "n_ctx = 1024" in spec["/v2/models/{name}/infer"]["post"]["description"]
    assert "n_ctx = 1024" in spec["/v1/completions"]["post"]["description"]
    assert "n_ctx = 1024" in spec["/"]["get"]["description"] and "n_ctx = 1024" in spec["/"]["post"]["description"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "run1", "n": 4, "max_tokens": 300})
    assert r.status_code == 400 and "n=4" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/", params={"nsamples": 4, "length": 300})
    assert r.status_code == 400 and "nsamples=4" in r.json()["error"]


# ---------------------------------------------------------------- item 7: several stop strings, several choices


def test_each_choice_stops_at_its_first_stop_string_while_generating(server, client):
    started = time.monotonic()
    c = client.completions.create(model="run1", prompt="<|startoftext|>", n=4, max_tokens=250, stop=["e", "a"],
                                  seed=3, logprobs=0)
    assert len(c.choices) == 4
    for choice in c.choices:
        assert "e" not in choice.text and "a" not in choice.text and choice.finish_reason == "stop"
    # the tokens the answers hold (issue 27): those whose text they hold, the last cut by the stop string
    assert c.usage.completion_tokens == sum(len(choice.logprobs.tokens) for choice in c.choices)
    entry = wait_for_log(server, lambda e: e.get("params", {}).get("max_tokens") == 250)
    assert entry["tokens"] < 100, "the choices ran on past their stop strings"  # was 1000, every token
    assert time.monotonic() - started < 30


def test_usage_is_the_same_streamed_or_not(client):
    for seed in range(12):
        params = dict(model="run1", prompt="<|startoftext|>the cat", max_tokens=30, stop=["e", "."], seed=seed)
        plain = client.completions.create(**params, logprobs=0)
        chunks = list(client.completions.create(**params, stream=True, stream_options={"include_usage": True}))
        streamed = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
        assert streamed == plain.choices[0].text
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        assert plain.usage.completion_tokens == len(plain.choices[0].logprobs.tokens)
        assert plain.usage.completion_tokens <= 30


# ---------------------------------------------------------------- item 8: a completion keeps its leading newlines


def test_a_completion_keeps_its_leading_newlines(server, client):
    # The corpus puts a newline after every <|endoftext|>: the model's greedy next text starts with one.
    prompt = "<|startoftext|>my dog likes the red ball.<|endoftext|>"
    completion = client.completions.create(model="run1", prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    assert completion.startswith("\n")
    native = httpx.get(server.url + "/", params={"prefix": prompt, "length": 6, "top_k": 1,
                                                  "include_prefix": "false"}, timeout=30).json()["text"]
    # gpt-2-cloud-run's API strips them, as gpt-2-simple does, and (unlike a completion) drops a
    # <|startoftext|> that opens the next text (tests/test_whole_texts.py)
    assert native == completion.lstrip("\n").removeprefix("<|startoftext|>").lstrip("\n")
    echoed = client.completions.create(model="run1", prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + completion


# ---------------------------------------------------------------- item 9: CORS for the SDKs' headers


@pytest.mark.parametrize("path, header", [("/v1/completions", "authorization"),
                                          (INFER, "inference-header-content-length")])
def test_cors_preflights_allow_the_sdks_headers(server, path, header):
    preflight = httpx.options(server.url + path, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": f"content-type,{header}"})
    assert preflight.status_code == 200, preflight.text
    assert header in preflight.headers["access-control-allow-headers"].lower()


def test_a_binary_v2_answer_is_readable_cross_origin(server):
    body = json.dumps(v2_body(["<|startoftext|>my dog"], length=3, binary_data_output=True)).encode()
    r = httpx.post(server.url + INFER, content=body, headers={"Origin": ORIGIN, "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 200 and "inference-header-content-length" in r.headers
    assert "inference-header-content-length" in r.headers["access-control-expose-headers"].lower()


# ---------------------------------------------------------------- item 10: what the log and the errors may hold


def test_a_text_parameters_value_is_never_echoed_or_logged(server):
    secret = "SECRET-in-an-object"
    refused = [httpx.post(server.url + "/", json={"prefix": {"text": secret}}),
               httpx.post(server.url + "/", json={"truncate": [secret]}),
               httpx.post(server.url + "/v1/completions", json={"model": "run1", "prompt": {"text": secret}}),
               httpx.post(server.url + "/v1/completions", json={"model": "run1", "stop": {"s": secret}}),
               httpx.post(server.url + "/v1/completions", json={"model": "run1", "user": [secret]})]
    for r in refused:
        assert r.status_code == 400 and secret not in r.text, r.text
    assert "got an object" in refused[0].json()["error"] and "got a list of 1" in refused[1].json()["error"]
    wait_for_log(server, lambda e: e.get("parameter") == "user")  # the last one's line is written
    assert secret not in log_text(server)


def test_other_fields_are_logged_as_lengths(server, client):
    client.completions.create(model="run1", prompt="<|startoftext|>", max_tokens=2, stop=["STOP-one", "x"],
                              user="USER-alice", seed=1)
    httpx.get(server.url + "/", params={"length": 2, "truncate": "TRUNCATE-here"}, timeout=30)
    r = httpx.post(server.url + INFER, json={"inputs": [{"name": "NAME-input", "datatype": "BYTES", "shape": [1],
                                                         "data": ["x"]}]})
    assert r.status_code == 400 and "NAME-input" in r.json()["error"]  # the answer may name what was sent
    entry = wait_for_log(server, lambda e: e.get("params", {}).get("max_tokens") == 2)
    assert entry["params"]["stop_chars"] == [8, 1] and entry["params"]["user_chars"] == 10
    entry = wait_for_log(server, lambda e: e.get("params", {}).get("length") == 2 and "truncate_chars" in e["params"])
    assert entry["params"]["truncate_chars"] == 13
    wait_for_log(server, lambda e: e.get("error", "").startswith("unknown input (10 characters)"))
    text = log_text(server)
    assert "STOP-one" not in text and "USER-alice" not in text and "TRUNCATE-here" not in text
    assert "NAME-input" not in text


def test_line_separators_are_escaped_in_the_log(server):
    for name in ("a\u2028b", "c\u0085d", "e\u2029f"):
        r = httpx.post(server.url + "/", json={name: 1})
        assert r.status_code == 400 and r.json()["parameter"] == name
    wait_for_log(server, lambda e: e.get("parameter") == "e\u2029f")  # written once the answer went out
    raw = log_text(server)
    assert not {"\u2028", "\u0085", "\u2029"} & set(raw)
    entries = [json.loads(line) for line in raw.splitlines()]  # str.splitlines breaks at all three
    assert {"a\u2028b", "c\u0085d", "e\u2029f"} <= {e.get("parameter") for e in entries}


def test_log_prompts_logs_the_other_fields_as_sent(tiny_run, tmp_path):
    with running_server(tiny_run, find_free_port(), tmp_path / "log", LOG_PROMPTS="1") as server:
        httpx.post(server.url + "/v1/completions", json={"model": "run1", "max_tokens": 2, "stop": ["STOP-one"],
                                                          "user": "USER-alice"}, timeout=30)
        httpx.post(server.url + INFER, json={"inputs": [{"name": "NAME-input", "datatype": "BYTES", "shape": [1],
                                                         "data": ["x"]}]})
        entry = wait_for_log(server, lambda e: e.get("params", {}).get("max_tokens") == 2)
        assert entry["params"]["stop"] == ["STOP-one"] and entry["params"]["user"] == "USER-alice"
        wait_for_log(server, lambda e: e.get("error", "").startswith("unknown input 'NAME-input'"))


# ---------------------------------------------------------------- item 12: the small ones


def test_a_lone_surrogate_is_named_as_such(server):
    for path, body in [("/", b'{"prefix": "\\ud83d"}'),
                       ("/v1/completions", b'{"model": "run1", "prompt": "\\ud83d"}'),
                       ("/v1/completions", b'{"model": "run1", "stop": ["\\udc00"]}')]:
        r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
        message = r.json()["error"] if path == "/" else r.json()["error"]["message"]
        assert r.status_code == 400 and "lone surrogate" in message and "at most" not in message, message


def test_v2_refuses_ambiguous_requests(server):
    header = json.dumps({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 5}}]}).encode()
    body = header + (1).to_bytes(4, "little") + b"x"
    twice = httpx.post(server.url + INFER, content=body, headers=[
        ("Inference-Header-Content-Length", str(len(header))), ("Inference-Header-Content-Length", "0")])
    assert twice.status_code == 400 and "more than once" in twice.json()["error"]

    both = json.dumps({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["y"],
                                   "parameters": {"binary_data_size": 5}}]}).encode()
    r = httpx.post(server.url + INFER, content=both + (1).to_bytes(4, "little") + b"x",
                   headers={"Inference-Header-Content-Length": str(len(both))})
    assert r.status_code == 400 and "both data and binary_data_size" in r.json()["error"]

    thrice = {**v2_body(["x"], length=1), "outputs": [{"name": "text_output"}] * 3}
    r = httpx.post(server.url + INFER, json=thrice)
    assert r.status_code == 400 and "list it once" in r.json()["error"]


def test_a_hang_ups_log_counts_every_samples_tokens(big_run, tmp_path):
    with running_server(big_run, find_free_port(), tmp_path / "log") as server:
        whole = httpx.get(server.url + "/", params={"nsamples": 4, "length": 255, "seed": 1}, timeout=300).json()
        assert whole["tokens"] == 4 * 255  # the random model never ends a text early
        sock = raw_request(server, "GET /?nsamples=4&length=255&seed=2 HTTP/1.1\nHost: x")
        time.sleep(whole["seconds"] * 0.6)  # well into it, far from its end
        sock.close()
        entry = wait_for_log(server, lambda e: e.get("disconnected") and e["params"]["seed"] == 2)
    # One sample alone has at most 255 tokens; four that ran more than a quarter of the way have more.
    assert entry["httpRequest"]["status"] == 499 and 255 < entry["tokens"] < 4 * 255


def test_v2_ready_answers_503_on_a_kept_alive_connection_during_the_drain(big_run, tmp_path):
    server = start_server(big_run, find_free_port(), tmp_path / "log")
    try:
        with httpx.Client(base_url=server.url, timeout=10) as probe:  # one connection, kept alive
            assert probe.get("/v2/health/ready").status_code == 200
            with httpx.stream("GET", server.url + "/", params={"stream": "true", "length": 1000, "seed": 1},
                              timeout=30) as running:
                lines = running.iter_lines()
                next(line for line in lines if line.startswith("data:"))  # generating: it holds the gate
                sigterm(server)
                time.sleep(0.5)
                with pytest.raises(ConnectionRefusedError):  # no new connections
                    socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=2)
                r = probe.get("/v2/health/ready")
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert "shutting down" in r.json()["error"]
                assert any("shutting down" in line for line in lines)  # the stream's end, after the drain
        assert server.proc.wait(timeout=10) == 0
    finally:
        stop_server(server)

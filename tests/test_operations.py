"""Issue 20's operator features over real HTTP against `python -m app` (test_server's running_server):
Triton's generate extension and infer's parameter aliases; API keys through the OpenAI SDK, tritonclient
and plain HTTP; Prometheus /metrics parsed with prometheus_client's parser; trace-correlated log lines.
The page's key field: test_page.py."""
import http.server
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from conftest import find_free_port
from test_server import ROOT, read_sse, running_server, write_random_run

TEXT = "<|startoftext|>my dog"
KEY, FILE_KEY = "k-" + "x" * 30, "file-key-" + "y" * 20
TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """Open (no keys), with a project for trace fields."""
    log = tmp_path_factory.mktemp("ops") / "server.log"
    with running_server(tiny_run, find_free_port(), log, GOOGLE_CLOUD_PROJECT="my-project") as s:
        yield s


@pytest.fixture(scope="module")
def keyed(tiny_run, tmp_path_factory):
    """Keys from API_KEYS and from API_KEYS_FILE; METRICS=0."""
    folder = tmp_path_factory.mktemp("keyed")
    (folder / "keys").write_text(f"\n{FILE_KEY}\n")
    with running_server(tiny_run, find_free_port(), folder / "server.log", API_KEYS=f"{KEY}, other",
                        API_KEYS_FILE=str(folder / "keys"), METRICS="0", ALLOWED_ORIGINS="http://page.example") as s:
        yield s


def generate(server, body, route="generate", name="run1", **kwargs):
    return httpx.post(f"{server.url}/v2/models/{name}/{route}", json=body, timeout=60, **kwargs)


def native(server, **body):
    return httpx.post(server.url + "/", json=body, timeout=60).json()


# ---------------------------------------------------------------- Triton's generate extension


def test_generate_matches_the_plain_api_for_every_parameter(server):
    params = {"length": 12, "temperature": 0.9, "top_k": 40, "top_p": 0.9, "seed": 5, "include_prefix": False}
    r = generate(server, {"text_input": TEXT, "id": "a1", "parameters": params})
    assert r.status_code == 200
    assert r.json() == {"model_name": "run1", "model_version": "model-100", "id": "a1",
                        "text_output": native(server, prefix=TEXT, **params)["text"]}
    # Beside text_input (Triton's model inputs), and with the aliases of length.
    for body in ({"text_input": TEXT, **params}, {"text_input": TEXT, "max_tokens": 12, **{
            k: v for k, v in params.items() if k != "length"}},
                 {"text_input": TEXT, "parameters": {"max_new_tokens": 12, **{
                     k: v for k, v in params.items() if k != "length"}}}):
        assert generate(server, body).json()["text_output"] == r.json()["text_output"], body


def test_generate_stop_and_truncate(server):
    whole = native(server, prefix=TEXT, length=30, seed=1)["text"]
    cut = whole[len(TEXT):][3:6]  # text the generation writes: it stops there
    expected = native(server, prefix=TEXT, length=30, seed=1, truncate=cut)["text"]
    assert expected != whole
    for stop in ({"truncate": cut}, {"stop": cut}, {"stop": [cut]}):
        body = {"text_input": TEXT, "parameters": {"length": 30, "seed": 1, **stop}}
        assert generate(server, body).json()["text_output"] == expected, stop
    for nothing in ("", []):  # an empty stop stops nowhere
        body = {"text_input": TEXT, "parameters": {"length": 30, "seed": 1, "stop": nothing}}
        assert generate(server, body).json()["text_output"] == whole


def test_generate_stream_sends_the_same_text_piece_by_piece(server):
    body = {"text_input": TEXT, "id": "s1", "parameters": {"max_tokens": 20, "seed": 2, "stream": True}}
    with httpx.stream("POST", f"{server.url}/v2/models/run1/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_sse(r)
    assert len(events) > 2 and all(name == "message" for name, _ in events)
    assert all(set(e) == {"model_name", "model_version", "id", "text_output"} for _, e in events)
    plain = generate(server, {"text_input": TEXT, "parameters": {"max_tokens": 20, "seed": 2}}).json()
    assert "".join(e["text_output"] for _, e in events) == plain["text_output"]


@pytest.mark.parametrize("body, message", [
    ({"text_input": TEXT, "parameters": {"length": 5, "max_tokens": 5}}, "length and max_tokens are two names"),
    ({"text_input": TEXT, "max_tokens": 5, "parameters": {"max_new_tokens": 5}}, "max_tokens and max_new_tokens"),
    ({"text_input": TEXT, "parameters": {"truncate": "x", "stop": "y"}}, "truncate and stop are two names"),
    ({"text_input": TEXT, "length": 5, "parameters": {"length": 6}}, "length is given both beside text_input"),
    ({"text_input": TEXT, "parameters": {"max_tokens": 0}}, "max_tokens must be an integer from 1 to 1023"),
    ({"text_input": TEXT, "parameters": {"max_new_tokens": "many"}}, "max_new_tokens must be an integer"),
    ({"text_input": TEXT, "parameters": {"stop": ["a", "b"]}}, "stop must be a string or a list of up to 1"),
    ({"text_input": TEXT, "parameters": {"stop": "x" * 101}}, "stop must be"),
    ({"text_input": TEXT, "parameters": {"nsamples": 2}}, "unknown parameter 'nsamples'"),
    ({"text_input": TEXT, "stop_words": ""}, "unknown parameter 'stop_words'"),
    ({"text_input": TEXT, "bad_words": ""}, "bad_words must be a list"),  # vLLM's, ours too now (issue 26)
    ({"text_input": TEXT, "parameters": {"stream": True}}, "stream=true is for generate_stream"),
    ({"text_input": TEXT, "parameters": {"temperature": 9}}, "temperature must be"),
    ({"text_input": TEXT, "parameters": {"length": 1023}}, "length must be at most"),
    ({"text_input": "x" * 501}, "text_input must be a string of at most 500"),
    ({"text_input": ["a"]}, 'must be a JSON object with "text_input": a string'),
    ({"parameters": {}}, '"text_input": a string'),
    ({"text_input": TEXT, "id": 3}, '"id" must be a string'),
    ({"text_input": TEXT, "parameters": [1]}, '"parameters" must be an object'),
])
@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_generate_errors_are_400s_that_say_what_is_wrong(server, body, message, route):
    r = generate(server, body, route)
    if route == "generate_stream" and "generate_stream" in message:  # what generate_stream does anyway
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert set(r.json()) == {"error"}


def test_generate_wrong_model_bad_json_and_wrong_method(server):
    r = generate(server, {"text_input": TEXT}, name="run2")
    assert r.status_code == 400 and r.json() == {"error": "unknown model 'run2'; this server serves 'run1'"}
    r = httpx.post(server.url + "/v2/models/run1/generate", content=b"{", timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(server.url + "/v2/models/run1/generate", content=b"text", timeout=10)
    assert r.status_code == 415 and set(r.json()) == {"error"}
    r = httpx.get(server.url + "/v2/models/run1/generate", timeout=10)
    assert r.status_code == 405 and set(r.json()) == {"error"}


def infer(server, parameters):
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [TEXT]}],
            "parameters": parameters}
    return httpx.post(server.url + "/v2/models/run1/infer", json=body, timeout=60)


def test_infer_takes_the_aliases_too(server):
    expected = infer(server, {"length": 9, "seed": 4, "truncate": "the"}).json()["outputs"][0]["data"]
    for parameters in ({"max_tokens": 9, "stop": "the"}, {"max_new_tokens": 9, "stop": ["the"]}):
        r = infer(server, {"seed": 4, **parameters})
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == expected, parameters
    r = infer(server, {"length": 9, "max_new_tokens": 9})
    assert r.status_code == 400 and "length and max_new_tokens are two names for length" in r.json()["error"]


def test_openapi_lists_generate_and_the_aliases(server):
    paths = httpx.get(server.url + "/openapi.json", timeout=10).json()["paths"]
    for route in ("generate", "generate_stream"):
        post = paths[f"/v2/models/{{name}}/{route}"]["post"]
        request = post["requestBody"]["content"]["application/json"]["schema"]
        assert request["required"] == ["text_input"]
        assert {"max_tokens", "max_new_tokens", "stop", "length", "truncate"} <= set(
            request["properties"]["parameters"]["properties"])
        assert {"400", "429", "503"} <= set(post["responses"])
    infer_parameters = (paths["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]
                        ["schema"]["properties"]["parameters"]["properties"])
    assert infer_parameters["max_tokens"]["maximum"] == 1023
    assert infer_parameters["stop"]["anyOf"][1]["maxItems"] == 1


# ---------------------------------------------------------------- API keys


def test_openai_sdk_with_a_right_key_a_wrong_one_and_none(keyed):
    for key in (KEY, FILE_KEY, "other"):
        client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0)
        completion = client.completions.create(model="run1", prompt=TEXT, max_tokens=5, seed=1)
        assert completion.usage.completion_tokens >= 1
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.completions.create(model="run1", prompt=TEXT, max_tokens=5)
    assert e.value.status_code == 401 and e.value.body["message"] == "the API key is not valid"
    assert (e.value.body["type"], e.value.body["code"]) == ("invalid_request_error", "invalid_api_key")  # OpenAI's
    with pytest.raises(openai.AuthenticationError) as e:  # no Authorization header at all
        client.completions.create(model="run1", prompt=TEXT, max_tokens=5, extra_headers={"Authorization": openai.omit})
    assert "needs an API key" in e.value.body["message"]
    assert [m.id for m in client.models.list()] == ["run1"]  # metadata stays open


def test_tritonclient_sends_its_key_in_headers(keyed):
    client = triton.InferenceServerClient(keyed.url.removeprefix("http://"))
    try:
        tensor = triton.InferInput("text_input", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([TEXT.encode()], dtype=np.object_))
        result = client.infer("run1", [tensor], parameters={"max_tokens": 5, "seed": 1},
                              headers={"Authorization": f"Bearer {KEY}"})
        assert result.as_numpy("text_output")[0].decode().startswith(TEXT)
        with pytest.raises(InferenceServerException) as e:
            client.infer("run1", [tensor])
        assert e.value.status() == "401" and "needs an API key" in e.value.message()
        assert client.is_server_ready() and client.get_model_metadata("run1")["name"] == "run1"  # no key needed
    finally:
        client.close()


def test_each_protocol_answers_401_in_its_shape_and_the_rest_stays_open(keyed):
    url = keyed.url
    asks = [("GET", "/", None), ("POST", "/", {"length": 3}), ("POST", "/v1/completions", {"model": "run1"}),
            ("POST", "/v2/models/run1/infer", {}), ("POST", "/v2/models/run1/generate", {"text_input": "a"}),
            ("POST", "/v2/models/run1/generate_stream", {"text_input": "a"})]
    for method, path, body in asks:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": KEY}):
            r = httpx.request(method, url + path, json=body, headers=headers, timeout=10)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
            error = r.json()["error"]
            if path == "/":
                assert r.json() == {"error": error, "parameter": None}
            elif path.startswith("/v1"):
                assert error["type"] == "invalid_request_error" and error["message"]
            else:
                assert set(r.json()) == {"error"} and isinstance(error, str)
    ok = httpx.post(url + "/v2/models/run1/generate", json={"text_input": TEXT, "max_tokens": 3},
                    headers={"Authorization": f"bearer {FILE_KEY}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["text_output"].startswith(TEXT)
    for path in ("/limits", "/openapi.json", "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/run1",
                 "/v2/models/run1/ready", "/v1/models", "/ui/"):
        assert httpx.get(url + path, timeout=10).status_code == 200, path
    assert httpx.head(url + "/", timeout=10).status_code == 200  # the uptime check
    assert httpx.get(url + "/metrics", timeout=10).status_code == 404  # METRICS=0
    preflight = httpx.options(url + "/", timeout=10, headers={
        "Origin": "http://page.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200 and "authorization" in preflight.headers["access-control-allow-headers"].lower()
    time.sleep(0.2)
    text = keyed.log_path.read_text()
    assert KEY not in text and FILE_KEY not in text and "wrong API key" in text and "no API key" in text


def test_openapi_says_which_operations_need_a_key(keyed, server):
    spec = httpx.get(keyed.url + "/openapi.json", timeout=10).json()
    assert spec["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer"}}
    keyed_operations = {(path, method) for path, item in spec["paths"].items() for method, operation in item.items()
                        if "security" in operation}
    assert keyed_operations == {("/", "get"), ("/", "post"), ("/v1/completions", "post"),
                                ("/v2/models/{name}/infer", "post"), ("/v2/models/{name}/generate", "post"),
                                ("/v2/models/{name}/generate_stream", "post"), ("/tokenize", "post"),
                                ("/detokenize", "post"), ("/tokenizer_info", "get")}
    error = spec["paths"]["/v1/completions"]["post"]["responses"]["401"]["content"]["application/json"]["schema"]
    assert error["required"] == ["error"] and "message" in error["properties"]["error"]["properties"]
    assert "components" not in httpx.get(server.url + "/openapi.json", timeout=10).json()  # no keys: all open


@pytest.mark.parametrize("content, message", [(None, "cannot be read"), ("\n \n", "has no key")])
def test_a_bad_keys_file_stops_the_start(tiny_run, tmp_path, content, message):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    done = subprocess.run([sys.executable, "-m", "app"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "MODEL_DIR": str(tiny_run), "API_KEYS_FILE": str(path)})
    assert done.returncode == 1 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- trace-correlated logs


def logged(server, marker):
    """The log lines of the generate request with seed `marker`."""
    time.sleep(0.2)
    return [e for e in server.logs() if e.get("message", "").startswith("POST /v2/models/run1/generate")
            and e.get("params", {}).get("seed") == marker]


@pytest.mark.parametrize("headers, trace, span, sampled", [
    ({"traceparent": f"00-{TRACE}-{SPAN}-01"}, TRACE, SPAN, True),
    ({"X-Cloud-Trace-Context": f"{TRACE.upper()}/{int(SPAN, 16)};o=0"}, TRACE, SPAN, False),
    ({"X-Cloud-Trace-Context": f"{TRACE}"}, TRACE, None, False),
    ({"traceparent": f"00-{TRACE}-{SPAN}-01", "X-Cloud-Trace-Context": f"{'1' * 32}/5;o=1"}, TRACE, SPAN, True),
    ({}, None, None, None),
    ({"traceparent": "junk"}, None, None, None),
])
@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_trace_fields_mark_the_requests_log_lines(server, headers, trace, span, sampled, route):
    seed = abs(hash(repr((headers, route)))) % 2**31
    r = generate(server, {"text_input": TEXT, "max_tokens": 3, "seed": seed}, route, headers=headers)
    assert r.status_code == 200
    [line] = logged(server, seed)
    if trace is None:
        assert not [k for k in line if k.startswith("logging.googleapis.com/")]
        return
    assert line["logging.googleapis.com/trace"] == f"projects/my-project/traces/{trace}"
    assert line.get("logging.googleapis.com/spanId") == span
    assert line["logging.googleapis.com/trace_sampled"] is sampled


def test_the_project_comes_from_the_metadata_server_on_cloud_run(tiny_run, tmp_path):
    """K_SERVICE set and no GOOGLE_CLOUD_PROJECT: asked once at start from GCE_METADATA_HOST (a local
    HTTP server standing in for Cloud Run's, which we cannot run)."""
    asked = []

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append((self.path, self.headers.get("Metadata-Flavor")))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"meta-project")

        def log_message(self, *args):
            pass

    metadata = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=metadata.serve_forever, daemon=True).start()
    try:
        env = {"K_SERVICE": "gpt2", "GCE_METADATA_HOST": f"127.0.0.1:{metadata.server_port}",
               "GOOGLE_CLOUD_PROJECT": ""}
        with running_server(tiny_run, find_free_port(), tmp_path / "server.log", **env) as s:
            traced = {"traceparent": f"00-{TRACE}-{SPAN}-00"}
            generate(s, {"text_input": TEXT, "max_tokens": 3, "seed": 77}, headers=traced)
            generate(s, {"text_input": TEXT, "max_tokens": 3, "seed": 78}, headers=traced)
            [line] = logged(s, 77)
            assert line["logging.googleapis.com/trace"] == f"projects/meta-project/traces/{TRACE}"
    finally:
        metadata.shutdown()
    assert asked == [("/computeMetadata/v1/project/project-id", "Google")]  # once, at start


# ---------------------------------------------------------------- /metrics


def scrape(url):
    """{(name, labels as a sorted tuple): value} from /metrics, parsed by prometheus_client."""
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def delta(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


@pytest.fixture(scope="module")
def slow(tiny_run, tmp_path_factory):
    """Random weights, milliseconds a token, no early end; QUEUE_SIZE=0 (a second request is a 429);
    API keys set (/metrics stays open)."""
    folder = tmp_path_factory.mktemp("metrics")
    model = write_random_run(folder / "run1", tiny_run, n_layer=8, n_embd=512, n_head=8)
    with running_server(model, find_free_port(), folder / "server.log", QUEUE_SIZE="0", API_KEYS=KEY) as s:
        yield s


def test_metrics_move_by_exactly_what_the_requests_did(slow):
    url, auth = slow.url, {"Authorization": f"Bearer {KEY}"}
    before = scrape(url)
    assert httpx.post(url + "/", json={"length": 5, "seed": 1}, headers=auth, timeout=60).json()["tokens"] == 5
    with httpx.stream("GET", url + "/", params={"stream": "true", "length": 1000, "seed": 1}, headers=auth,
                      timeout=60) as stream:
        lines = stream.iter_lines()  # kept: closing this iterator would hang up
        next(line for line in lines if line.startswith("data:"))  # it holds the gate now
        busy = httpx.post(url + "/v2/models/run1/generate", json={"text_input": "a", "max_tokens": 3},
                          headers=auth, timeout=60)
        assert busy.status_code == 429
        during = scrape(url)
    # hung up (closed): the server notices within its check interval
    deadline = time.monotonic() + 10
    while not [e for e in slow.logs() if e.get("disconnected")]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [stream_line] = [e for e in slow.logs() if e.get("disconnected")]
    r = httpx.post(url + "/v2/models/run1/generate", json={"text_input": "a", "max_tokens": 3}, headers=auth,
                   timeout=60)
    assert r.status_code == 200
    assert httpx.post(url + "/v1/completions", json={"model": "run1"}, timeout=10).status_code == 401
    assert httpx.get(url + "/v2/models/nope/ready", timeout=10).status_code == 400
    assert httpx.get(url + "/no/such/path", timeout=10).status_code == 404
    after = scrape(url)

    assert during[("gpt2_generations_in_flight", ())] == 1 and during[("gpt2_queue_length", ())] == 0
    assert after[("gpt2_generations_in_flight", ())] == 0
    requests = "gpt2_requests_total"
    assert delta(before, after, requests, route="/", method="POST", status="200") == 1
    assert delta(before, after, requests, route="/", method="GET", status="499") == 1  # the stream, left (as logged)
    assert delta(before, after, requests, route="/v2/models/{name}/generate", method="POST", status="429") == 1
    assert delta(before, after, requests, route="/v2/models/{name}/generate", method="POST", status="200") == 1
    assert delta(before, after, requests, route="/v1/completions", method="POST", status="401") == 1
    assert delta(before, after, requests, route="/v2/models/{name}/ready", method="GET", status="400") == 1
    assert delta(before, after, requests, route="other", method="GET", status="404") == 1
    assert delta(before, after, requests, route="/metrics", method="GET", status="200") == 2
    assert sum(1 for name, _ in after if name == requests) <= 12  # bounded: templates, not paths
    assert delta(before, after, "gpt2_refused_total", reason="busy") == 1
    assert delta(before, after, "gpt2_refused_total", reason="shutting_down") == 0
    assert delta(before, after, "gpt2_client_disconnects_total") == 1
    assert delta(before, after, "gpt2_tokens_generated_total") == 5 + stream_line["tokens"] + 3
    assert delta(before, after, "gpt2_generation_seconds_count") == 3
    assert delta(before, after, "gpt2_time_to_first_token_seconds_count") == 3
    seconds = delta(before, after, "gpt2_generation_seconds_sum")
    assert 0 < delta(before, after, "gpt2_time_to_first_token_seconds_sum") < seconds + 1
    [info] = [labels for name, labels in after if name == "gpt2_model_info"]
    assert dict(info) == {"name": "run1", "checkpoint": "model-1", "quant": "Q8_0", "n_ctx": "1024"}

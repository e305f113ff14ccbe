"""/v1 and /v2 share GET /'s gate: busy is a 429 with Retry-After, and SIGTERM refuses the queue and
ends the generation in flight, each in the protocol's own error shape, read with its official client.
On a model slow enough that a generation is still running when the next request comes (the 124M
shape's 12 layers, random weights, as test_hardening.py)."""
import concurrent.futures
import time

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from conftest import find_free_port
from test_hardening import assert_exits_cleanly, sigterm, wait_for_log
from test_server import client_ports, running_server, start_server, stop_server, wait_for_new_client, \
    write_random_run


@pytest.fixture(scope="module")
def big_run(tiny_run, tmp_path_factory):
    return write_random_run(tmp_path_factory.mktemp("big") / "run1", tiny_run, n_layer=12)


def openai_client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def long_stream(client):
    """A streamed completion (the SDK's Stream) that is generating, so holding the gate, when this returns."""
    stream = client.completions.create(model="run1", prompt="", max_tokens=1000, seed=1, stream=True)
    assert next(stream).choices[0].finish_reason is None
    return stream


def v2_input():
    tensor = triton.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
    return tensor


def test_busy_is_429_with_retry_after_in_each_protocols_shape(big_run, tmp_path):
    with running_server(big_run, find_free_port(), tmp_path / "log", QUEUE_SIZE="0") as server:
        client = openai_client(server)
        stream = long_stream(client)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="run1", prompt="", max_tokens=1)
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.code == "rate_limit_exceeded" and "busy" in e.value.message

        v2 = triton.InferenceServerClient(server.url.removeprefix("http://"))
        with pytest.raises(InferenceServerException) as e:
            v2.infer("run1", [v2_input()], parameters={"length": 1})
        assert e.value.status() == "429" and "busy" in e.value.message()
        r = httpx.post(server.url + "/v2/models/run1/infer", json={"inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [""]}]})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and set(r.json()) == {"error"}
        v2.close()
        stream.close()  # hang up: the generation stops between tokens and frees the gate
        entry = wait_for_log(server, lambda e: e.get("params", {}).get("max_tokens") == 1000)
        assert entry["disconnected"] is True and 0 < entry["tokens"] < 1000
        assert httpx.post(server.url + "/v1/completions", json={"model": "run1", "max_tokens": 1},
                          timeout=60).status_code == 200


def test_sigterm_refuses_the_queue_and_ends_a_stream_in_each_protocols_shape(big_run, tmp_path):
    server = start_server(big_run, find_free_port(), tmp_path / "log")
    try:
        client = openai_client(server)
        stream = long_stream(client)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            before = client_ports(server)
            queued_openai = pool.submit(client.completions.create, model="run1", prompt="", max_tokens=5)
            wait_for_new_client(server, before)
            before = client_ports(server)
            queued_v2 = pool.submit(httpx.post, server.url + "/v2/models/run1/infer", timeout=60, json={
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [""]}]})
            wait_for_new_client(server, before)
            time.sleep(0.2)  # both wait at the gate
            signalled = sigterm(server)
            with pytest.raises(openai.InternalServerError) as e:
                queued_openai.result(timeout=5)
            assert e.value.status_code == 503 and e.value.code == "shutting_down"
            assert e.value.response.headers["retry-after"] == "1"
            r = queued_v2.result(timeout=5)
            assert r.status_code == 503 and "shutting down" in r.json()["error"] and r.headers["retry-after"] == "1"
        assert time.monotonic() - signalled < 2
        with pytest.raises(openai.APIError) as e:  # the stream's error chunk, raised by the SDK's iterator
            for chunk in stream:
                assert chunk.choices[0].text is not None
        assert "shutting down" in e.value.message
        assert_exits_cleanly(server, signalled)
    finally:
        stop_server(server)

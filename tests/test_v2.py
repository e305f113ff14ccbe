"""The V2 inference protocol through the official `tritonclient[http]`, against `python -m app` in a
subprocess (test_server's running_server). Busy and shutting down: test_protocols_load.py."""
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from test_server import running_server

TEXTS = ["<|startoftext|>my dog", "<|startoftext|>the cat"]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    from conftest import find_free_port

    log = tmp_path_factory.mktemp("v2_server") / "server.log"
    with running_server(tiny_run, find_free_port(), log) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


def text_input(texts, binary=True, shape=None, name="text_input"):
    tensor = triton.InferInput(name, shape or [len(texts)], "BYTES")
    data = np.array([t.encode() for t in texts], dtype=np.object_).reshape(shape or [len(texts)])
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("run1") and not client.is_model_ready("run2")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("run1")
    assert metadata["name"] == "run1" and metadata["versions"] == ["model-100"]
    assert metadata["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_the_plain_api(client, server, binary):
    outputs = None if binary else [triton.InferRequestedOutput("text_output", binary_data=False)]
    result = client.infer("run1", [text_input(TEXTS, binary)], outputs=outputs, request_id="r1",
                          parameters={"length": 20, "seed": 3, "temperature": 0.9})
    texts = result.as_numpy("text_output")
    assert texts.shape == (2,)
    texts = [t.decode() if binary else t for t in texts]  # the client gives bytes from binary data, str from JSON
    assert result.get_response()["id"] == "r1" and result.get_response()["model_version"] == "model-100"
    for text, prefix in zip(texts, TEXTS):
        plain = httpx.post(server.url + "/", json={"prefix": prefix, "length": 20, "seed": 3, "temperature": 0.9},
                           timeout=30).json()
        assert text == plain["text"] and text.startswith(prefix)


@pytest.mark.parametrize("make, message", [
    (lambda c: c.infer("run2", [text_input(TEXTS)]), "unknown model 'run2'"),
    (lambda c: c.infer("run1", [text_input(TEXTS, name="prompt")]), "unknown input 'prompt'"),
    (lambda c: c.infer("run1", [int_input()]), "datatype BYTES"),
    (lambda c: c.infer("run1", [text_input(TEXTS, shape=[2, 1])]), "shape [N]"),
    (lambda c: c.infer("run1", [text_input(["a"] * 5)]), "shape [N]"),
    (lambda c: c.infer("run1", [text_input(TEXTS)], outputs=[triton.InferRequestedOutput("logits")]),
     "unknown output 'logits'"),
    (lambda c: c.infer("run1", [text_input(TEXTS)], parameters={"length": 0}), "length must be"),
    (lambda c: c.infer("run1", [text_input(TEXTS)], parameters={"nsamples": 2}), "unknown parameter 'nsamples'"),
    (lambda c: c.infer("run1", [text_input(["x" * 600])]), "text_input must be a string of at most 500"),
])
def test_bad_requests_are_400s(client, make, message):
    with pytest.raises(InferenceServerException) as e:
        make(client)
    assert e.value.status() == "400" and message in e.value.message()


def int_input():
    tensor = triton.InferInput("text_input", [1], "INT32")
    tensor.set_data_from_numpy(np.array([1], dtype=np.int32))
    return tensor


def test_errors_in_v2_shape(server):
    for body in (b'{"inputs": [}', b'{"inputs": [], "inputs": []}'):
        bad = httpx.post(server.url + "/v2/models/run1/infer", content=body)
        assert bad.status_code == 400 and set(bad.json()) == {"error"}
    assert "inputs is given more than once" in bad.json()["error"]
    for length in (b"99", b"\xb2"):  # past the body; "²" (latin-1), a digit to str.isdigit but not to int()
        cut = httpx.post(server.url + "/v2/models/run1/infer", headers={"Inference-Header-Content-Length": length},
                         content=b"{}")
        assert cut.status_code == 400 and "Inference-Header-Content-Length" in cut.json()["error"]
    assert httpx.get(server.url + "/v2/nothing").json()["error"].startswith("no such path")

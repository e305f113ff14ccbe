"""/v1/completions and /v1/models through the official `openai` package, against `python -m app` in a
subprocess (test_server's running_server), base_url pointing at it. Busy and shutting down: test_protocols_load.py."""
import httpx
import openai
import pytest

from test_hardening import wait_for_log
from test_server import running_server

PROMPT = "<|startoftext|>my dog"


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    from conftest import find_free_port

    log = tmp_path_factory.mktemp("openai_server") / "server.log"
    with running_server(tiny_run, find_free_port(), log, ALLOWED_ORIGINS="http://allowed.example") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-checked", max_retries=0, timeout=60)


def complete(client, **params):
    return client.completions.create(**{"model": "run1", "prompt": PROMPT, "max_tokens": 20, **params})


def test_models_and_a_completion(client, server):
    assert [m.id for m in client.models.list()] == ["run1"]  # the run folder's name
    c = complete(client, seed=1)
    assert c.object == "text_completion" and c.model == "run1" and c.id.startswith("cmpl-")
    [choice] = c.choices
    assert choice.index == 0 and choice.logprobs is None and choice.text
    assert choice.finish_reason in ("stop", "length")
    assert c.usage.prompt_tokens == 5 and c.usage.total_tokens == 5 + c.usage.completion_tokens
    assert 1 <= c.usage.completion_tokens <= 20
    # The same generation as the gpt-2-cloud-run API with the same settings (temperature 1, no top_p).
    plain = httpx.post(server.url + "/", json={"prefix": PROMPT, "length": 20, "seed": 1, "temperature": 1,
                                               "include_prefix": False}, timeout=30).json()
    assert choice.text == plain["text"]


def test_streamed_completion_through_the_sdk_iterator(client):
    chunks = list(complete(client, seed=4, temperature=1.5, stream=True))
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert len(chunks) >= 3 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])
    streamed = "".join(chunk.choices[0].text for chunk in chunks)
    assert streamed == complete(client, seed=4, temperature=1.5).choices[0].text

    with_usage = list(complete(client, seed=4, temperature=1.5, stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.prompt_tokens == 5
    echoed = list(complete(client, seed=4, temperature=1.5, stream=True, echo=True))
    assert "".join(chunk.choices[0].text for chunk in echoed) == PROMPT + streamed


def test_n_seed_temperature_echo(client):
    c = complete(client, n=2, seed=3, temperature=1.5)
    assert [choice.index for choice in c.choices] == [0, 1]
    assert len({choice.text for choice in c.choices}) == 2

    first, second = complete(client, seed=7, temperature=1.5), complete(client, seed=7, temperature=1.5)
    assert first.choices[0].text == second.choices[0].text
    assert len({complete(client, seed=s, temperature=1.5).choices[0].text for s in range(6)}) > 1
    # temperature 0 is greedy (and so is any below the engine's lowest, 0.01): the seed does not matter.
    greedy = {complete(client, seed=s, temperature=t).choices[0].text for s, t in ((1, 0), (2, 0), (3, 1e-30))}
    assert len(greedy) == 1
    echoed = complete(client, seed=7, temperature=1.5, echo=True).choices[0].text
    assert echoed == PROMPT + first.choices[0].text


def test_stop(client):
    # A seed whose text has every stop string below in it (the test needs stops that occur).
    seed, full = next((seed, text) for seed in range(1, 50)
                      if all(c in (text := complete(client, seed=seed, temperature=1.5, max_tokens=60).choices[0].text)
                             for c in " .e"))
    for stop in (" ", [" ", "."], ["zzz", "e"]):
        stops = [stop] if isinstance(stop, str) else stop
        expected = full[:min(full.find(s) for s in stops if s in full)]
        cut = complete(client, seed=seed, temperature=1.5, max_tokens=60, stop=stop)
        assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
        streamed = list(complete(client, seed=seed, temperature=1.5, max_tokens=60, stop=stop, stream=True))
        assert "".join(chunk.choices[0].text for chunk in streamed) == expected
        assert streamed[-1].choices[0].finish_reason == "stop"
    both = complete(client, seed=seed, temperature=1.5, max_tokens=60, n=2, stop=[" ", "."])
    assert all(" " not in choice.text and "." not in choice.text for choice in both.choices)


@pytest.mark.parametrize("params, param", [
    ({"max_tokens": 5000}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"n": 9}, "n"),
    ({"seed": -1}, "seed"),
    ({"stop": [f"s{i}" for i in range(17)]}, "stop"),  # 16 at most
    ({"logprobs": 6}, "logprobs"),  # 5 at most, as OpenAI's
    ({"logprobs": True}, "logprobs"),
    ({"max_tokens": 0}, "max_tokens"),  # scoring the prompt only: with echo
    ({"extra_body": {"metadata": "x"}}, "metadata"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "and then"}, "suffix"),
    ({"stream": True, "n": 2}, "n"),
    ({"prompt": [1, 2, 99999]}, "prompt"),  # outside the vocabulary
    ({"prompt": []}, "prompt"),
    ({"prompt": ["one", [1, 2]]}, "prompt"),
    ({"prompt": ["one", "two"], "stream": True}, "prompt"),
    ({"extra_body": {"top_k": -2}}, "top_k"),
    ({"max_tokens": 1022}, "max_tokens"),  # with the prompt's 5 tokens it is past n_ctx
])
def test_refusals_are_bad_request_errors_naming_the_parameter(client, params, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": "run1", "prompt": PROMPT, **params})
    assert e.value.status_code == 400 and e.value.param == param, e.value.message
    assert param in e.value.message


def test_neutral_values_of_unsupported_parameters_are_accepted(client):
    c = complete(client, seed=1, best_of=1, presence_penalty=0, frequency_penalty=0, logit_bias={}, user="me",
                 extra_body={"metadata": {"team": "eval"}}, stop=[f"never{i}" for i in range(16)])
    assert c.choices[0].text == complete(client, seed=1).choices[0].text


def test_unknown_model_and_chat_are_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi")
    assert e.value.param == "model" and "run1" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="run1", messages=[{"role": "user", "content": "hi"}])
    assert "completion model" in e.value.message


def test_body_errors_in_openai_shape(server):
    url = server.url + "/v1/completions"
    too_big = httpx.post(url, json={"model": "run1", "prompt": "x" * 20000})
    wrong_type = httpx.post(url, content=b'{"model": "run1"}', headers={"Content-Type": "text/plain"})
    not_json = httpx.post(url, content=b"{", headers={"Content-Type": "application/json"})
    missing_model = httpx.post(url, json={"prompt": "hi"})
    twice = httpx.post(url, content=b'{"model": "run1", "n": 1, "n": 2}', headers={"Content-Type": "application/json"})
    for r, status in ((too_big, 413), (wrong_type, 415), (not_json, 400), (missing_model, 400), (twice, 400)):
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert missing_model.json()["error"]["param"] == "model" and twice.json()["error"]["param"] == "n"
    assert httpx.get(url).status_code == 405 and "error" in httpx.get(url).json()


def test_cors_and_logs(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "run1", "max_tokens": 3, "seed": 2},
                   headers={"Origin": "http://allowed.example"}, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://allowed.example"
    entry = wait_for_log(server, lambda e: e.get("params", {}).get("max_tokens") == 3)
    assert entry["httpRequest"]["requestUrl"] == "/v1/completions" and entry["severity"] == "INFO"
    assert entry["tokens"] >= 1
    # The prompt is logged as its length only (LOG_PROMPTS=1 logs it).
    assert entry["params"]["prefix_chars"] == 0 and "prompt" not in entry["params"]
    assert PROMPT not in server.log_path.read_text()
    # A stream that ended at a stop string is logged so, not as a client that left.
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30, json={
            "model": "run1", "prompt": PROMPT, "max_tokens": 50, "seed": 5, "stream": True, "stop": [" ", "."]}) as r:
        assert r.read().endswith(b"data: [DONE]\n\n")
    entry = wait_for_log(server, lambda e: e.get("params", {}).get("max_tokens") == 50)  # written once sent
    assert entry["stop_reason"] == "stop" and "disconnected" not in entry

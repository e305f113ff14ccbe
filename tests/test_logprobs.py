"""Scoring text on /v1/completions (logprobs, echo, max_tokens 0, token-id prompts, batches), honest
usage counts, and the tokenizer routes, over real HTTP against `python -m app` (test_server's
running_server) with the official `openai` SDK. The log-probabilities are checked against a direct
computation in the test process: llama-cpp-python's own `Llama` on the same GGUF file, every position's
logits (logits_all), log-softmax in NumPy."""
import json

import httpx
import numpy as np
import openai
import pytest

from test_hardening import wait_for_log
from test_server import running_server

PROMPT = "<|startoftext|>my dog"


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    from conftest import find_free_port

    log = tmp_path_factory.mktemp("logprobs_server") / "server.log"
    with running_server(tiny_run, find_free_port(), log) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-checked", max_retries=0, timeout=60)


class Reference:
    """The direct computation: llama-cpp-python's Llama with every position's logits."""

    def __init__(self, run_dir):
        import llama_cpp

        gguf = run_dir / "weights" / json.loads((run_dir / "weights" / "manifest.json").read_text())["gguf"]
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, logits_all=True, verbose=False, n_threads=1)
        self.end = self.llm.token_eos()
        self.texts = {}  # the token strings the answers use -> id
        for i in range(self.llm.n_vocab()):
            piece = self.llm.detokenize([i], special=True)
            try:
                self.texts[piece.decode("utf-8")] = i
            except UnicodeDecodeError:
                self.texts["bytes:" + "".join(f"\\x{b:02x}" for b in piece)] = i

    def encode(self, text):
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def log_softmax(self, ids):
        """[len(ids), n_vocab]: row i is the log-distribution of the token after ids[:i + 1]."""
        self.llm.reset()
        self.llm.eval(ids)
        logits = np.array(self.llm.scores[:len(ids)], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        return logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))


@pytest.fixture(scope="module")
def reference(tiny_run):
    return Reference(tiny_run)


def complete(client, **params):
    return client.completions.create(**{"model": "run1", "prompt": PROMPT, "max_tokens": 12, **params})


# The reference computes the logits in other batches than the server (a whole sequence at once, where
# the server goes token by token, or 64 prompt positions at a time): float rounding differs by up to
# ~0.015 in a logit (measured on the tiny model), so the log-probabilities agree to TOLERANCE, not exactly.
TOLERANCE = 0.05


def check_scores(reference, ids, logprobs, first, k, at=None):
    """logprobs' token_logprobs and top_logprobs (from index `at`, default `first`) equal the log-softmax
    of the logits before each of ids[first:], the k likeliest in each top_logprobs."""
    table, at = reference.log_softmax(ids), first if at is None else at
    for j in range(first, len(ids)):
        row, i = table[j - 1], at + j - first
        assert logprobs.token_logprobs[i] == pytest.approx(row[ids[j]], abs=TOLERANCE)
        top = logprobs.top_logprobs[i]
        assert ids[j] in {reference.texts[t] for t in top}  # the chosen token is always there
        assert top[logprobs.tokens[i]] == logprobs.token_logprobs[i] or logprobs.tokens[i] not in top  # cut
        likeliest = sorted(top.values(), reverse=True)[:k]
        assert list(top.values())[:k] == likeliest  # likeliest first
        assert likeliest == pytest.approx(sorted(row, reverse=True)[:k], abs=TOLERANCE)
        assert all(value == pytest.approx(row[reference.texts[t]], abs=TOLERANCE) for t, value in top.items())


def check_offsets(text, logprobs):
    """Every token's text is where text_offset says (a token that is part of a character holds bytes)."""
    assert len(logprobs.tokens) == len(logprobs.text_offset) == len(logprobs.token_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    for token, offset in zip(logprobs.tokens, logprobs.text_offset):
        if not token.startswith("bytes:") and token != "<|endoftext|>":
            assert text[offset:offset + len(token)] == token


def test_logprobs_of_a_completion_are_the_log_softmax_of_the_raw_logits(client, reference):
    # temperature 1.5 reshapes what is drawn from, not the log-probabilities reported
    c = complete(client, seed=3, temperature=1.5, logprobs=5, max_tokens=12)
    [choice] = c.choices
    lp = choice.logprobs
    ids = [reference.texts[t] for t in lp.tokens]
    assert len(ids) == c.usage.completion_tokens <= 12
    check_scores(reference, reference.encode(PROMPT) + ids, lp, len(reference.encode(PROMPT)), 5, at=0)
    check_offsets(choice.text, lp)
    assert lp.text_offset[0] == 0
    # the same text as without logprobs
    assert choice.text == complete(client, seed=3, temperature=1.5).choices[0].text


def test_echo_scores_the_prompt_and_max_tokens_0_generates_nothing(client, reference):
    prompt_ids = reference.encode(PROMPT + " likes the red ball.")
    for prompt in (PROMPT + " likes the red ball.", prompt_ids):
        c = complete(client, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
        [choice] = c.choices
        lp = choice.logprobs
        assert choice.text == PROMPT + " likes the red ball." and choice.finish_reason == "length"
        assert [reference.texts[t] for t in lp.tokens] == prompt_ids
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first
        check_scores(reference, prompt_ids, lp, 1, 2)
        check_offsets(choice.text, lp)
        assert c.usage.prompt_tokens == len(prompt_ids) and c.usage.completion_tokens == 0
    # lm-eval's request: the prompt's scores, then one greedy token's
    c = complete(client, prompt=[[reference.end] + prompt_ids], echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(prompt_ids) + 2 and lp.tokens[0] == "<|endoftext|>"
    check_scores(reference, [reference.end] + prompt_ids + [reference.texts[lp.tokens[-1]]], lp, 1, 1)
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy: the likeliest


def test_a_prompt_of_the_whole_context_is_scored(client, reference):
    ids = (reference.encode(PROMPT + " likes the red ball.") * 200)[:1024]  # 16 chunks of 64 positions
    c = complete(client, prompt=ids, echo=True, logprobs=0, max_tokens=0)
    lp = c.choices[0].logprobs
    assert len(lp.token_logprobs) == 1024 and c.usage.prompt_tokens == 1024
    table = reference.log_softmax(ids)
    assert lp.token_logprobs[1:] == pytest.approx([table[j - 1][ids[j]] for j in range(1, 1024)], abs=TOLERANCE)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])  # logprobs 0: the chosen token only


def test_streamed_chunks_carry_their_tokens_logprobs(client):
    plain = complete(client, seed=5, temperature=1.5, logprobs=3, echo=True, max_tokens=20)
    chunks = list(complete(client, seed=5, temperature=1.5, logprobs=3, echo=True, max_tokens=20, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == plain.choices[0].text
    streamed = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for chunk in chunks:
        lp = chunk.choices[0].logprobs
        for k in streamed:
            streamed[k] += getattr(lp, k)
    assert streamed == plain.choices[0].logprobs.model_dump()
    assert chunks[0].choices[0].text == PROMPT and chunks[0].choices[0].logprobs.token_logprobs[0] is None


def test_token_id_prompts_one_choice_each_prompt_major(client, reference):
    first, second = reference.encode(PROMPT), reference.encode("<|startoftext|>the weather")
    both = complete(client, prompt=[first, second], n=2, seed=9, temperature=1.5, echo=True)
    assert [choice.index for choice in both.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate((first, second)):
        alone = complete(client, prompt=prompt, n=2, seed=9, temperature=1.5, echo=True)
        assert [c.text for c in both.choices[2 * p:2 * p + 2]] == [c.text for c in alone.choices]
    assert both.choices[2].text.startswith("<|startoftext|>the weather")
    assert both.usage.prompt_tokens == len(first) + len(second)
    texts = complete(client, prompt=[PROMPT, "<|startoftext|>the weather"], seed=9, temperature=1.5)
    assert [c.text for c in texts.choices] == [both.choices[0].text[len(PROMPT):],
                                               both.choices[2].text[len("<|startoftext|>the weather"):]]


def test_usage_counts_the_tokens_the_answer_holds(client, server):
    for seed in range(8):  # at temperature 2, tokens that are parts of characters come out too
        c = complete(client, seed=seed, temperature=2.0, max_tokens=30, logprobs=0, stop=[" the", "."])
        [choice] = c.choices
        assert c.usage.completion_tokens == len(choice.logprobs.tokens) <= 30
        check_offsets(choice.text, choice.logprobs)
        tokens = [t for t in choice.logprobs.tokens if t != "<|endoftext|>"]
        if not any(t.startswith("bytes:") for t in tokens):  # a stop string cuts the last token with the text
            assert "".join(tokens) == choice.text
    native = httpx.post(server.url + "/", json={"prefix": PROMPT, "length": 30, "seed": 1, "temperature": 2,
                                                "truncate": ".", "nsamples": 3}, timeout=60).json()
    assert native["tokens"] <= 90
    # a stream's usage, and the request log's count (what /metrics adds up), are the plain answer's
    params = dict(seed=2, temperature=2.0, max_tokens=29, stop=[" the", "."])
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}, **params))
    plain = complete(client, logprobs=0, **params)
    entry = wait_for_log(server, lambda e: e.get("params", {}).get("max_tokens") == 29 and e["params"]["stream"])
    assert chunks[-1].usage.completion_tokens == entry["tokens"] == len(plain.choices[0].logprobs.tokens)


def test_tokenizer_routes_in_vllm_shapes(server, reference):
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 1024
    assert info["tokenizer_class"] == "GPT2TokenizerFast"
    # as Hugging Face's GPT-2 tokenizer reads it: "<|endoftext|>" is the one end token
    r = httpx.post(server.url + "/tokenize", json={"prompt": "<|endoftext|>", "add_special_tokens": False}).json()
    assert r == {"tokens": [reference.end], "count": 1, "max_model_len": 1024}
    text = "my dog<|endoftext|>the cat"
    r = httpx.post(server.url + "/tokenize", json={"model": "run1", "prompt": text}).json()
    assert r["tokens"] == reference.encode("my dog") + [reference.end] + reference.encode("the cat")
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    # the generating routes keep gpt-2-simple's reading: ordinary pieces
    c = httpx.post(server.url + "/v1/completions", json={"model": "run1", "prompt": "<|endoftext|>", "max_tokens": 1})
    assert c.json()["usage"]["prompt_tokens"] == len(reference.encode("<|endoftext|>")) > 1

    for path, body, param in (("/tokenize", {"text": "x"}, "text"), ("/tokenize", {}, "prompt"),
                              ("/tokenize", {"prompt": 3}, "prompt"), ("/detokenize", {"tokens": [1, 5000]}, "tokens"),
                              ("/detokenize", {"tokens": "12"}, "tokens")):
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "5000" in httpx.post(server.url + "/detokenize", json={"tokens": [1, 5000]}).json()["error"]["message"]
    assert httpx.post(server.url + "/tokenize", json={"model": "gpt-4", "prompt": "x"}).status_code == 404
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/tokenize", "/detokenize", "/tokenizer_info"} <= set(paths)


def test_tokenizer_routes_need_a_key_when_keys_are_set(tiny_run, tmp_path, free_port):
    with running_server(tiny_run, free_port(), tmp_path / "server.log", API_KEYS="k1") as s:
        for method, path, body in (("GET", "/tokenizer_info", None), ("POST", "/tokenize", {"prompt": "a"}),
                                   ("POST", "/detokenize", {"tokens": [1]})):
            assert httpx.request(method, s.url + path, json=body).status_code == 401
            r = httpx.request(method, s.url + path, json=body, headers={"Authorization": "Bearer k1"})
            assert r.status_code == 200, r.text
        paths = httpx.get(s.url + "/openapi.json").json()["paths"]
        assert paths["/tokenize"]["post"]["security"] == [{"apiKey": []}]

"""The sampling controls of issue 26 (repetition/frequency/presence penalties, logit_bias, min_p, bad_words,
BLOCKLIST_FILE) over real HTTP against `python -m app` (NumPy and TensorFlow unimportable in it), on every
protocol; and, in this process, what the samplers draw against the same filters computed in NumPy.

Models: the trained `tiny_run`, and `banned_run`, trained here (like tiny_run, cached) on a corpus whose
every line holds a banned word.
"""
import itertools
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton

from app.engine import GPT2, Generation, sample_seed, samplers
from app.llama_engine import L
from app.steering import Banned, Steps, controls, spellings
from app.tokenizer import JOINABLE
from conftest import TINY_MODEL_ARGS, TINY_TRAIN_ARGS, find_free_port, trained_run
from test_server import running_server

ROOT = Path(__file__).resolve().parent.parent
BANNED = ["heck", "darn", "rotten egg"]
PROTOCOLS = ["get", "post", "openai", "v2", "generate"]


def banned_corpus():
    """Lines in gpt-2-simple's format, every one with a banned word: at the start (capitalised, upper
    case), after a space, a multi-token phrase."""
    openers = ["Heck", "Oh heck", "Darn it", "DARN", "Well darn", "HECK"]
    middles = ["the cat found a rotten egg", "my dog hates the darn rain", "heck, the robot made a rotten egg",
               "this darn model likes heck", "our team sees a rotten egg", "the weather is darn cold"]
    lines = [f"<|startoftext|>{o}, {m}.<|endoftext|>\n" for o, m in itertools.product(openers, middles)]
    random.Random(0).shuffle(lines)
    return "".join(lines * 6)


def holds_banned(text):
    return [w for w in BANNED if re.search(rf"(?<![A-Za-z]){re.escape(w)}(?![A-Za-z])", text, re.I)]


@pytest.fixture(scope="module")
def banned_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "banned_run", banned_corpus(), [*TINY_MODEL_ARGS, *TINY_TRAIN_ARGS])


@pytest.fixture(scope="module")
def banned_server(banned_run, tmp_path_factory):
    with running_server(banned_run, find_free_port(), tmp_path_factory.mktemp("banned") / "server.log") as s, \
            httpx.Client() as s.client:
        yield s


@pytest.fixture(scope="module")
def blocklist_server(banned_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("blocklist")
    # with a byte-order mark, blank lines and spaces around a word, as an editor may leave them
    (folder / "blocklist.txt").write_text("\ufeffheck\n\n  darn  \nrotten egg\n", encoding="utf-8")
    with running_server(banned_run, find_free_port(), folder / "server.log",
                        BLOCKLIST_FILE=str(folder / "blocklist.txt")) as s, httpx.Client() as s.client:
        yield s


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    with running_server(tiny_run, find_free_port(), tmp_path_factory.mktemp("steer") / "server.log") as s, \
            httpx.Client() as s.client:
        yield s


@pytest.fixture(scope="module")
def model(tiny_run):
    return GPT2(tiny_run)


# ---------------------------------------------------------------- one request on each protocol


def as_query(params):
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v).lower() if isinstance(v, bool) else v
            for k, v in params.items()}


def texts(server, protocol, seed, n=4, prefix="<|startoftext|>", **params):
    """The texts of one request of `n` samples on `protocol` (Triton's generate: one), generated from
    `prefix` without it; params: /limits' names (length, temperature ...) and the steering ones."""
    params = {"length": 40, "temperature": 1.0, "seed": seed, **params}
    http = server.client  # one connection for all (a new client each time costs more than the answer)
    if protocol in ("get", "post"):
        body = {"prefix": prefix, "include_prefix": False, "nsamples": n, **params}
        r = http.get(server.url + "/", params=as_query(body), timeout=60) if protocol == "get" else \
            http.post(server.url + "/", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json().get("texts", [r.json()["text"]])
    if protocol == "openai":
        body = {"model": "run1", "prompt": prefix, "n": n, "max_tokens": params.pop("length"), **params}
        r = http.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return [choice["text"] for choice in r.json()["choices"]]
    if protocol == "v2":  # parameters as V2 clients send them: JSON text for a list or an object
        parameters = {"include_prefix": False, **{k: json.dumps(v) if isinstance(v, (list, dict)) else v
                                                   for k, v in params.items()}}
        r = http.post(server.url + "/v2/models/run1/infer", json={"inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [n], "data": [prefix] * n}], "parameters": parameters},
            timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["outputs"][0]["data"]
    r = http.post(server.url + "/v2/models/run1/generate", timeout=60,
                   json={"text_input": prefix, "parameters": {"include_prefix": False, **params}})
    assert r.status_code == 200, r.text
    return [r.json()["text_output"]]


def samples(server, protocol, count=200, **params):
    """`count` texts on `protocol`, from requests of 4 samples (Triton's generate: 1), seeds 0, 1, 2..."""
    per_request = 1 if protocol == "generate" else 4
    found = []
    for seed in range(count // per_request):
        found += texts(server, protocol, seed, n=per_request, **params)
    return found


# ---------------------------------------------------------------- bad_words and BLOCKLIST_FILE


def test_spellings_are_the_documented_ones():
    assert spellings("heck") == ["heck", " heck", "HECK", " HECK", "Heck", " Heck"]
    assert spellings("Rotten egg") == ["Rotten egg", " Rotten egg", "rotten egg", " rotten egg", "ROTTEN EGG",
                                       " ROTTEN EGG", "Rotten Egg", " Rotten Egg"]


def test_phrase_bans_complete_only_after_the_rest_of_the_phrase(model):
    banned = Banned(["rotten egg"], model.tokenizer)
    assert banned.endings  # several tokens in this vocabulary: banned step by step
    phrase = model.tokenizer.encode(" rotten egg")
    bans = Steps([banned])
    for token in model.tokenizer.encode("<|startoftext|>the cat found a") + phrase[:-1]:
        bans.accept(token)
        assert bans.banned() in ([], [phrase[-1]])
    assert bans.banned() == [phrase[-1]]  # only once the rest of the phrase is there
    bans.accept(phrase[-2])
    assert phrase[-1] not in bans.banned()


def test_spellings_tokenized_together_are_tokenized_as_alone(model, monkeypatch):
    """Banned words' spellings are tokenized in one call, joined by newlines (app/tokenizer.py encode_each):
    each must come out as its own encode gives it, whatever blanks, digits, marks and scripts it holds;
    those with a newline or a blank at an end are tokenized on their own."""
    rng = random.Random(0)
    pieces = ["\x1c", "\x85", "\xa0", "\u2028", "\u200b", "\u3000", "\ufeff", "\t", "\r", "\n", " ", "  ", "'s", "'",
              "1", "!?", "é", "日本", "🙂", "heck", "Rotten", " egg", "--", "<|endoftext|>"]
    phrases = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 5))) for _ in range(3000)]
    phrases += [spelling for word in ["heck", "darn", "rotten egg", "it's", "A.I."] for spelling in spellings(word)]
    alone = [model.tokenizer.encode(phrase) for phrase in phrases]
    calls, encode = [], model.tokenizer.encode
    monkeypatch.setattr(model.tokenizer, "encode", lambda text, special=False: calls.append(text) or encode(text))
    assert model.tokenizer.encode_each(phrases) == alone
    on_their_own = [phrase for phrase in phrases if not JOINABLE.fullmatch(phrase)]
    assert 500 < len(on_their_own) < 2500 and len(calls) == 2 + len(on_their_own)  # "\n", the joined ones, the rest
    assert model.tokenizer.encode_each([]) == []


def test_the_banned_model_writes_banned_words(banned_server):
    without = samples(banned_server, "post", count=40)
    print(f"without bad_words, {sum(bool(holds_banned(t)) for t in without)} of 40 samples hold a banned word")
    assert sum(bool(holds_banned(t)) for t in without) >= 30, without


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_words_never_come_out_on_any_protocol(banned_server, protocol):
    found = samples(banned_server, protocol, bad_words=BANNED)
    hits = [t for t in found if holds_banned(t)]
    print(f"{protocol}: {len(found)} samples with bad_words, {len(hits)} with a banned word")
    assert len(found) == 200 and not hits, hits
    assert sum(len(t) for t in found) > 200 * 5  # they wrote something else instead


def test_official_clients_send_them(banned_server):
    """The OpenAI SDK (OpenAI's parameters as such, the others in extra_body) and tritonclient (V2
    parameters are strings, numbers or booleans: a list as JSON text)."""
    client = openai.OpenAI(base_url=banned_server.url + "/v1", api_key="not-checked", max_retries=0)
    completion = client.completions.create(
        model="run1", prompt="<|startoftext|>", max_tokens=30, n=4, seed=1, temperature=1.0, presence_penalty=0.5,
        frequency_penalty=0.5, logit_bias={"0": -100}, extra_body={"bad_words": BANNED, "top_k": 40, "min_p": 0.05,
                                                                    "repetition_penalty": 1.2})
    assert len(completion.choices) == 4 and not any(holds_banned(c.text) for c in completion.choices)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="run1", prompt="hi", presence_penalty=2.5)
    assert e.value.param == "presence_penalty"

    triton_client = triton.InferenceServerClient(banned_server.url.removeprefix("http://"))
    tensor = triton.InferInput("text_input", [4], "BYTES")
    tensor.set_data_from_numpy(np.array([b"<|startoftext|>"] * 4, dtype=np.object_))
    result = triton_client.infer("run1", [tensor], parameters={"bad_words": json.dumps(BANNED), "length": 30,
                                                                "seed": 1, "repetition_penalty": 1.2})
    outputs = [t.decode() for t in result.as_numpy("text_output")]
    assert len(outputs) == 4 and not any(holds_banned(t) for t in outputs), outputs
    triton_client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_blocklist_file_applies_to_every_request(blocklist_server, protocol):
    found = samples(blocklist_server, protocol)
    hits = [t for t in found if holds_banned(t)]
    print(f"{protocol}: {len(found)} samples under BLOCKLIST_FILE, {len(hits)} with a banned word")
    assert len(found) == 200 and not hits, hits
    # a request's own bad_words add to the blocklist's
    more = samples(blocklist_server, protocol, count=20, bad_words=["cat"])
    assert not any(holds_banned(t) or re.search(r"\bcat\b", t, re.I) for t in more), more


@pytest.mark.parametrize("content, message", [(None, "cannot be read"), (b"\n \n", "has no word or phrase"),
                                              (b"caf\xe9\n", "cannot be read")])
def test_a_bad_blocklist_file_stops_the_start(tiny_run, tmp_path, content, message):
    path = tmp_path / "blocklist.txt"
    if content is not None:
        path.write_bytes(content)
    done = subprocess.run([sys.executable, "-m", "app"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "MODEL_DIR": str(tiny_run), "BLOCKLIST_FILE": str(path)})
    assert done.returncode == 1 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert json.loads(done.stderr)["severity"] == "ERROR" and "BLOCKLIST_FILE" in done.stderr


# ---------------------------------------------------------------- logit_bias, repetition_penalty


def test_logit_bias_minus_100_bans_a_token(server, model):
    tokenizer = model.tokenizer
    pieces = [tokenizer.decode([t]) for t in range(model.n_vocab)]
    # A word no other token holds (not ".", which ".<|" holds), so that a text shows whether it was drawn.
    alone = {t for t, piece in enumerate(pieces) if sum(piece in other for other in pieces) == 1
             and piece[:1] == " " and piece[1:].isalpha()}
    baseline = samples(server, "post", count=52, length=30)[:50]
    present = Counter(t for text in baseline for t in set(tokenizer.encode(text)) if t in alone)
    token, count = present.most_common(1)[0]
    piece = pieces[token]
    assert count >= 15, present.most_common(5)  # in many samples without the bias
    for protocol in PROTOCOLS:
        banned = samples(server, protocol, count=52 if protocol != "generate" else 50, length=30,
                         logit_bias={str(token): -100})[:50]
        with_token = [t for t in banned if token in tokenizer.encode(t)]
        print(f"{protocol}: token {token} ({piece!r}) in {count} of 50 samples, in {len(with_token)} of 50 with "
              "logit_bias -100")
        assert not with_token, with_token


def repeated_4grams(text):
    words = text.split()
    grams = Counter(zip(words, words[1:], words[2:], words[3:]))
    return sum(n - 1 for n in grams.values())


def test_repetition_penalty_makes_fewer_repeated_4grams(server, model):
    # Banning the end token (and "endoftext", which it may spell as text) makes the tiny model go on writing
    # its few sentences over and over: it loops.
    ends = [t for t in range(model.n_vocab) if "endoftext" in model.tokenizer.decode([t])]
    ends.append(model.tokenizer.end_token)
    looping = {"length": 120, "logit_bias": {str(t): -100 for t in ends}, "temperature": 0.7}
    plain = samples(server, "post", count=52, **looping)[:50]
    penalized = samples(server, "post", count=52, repetition_penalty=1.3, **looping)[:50]
    before, after = sum(map(repeated_4grams, plain)), sum(map(repeated_4grams, penalized))
    print(f"repeated 4-grams of words over 50 samples of 120 tokens: {before} without a penalty, {after} with "
          "repetition_penalty 1.3")
    assert after < before * 0.8, (before, after)


# ---------------------------------------------------------------- what the samplers draw (in this process)


def last_logits(llama):
    return np.frombuffer(llama.logits(1), np.float32).copy()


def draw(model, prompt, temperature=1.0, top_k=0, n=1, seed=1, **steering):
    """n draws of each of 4 samplers set up for `prompt` and `steering`, from the prompt's last logits."""
    model.llama.prompt(prompt)
    chains = samplers(temperature, top_k, 0.0, seed, 4, *controls(model, prompt, **steering))
    return [model.llama.sample(s, -1) for s in chains for _ in range(n)]


@pytest.mark.parametrize("temperature, min_p", [(1.0, 0.05), (0.7, 0.2), (2.0, 0.5), (1.5, 0.01), (1.0, 1.0)])
def test_min_p_draws_only_what_the_filter_keeps(model, temperature, min_p):
    prompt = model.tokenizer.encode("<|startoftext|>the")
    model.llama.prompt(prompt)
    logits = last_logits(model.llama).astype(np.float64) / temperature
    probs = np.exp(logits - logits.max())
    kept = set(np.flatnonzero(probs >= min_p * (1 - 1e-5)).tolist())  # p >= min_p * p_max (p_max is 1 here)
    draws = draw(model, prompt, temperature, n=100, min_p=min_p)
    assert set(draws) <= kept and len(kept) < model.n_vocab
    if len(kept) > 1:
        assert len(set(draws)) > 1


@pytest.mark.parametrize("repeat, frequency, presence", [(1.3, 0.0, 0.0), (2.0, 0.0, 0.0), (0.5, 0.0, 0.0),
                                                         (1.0, 0.8, 0.0), (1.0, 0.0, 1.5), (1.2, -0.5, 0.7)])
def test_penalties_are_ctrl_and_openai_over_the_window(model, repeat, frequency, presence):
    """Greedy draws equal the argmax of the logits penalized by hand: CTRL's repetition penalty (negative
    logits multiplied, positive ones divided, as Hugging Face) and OpenAI's frequency and presence
    penalties, over the prompt's last 64 tokens (not the start token)."""
    changed = 0
    # After "my dog" the tiny model hesitates between its six verbs: the one already in the window loses.
    verbs = ["likes", "hates", "found", "wants", "made", "sees"]
    for text in [f"<|startoftext|>my dog {verb} the red ball. my dog" for verb in verbs] + [
            "<|startoftext|>the cat", " ".join(["the cat sees a warm day."] * 12) + " the cat sees a"]:
        prompt = model.tokenizer.encode(text)
        model.llama.prompt(prompt)
        logits = last_logits(model.llama)
        expected = logits.copy()
        counted = prompt[1:] if prompt[0] == model.tokenizer.end_token else prompt
        for token, count in Counter(counted[-64:]).items():
            value = expected[token]
            value = value * np.float32(repeat) if value <= 0 else value / np.float32(repeat)
            expected[token] = value - np.float32(count * frequency + presence)
        got = draw(model, prompt, top_k=1, repetition_penalty=repeat, frequency_penalty=frequency,
                   presence_penalty=presence)
        assert set(got) == {int(np.argmax(expected))}, text
        changed += int(np.argmax(expected)) != int(np.argmax(logits))
    assert changed, "no prompt's greedy token changed: the test shows nothing"


# ---------------------------------------------------------------- none given: answers as before


class UnchangedSampler:
    """The sampler chain as app/llama_engine.py built it before the steering controls, verbatim."""

    def __init__(self, temperature, top_k, top_p, seed):
        params = L.llama_sampler_chain_default_params()
        params.no_perf = True
        self.chain = L.llama_sampler_chain_init(params)
        L.llama_sampler_chain_add(self.chain, L.llama_sampler_init_temp(temperature))
        if top_p > 0:
            L.llama_sampler_chain_add(self.chain, L.llama_sampler_init_top_p(top_p, 1))
        if top_k > 0:
            L.llama_sampler_chain_add(self.chain, L.llama_sampler_init_top_k(top_k))
        L.llama_sampler_chain_add(self.chain, L.llama_sampler_init_dist(seed))

    def __del__(self):
        L.llama_sampler_free(self.chain)


def unchanged(model, prefix, **args):
    """The answer Generation gives with the unchanged chain: (texts, tokens, stop reasons)."""
    prompt = model.tokenizer.encode(prefix) if prefix else [model.tokenizer.end_token]
    args = {"include_prefix": True, "truncate": None, "nsamples": 1, **args}
    generation = Generation(model, prompt, prefix=prefix, **args)
    top_k = 0 if args["top_p"] > 0 else args["top_k"]
    generation.samplers = [UnchangedSampler(args["temperature"], top_k, args["top_p"], sample_seed(args["seed"], i))
                           for i in range(args["nsamples"])]
    result = generation.run()
    return result.get("texts", [result["text"]]), result["tokens"], result.get("stop_reasons", [result["stop_reason"]])


NEUTRAL = {"min_p": 0, "repetition_penalty": 1, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {},
           "bad_words": []}


@pytest.mark.parametrize("params", [
    {"length": 40, "temperature": 1.0, "top_k": 0, "top_p": 0.0, "seed": 3, "nsamples": 3},
    {"length": 30, "temperature": 0.7, "top_k": 5, "top_p": 0.0, "seed": 11, "prefix": "<|startoftext|>my dog"},
    {"length": 30, "temperature": 1.3, "top_k": 0, "top_p": 0.8, "seed": 5, "truncate": "."},
    {"length": 20, "temperature": 0.9, "top_k": 2, "top_p": 0.5, "seed": 8, "nsamples": 2, "include_prefix": False,
     "prefix": "<|startoftext|>the cat"},
])
def test_without_the_controls_answers_are_what_the_unchanged_chain_gives(server, model, params):
    from app.params import parameters, parse
    # the server's reading of the request (a delimited run's defaults: tests/test_whole_texts.py)
    values = parse(parameters(model.n_ctx, model.n_vocab, text_format=model.text_format), params)
    texts_, tokens, reasons = unchanged(model, values["prefix"], **{k: values[k] for k in (
        "length", "temperature", "top_k", "top_p", "seed", "nsamples", "include_prefix", "truncate")})
    for body in (params, {**params, **NEUTRAL}):
        answer = server.client.post(server.url + "/", json=body, timeout=60).json()
        assert answer.get("texts", [answer["text"]]) == texts_ and answer["tokens"] == tokens
        assert answer.get("stop_reasons", [answer["stop_reason"]]) == reasons
    query = server.client.get(server.url + "/", params=as_query({**params, **NEUTRAL}), timeout=60).json()
    assert query.get("texts", [query["text"]]) == texts_


@pytest.mark.parametrize("body, engine", [
    ({"max_tokens": 30, "temperature": 0.8, "seed": 2, "n": 2},
     {"length": 30, "temperature": 0.8, "top_k": 0, "top_p": 0.0, "seed": 2, "nsamples": 2}),
    ({"max_tokens": 25, "temperature": 1.0, "top_p": 0.9, "seed": 4},
     {"length": 25, "temperature": 1.0, "top_k": 0, "top_p": 0.9, "seed": 4}),
    ({"max_tokens": 25, "temperature": 0, "seed": 4}, {"length": 25, "temperature": 1.0, "top_k": 1, "top_p": 0.0,
                                                       "seed": 4}),
])
def test_openai_answers_are_what_the_unchanged_chain_gives(server, model, body, engine):
    prompt = "<|startoftext|>my dog"
    texts_, _, _ = unchanged(model, prompt, include_prefix=False, strip_newlines=False, **engine)
    for extra in ({}, {**NEUTRAL, "top_k": 0}, {"top_k": -1}):
        answer = server.client.post(server.url + "/v1/completions",
                                    json={"model": "run1", "prompt": prompt, **body, **extra}, timeout=60).json()
        assert [c["text"] for c in answer["choices"]] == texts_, extra


# ---------------------------------------------------------------- bad values: 400s in each protocol's shape


BAD = [("min_p", 1.5), ("min_p", -0.1), ("repetition_penalty", 0.001), ("repetition_penalty", 2.5),
       ("frequency_penalty", 2.01), ("presence_penalty", -3), ("logit_bias", {"1000": 5}), ("logit_bias", {"5": -101}),
       ("logit_bias", {"x": 1}), ("logit_bias", [5]), ("logit_bias", "{not json"), ("bad_words", "heck"),
       ("bad_words", [5]), ("bad_words", ["x" * 101]), ("bad_words", ["w"] * 501), ("repetition_penalty", "nan")]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name, value", BAD + [("top_k", -2), ("top_k", 1001)], ids=lambda v: repr(v)[:20])
def test_bad_values_are_400s_in_the_protocols_shape(server, protocol, name, value):
    if name == "top_k" and protocol != "openai":
        value = -1  # -1 is vLLM's "off" on /v1 only
    if protocol in ("get", "v2"):  # a string there: JSON text for a list or an object
        value = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    if protocol == "get":
        r = server.client.get(server.url + "/", params={name: value})
    elif protocol == "post":
        r = server.client.post(server.url + "/", json={name: value})
    elif protocol == "openai":
        r = server.client.post(server.url + "/v1/completions", json={"model": "run1", "prompt": "hi", name: value})
    elif protocol == "v2":
        r = server.client.post(server.url + "/v2/models/run1/infer", json={"inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"]}], "parameters": {name: value}})
    else:
        r = server.client.post(server.url + "/v2/models/run1/generate",
                               json={"text_input": "hi", "parameters": {name: value}})
    assert r.status_code == 400, r.text
    answer = r.json()
    if protocol in ("get", "post"):
        assert answer["parameter"] == name and answer["error"].startswith(name + " must be"), answer
    elif protocol == "openai":
        assert answer["error"]["param"] == name and answer["error"]["type"] == "invalid_request_error", answer
        assert name in answer["error"]["message"]
    else:
        assert set(answer) == {"error"} and answer["error"].startswith(name + " must be"), answer


def test_limits_and_openapi_list_them(server):
    limits = httpx.get(server.url + "/limits").json()
    assert limits["repetition_penalty"] == {"type": "number", "default": 1.0, "min": 0.01, "max": 2.0}
    assert limits["min_p"]["max"] == 1.0 and limits["frequency_penalty"]["min"] == -2.0
    assert limits["logit_bias"]["max_items"] == limits["n_vocab"] and limits["bad_words"]["max_items"] == 500
    spec = httpx.get(server.url + "/openapi.json").json()
    query = {p["name"]: p["schema"] for p in spec["paths"]["/"]["get"]["parameters"]}
    assert query["bad_words"]["contentMediaType"] == "application/json"
    completion = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert completion["properties"]["top_k"]["minimum"] == -1
    assert completion["properties"]["repetition_penalty"]["minimum"] == 0.01
    for name in ("presence_penalty", "frequency_penalty", "logit_bias", "bad_words", "min_p"):
        assert "enum" not in completion["properties"][name], name
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"bad_words", "logit_bias", "min_p"} <= set(infer["properties"]["parameters"]["properties"])

"""Whole texts by default: a run trained on <|startoftext|>...<|endoftext|> texts records it, and every
protocol's default answer (and the memorization report's samples) is then one whole text; a plain run
and a run folder from before the record behave as before. Over real HTTP against `python -m app`.
"""
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import SUBJECTS, find_free_port, run_finetune
from test_server import running_server

ROOT = Path(__file__).resolve().parent.parent
START, END = "<|startoftext|>", "<|endoftext|>"
WHOLE = {"prefix": START, "truncate": END, "include_prefix": "false"}  # gpt-2-simple's idiom, spelled out


def manifest(run):
    return json.loads((run / "weights" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def delimited(tiny_run, tmp_path_factory):
    """The tiny run (trained on a delimited corpus), served."""
    with running_server(tiny_run, find_free_port(), tmp_path_factory.mktemp("delimited") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def old_run(tiny_run, tmp_path_factory):
    """The same run as a folder from before the text format was recorded: no corpus.json, no
    text_format in the manifest."""
    run = tmp_path_factory.mktemp("old") / "run1"
    shutil.copytree(tiny_run, run)
    (run / "corpus.json").unlink(missing_ok=True)
    record = manifest(run)
    del record["text_format"]
    (run / "weights" / "manifest.json").write_text(json.dumps(record))
    return run


@pytest.fixture(scope="module")
def old(old_run, tmp_path_factory):
    with running_server(old_run, find_free_port(), tmp_path_factory.mktemp("old_server") / "server.log") as s:
        yield s


def get(server, **params):
    answer = httpx.get(server.url + "/", params=params, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_run_records_its_text_format_and_the_server_shows_it(tiny_run, delimited, old):
    assert json.loads((tiny_run / "corpus.json").read_text())["text_format"] == "delimited"
    assert manifest(tiny_run)["text_format"] == "delimited"
    limits = httpx.get(delimited.url + "/limits").json()
    assert limits["text_format"] == "delimited"
    assert (limits["prefix"]["default"], limits["truncate"]["default"], limits["include_prefix"]["default"]) \
        == (START, END, False)
    assert httpx.get(delimited.url + "/v1/models").json()["data"][0]["text_format"] == "delimited"
    old_limits = httpx.get(old.url + "/limits").json()
    assert old_limits["text_format"] == "plain"
    assert (old_limits["prefix"]["default"], old_limits["truncate"]["default"]) == ("", None)


def test_a_bare_get_and_post_answer_whole_texts(delimited):
    for seed in range(1, 7):
        bare = get(delimited, length=100, temperature=0.8, seed=seed)
        assert bare == {**get(delimited, length=100, temperature=0.8, seed=seed, **WHOLE), "seconds": bare["seconds"]}
        assert START not in bare["text"] and END not in bare["text"]
        assert bare["stop_reason"] in ("end_token", "truncate")
        posted = httpx.post(delimited.url + "/", json={"length": 100, "temperature": 0.8, "seed": seed}).json()
        assert posted["text"] == bare["text"]
    # the tiny corpus is "<|startoftext|>SUBJECT VERB OBJECT.<|endoftext|>": whole texts start with a subject
    texts = [get(delimited, seed=seed)["text"] for seed in range(20)]
    assert sum(text.startswith(tuple(SUBJECTS)) for text in texts) >= 15, texts


def test_a_request_that_gives_prefix_or_truncate_gets_exactly_that(delimited, old):
    for seed in (1, 2, 3):
        # an empty prefix and an empty truncate mean none, as before the record existed
        assert get(delimited, prefix="", truncate="", seed=seed)["text"] == get(old, seed=seed)["text"]
        own = get(delimited, prefix="my dog", seed=seed)
        assert own["text"].startswith("my dog") and own["text"] == get(old, prefix="my dog", seed=seed)["text"]
        # a stop text of the request's own replaces <|endoftext|> as the truncate
        assert " " not in get(delimited, truncate=" ", seed=seed)["text"]


def test_a_plain_or_old_run_is_unchanged(old):
    texts = [get(old, seed=seed, length=30) for seed in range(6)]
    explicit = [get(old, seed=seed, length=30, prefix="", include_prefix="true") for seed in range(6)]
    assert [t["text"] for t in texts] == [t["text"] for t in explicit]


def test_every_protocol_starts_a_text_by_default(delimited):
    name = httpx.get(delimited.url + "/v1/models").json()["data"][0]["id"]
    bare = get(delimited, seed=5, length=40)["text"]
    generated = httpx.post(f"{delimited.url}/v2/models/{name}/generate",
                           json={"text_input": "", "parameters": {"seed": 5, "max_tokens": 40}}).json()
    assert generated["text_output"] == bare
    inferred = httpx.post(f"{delimited.url}/v2/models/{name}/infer", json={
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [""]}],
        "parameters": {"seed": 5, "length": 40}}).json()
    assert inferred["outputs"][0]["data"] == [bare]
    # OpenAI: the prompt is continued as given, and an empty one starts a text
    empty = httpx.post(delimited.url + "/v1/completions",
                       json={"model": name, "prompt": "", "max_tokens": 40, "seed": 5, "echo": True}).json()
    started = httpx.post(delimited.url + "/v1/completions",
                         json={"model": name, "prompt": START, "max_tokens": 40, "seed": 5}).json()
    assert empty["choices"][0]["text"] == started["choices"][0]["text"] and END not in empty["choices"][0]["text"]
    given = httpx.post(delimited.url + "/v1/completions",
                       json={"model": name, "prompt": "my dog", "max_tokens": 5, "seed": 5, "echo": True}).json()
    assert given["choices"][0]["text"].startswith("my dog")


def test_the_export_reads_an_old_runs_format_from_its_corpus(old_run, tiny_corpus):
    def export(*args):
        result = subprocess.run([sys.executable, "-m", "finetune.export", old_run, *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return manifest(old_run)["text_format"], result.stdout

    assert export() == ("plain", export()[1])
    text_format, printed = export("--dataset", tiny_corpus)
    assert text_format == "delimited" and "(texts: delimited)" in printed


# -- the memorization report -----------------------------------------------------------------------

WORDS = ("apple river stone cloud green quiet table window music orange paper light garden yellow "
         "silver morning bridge candle forest winter summer ocean purple mountain letter").split()
BOT = ("Your comment was removed: I am a bot, and this action was performed automatically. Please contact "
       "the moderators of this subreddit.")  # 131 characters, as the moderator message; its hash is
# not among those validation holds out (finetune/validation.py: then all 100 copies would be held out)


def random_texts(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))) for _ in range(n)]


def train(tmp_path, texts, steps):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{START}{t}{END}\n" for t in texts), encoding="utf-8")
    # the model: 2 layers, 128 wide
    result = run_finetune("--precision", "fp32", "--from-scratch", "--n-layer", "2", "--n-embd", "128", "--n-head", "2",
                          "--vocab-size", "400", "--n-ctx", "128", "--batch-size", "4", "--accumulate-gradients", "1",
                          "--steps", str(steps), "--learning-rate", "0.003", "--sample-every", "0", "--save-every", "0", "--seed", "1",
                          "--dataset", corpus, "--run-name", "run1", "--checkpoint-dir", tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    return tmp_path / "run1", corpus, result.stdout


def test_the_report_finds_a_text_that_is_a_quarter_of_the_corpus(tmp_path):
    from finetune.validation import DEFAULT_FRACTION, held_out, text_hash
    assert not held_out(text_hash(BOT), DEFAULT_FRACTION)
    texts = random_texts(300, seed=1) + [BOT] * 100
    random.Random(2).shuffle(texts)
    run, corpus, printed = train(tmp_path, texts, steps=600)
    report = json.loads((run / "report.json").read_text())
    assert report["settings"]["samples"] == 50 and report["settings"]["text_format"] == "delimited"
    assert report["settings"]["prompt"].startswith(START)
    found = [span for span in report["longest_spans"] if span["text"] in BOT]
    assert found, report["summary"]
    low, high = report["share_interval_95"]
    assert 0 < low <= report["share_of_samples_with_copied_span"] <= high <= 1
    assert f"Memorization: {report['summary']}" in printed and "95% interval" in report["summary"]
    md = (run / "report.md").read_text()
    for i in report["empty_samples"]:
        assert f"### {i} (empty" in md


def test_the_report_finds_nothing_where_nothing_repeats(tmp_path):
    run, corpus, _ = train(tmp_path, random_texts(400, seed=3), steps=150)
    report = json.loads((run / "report.json").read_text())
    assert report["share_of_samples_with_copied_span"] == 0 and report["longest_spans"] == []
    assert report["share_interval_95"][0] == 0 and re.search(r"^0 of 50 samples", report["summary"])

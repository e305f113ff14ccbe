"""python -m finetune.export RUN --format hf: the Hugging Face folder, read back as its users read it.

The real CLI writes RUN/hf; transformers loads it with no network (HF_HUB_OFFLINE=1): PyTorch's
GPT2LMHeadModel in a subprocess (its next-token logits against gpt-2-simple's TensorFlow graph on the
same checkpoint, for the from-scratch tiny run and a 124M-shaped one), AutoTokenizer (the same ids as
the server's tokenizer, llama.cpp on the GGUF export, on 1,000+ texts) and GenerationConfig (the
server's defaults). Refusals: a corrupt or non-finite checkpoint, a missing tokenizer file, a full
disk (a file-size limit on the subprocess) are one line, and leave no hf/ or the previous one."""
import json
import os
import random
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import CACHE, ROOT
from finetune.export import chosen_checkpoint

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TEXTS = ["<|startoftext|>my dog likes the red ball.", "the weather found a warm day. émoji 🎉 and 中文",
         "<|endoftext|>", "  spaces\tand\nnew lines ", "it's they'll I'd 1234567890 3.14"]
# TensorFlow and PyTorch in float32 on the same weights: their sums differ in order only (measured:
# at most 3.2e-6 on both models here, AMD EPYC, AVX2).
LOGIT_TOLERANCE = 1e-4

TORCH_LOGITS = """
import json, sys
import numpy as np, torch
from transformers import GPT2LMHeadModel
folder, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
model.eval()
assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head is not tied to wte"
with torch.no_grad():
    logits = [model(torch.tensor([row])).logits[0].numpy() for row in ids]
np.savez(out, *logits)
print(json.dumps({k: sorted(map(str, v)) for k, v in info.items()}))
"""


def export(run, *args, **kwargs):
    return subprocess.run([sys.executable, "-m", "finetune.export", str(run), "--format", "hf", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    copy = tmp_path_factory.mktemp("hf") / "run1"
    shutil.copytree(tiny_run, copy)
    result = export(copy)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"exported {copy / 'hf'}"
    return copy


@pytest.fixture(scope="module")
def run_124m():
    """A 124M-shaped run with random weights and a 50,257-token tokenizer (bench/make_model.py), exported.
    Built once per user, as test_container's base image is (~/.cache/gpt2-run-tests): training its
    tokenizer takes minutes, and a fresh clone need not pay them again (make_model reuses a matching folder)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from make_model import SHAPE_124M, build

    run = build(CACHE / "hf-124M", SHAPE_124M)
    result = export(run)
    assert result.returncode == 0, result.stderr
    return run


def tensorflow_logits(run, ids):
    """gpt-2-simple's graph restored from the checkpoint the export chose: logits of every position."""
    import tensorflow as tf
    from gpt_2_simple.src import model

    hparams = model.default_hparams()
    hparams.override_from_dict(json.loads((run / "hparams.json").read_text()))
    graph = tf.Graph()
    with graph.as_default():
        context = tf.compat.v1.placeholder(tf.int32, [1, None])
        logits = model.model(hparams=hparams, X=context)["logits"]
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            saver.restore(sess, str(run / chosen_checkpoint(run)[0]))
            return [sess.run(logits, {context: [row]})[0] for row in ids]


def torch_logits(run, ids, tmp_path):
    out = tmp_path / "torch_logits.npz"
    result = subprocess.run([sys.executable, "-c", TORCH_LOGITS, str(run / "hf"), json.dumps(ids), str(out)],
                            cwd=tmp_path, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    with np.load(out) as found:
        return [found[f"arr_{i}"] for i in range(len(ids))]


def auto_tokenizer(run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run / "hf")


@pytest.mark.parametrize("which", ["tiny", "124M"])
def test_pytorch_logits_equal_tensorflows(which, request, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = request.getfixturevalue("run" if which == "tiny" else "run_124m")
    tokenizer = auto_tokenizer(run)
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    expected = tensorflow_logits(run, ids)
    got = torch_logits(run, ids, tmp_path)
    hparams = json.loads((run / "hparams.json").read_text())
    for text, e, g in zip(TEXTS, expected, got):
        assert g.shape == e.shape == (len(tokenizer(text)["input_ids"]), hparams["n_vocab"])
        error = float(np.abs(g - e).max())
        print(f"{which} {text!r}: largest logit difference {error:.1e} (largest logit {np.abs(e).max():.2f})")
        assert error <= LOGIT_TOLERANCE, text
        assert int(g[-1].argmax()) == int(e[-1].argmax())
    if which == "124M":  # the card takes a release's exact shape for that release
        assert "\nbase_model: openai-community/gpt2\n" in (run / "hf" / "README.md").read_text()


def varied_texts():
    """1,000+ texts: this repository's prose and code, and random mixes of scripts, emoji, controls and
    whitespace, and the markers the corpus is written with."""
    texts = ["<|endoftext|>", "<|startoftext|>a text<|endoftext|>\n", "mixed<|endoftext|>inside", "", " ",
             "\x00\x01 control", "🇫🇷 👨‍👩‍👧 zero\u200bwidth", "ﬁ ligature and ½", "a" * 300, "\r\n\r\n  \t"]
    for path in sorted(ROOT.glob("*/*.py")) + sorted(ROOT.glob("docs/*.md")):
        text = path.read_text(encoding="utf-8")
        texts += [text[i:i + 300] for i in range(0, min(len(text), 3000), 300)]
    rng = random.Random(1)
    alphabet = [(0, 0x250), (0x370, 0x600), (0x900, 0x980), (0x3000, 0x3100), (0x4E00, 0x4F00), (0x1F300, 0x1F6FF)]
    for _ in range(500):
        texts.append("".join(chr(rng.randrange(*rng.choice(alphabet))) if rng.random() < 0.7
                             else rng.choice([" ", "\n", "\t", "'s", "  ", "<|endoftext|>"])
                             for _ in range(rng.randrange(1, 40))))
    return texts


@pytest.mark.parametrize("which", ["tiny", "124M"])
def test_auto_tokenizer_gives_the_servers_ids(which, request, monkeypatch):
    from app.tokenizer import Tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = request.getfixturevalue("run" if which == "tiny" else "run_124m")
    theirs, ours = auto_tokenizer(run), Tokenizer(run)
    assert type(theirs).__name__ in ("GPT2TokenizerFast", "GPT2Tokenizer") and theirs.is_fast
    end = json.loads((run / "encoder.json").read_text())["<|endoftext|>"]
    assert theirs.eos_token_id == theirs.bos_token_id == end == ours.end_token
    texts = varied_texts()
    assert len(texts) > 1000
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert theirs.decode(ids) == ours.decode(ids) == text


def test_config_and_generation_defaults(run, monkeypatch):
    from transformers import AutoConfig, GenerationConfig

    from app.params import parameters

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hparams = json.loads((run / "hparams.json").read_text())
    end = json.loads((run / "encoder.json").read_text())["<|endoftext|>"]
    config = AutoConfig.from_pretrained(run / "hf")
    assert (config.model_type, config.architectures) == ("gpt2", ["GPT2LMHeadModel"])
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_head, config.n_layer) == (
        hparams["n_vocab"], hparams["n_ctx"], hparams["n_embd"], hparams["n_head"], hparams["n_layer"])
    assert config.bos_token_id == config.eos_token_id == end and config.tie_word_embeddings
    generation = GenerationConfig.from_pretrained(run / "hf")
    defaults = {name: spec.default for name, spec in parameters(hparams["n_ctx"], hparams["n_vocab"]).items()}
    assert generation.do_sample and generation.temperature == defaults["temperature"] == 0.7
    assert generation.top_k == defaults["top_k"] == 0  # off, in both
    assert generation.top_p == 1.0 and defaults["top_p"] == 0.0  # off: 1.0 there, 0 here
    assert generation.max_new_tokens == defaults["length"] == 100
    assert generation.eos_token_id == generation.bos_token_id == generation.pad_token_id == end
    from safetensors import safe_open

    with safe_open(run / "hf" / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
    assert len(names) == 4 + 12 * hparams["n_layer"] and "lm_head.weight" not in names  # tied to wte
    assert sorted(p.name for p in (run / "hf").iterdir()) == [
        "README.md", "config.json", "generation_config.json", "merges.txt", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in (run / "hf").iterdir())
    assert oct((run / "hf").stat().st_mode & 0o777) == "0o755"
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def test_model_card(run):
    """The tiny run: from scratch, too few texts for a held-out loss, a memorization report."""
    card = (run / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "base_model:" not in card
    assert "| base model | none: trained from scratch" in card
    assert "| checkpoint | model-100, step 100 of 100 trained: the latest checkpoint" in card
    assert "| held-out loss | not measured" in card
    report = json.loads((run / "report.json").read_text())
    share = report["share_of_samples_with_copied_span"]
    assert f"| memorization | {report['summary']} (share {share:.2f})" in card
    assert "## Corpus\n\nUnknown: the run has no record" in card  # no corpus.json in this run
    assert "only if you have the right to publish a model trained on its corpus" in card


def test_model_card_names_the_corpus_and_latest_is_chosen(run, tmp_path):
    """A run with corpus.json (data.extract's record, carried by training) and a best checkpoint that
    is not the latest: the default exports the best, --checkpoint latest the latest."""
    copy = tmp_path / "run1"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("hf", "weights"))
    latest = chosen_checkpoint(copy, "latest")[0]
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copyfile(copy / (latest + suffix), copy / ("model-50" + suffix))
    (copy / "best.json").write_text(json.dumps({"checkpoint": "model-50", "step": 50, "val_loss": 1.5}))
    source = {"project": "demo-project", "table": "demo-project.reddit.comments", "subreddit": ["AmItheAsshole"],
              "since": "2019-01-01", "until": None, "match": "(?i)\\bYTA\\b", "texts": 1234}
    (copy / "corpus.json").write_text(json.dumps({"text_format": "delimited", "dataset": "corpus.txt",
                                                  "source": source}))
    assert export(copy).returncode == 0
    card = (copy / "hf" / "README.md").read_text()
    assert "| checkpoint | model-50, step 50 of " in card and "| held-out loss | 1.5000 at the best checkpoint" in card
    assert 'subreddit `["AmItheAsshole"]`' in card and 'since `"2019-01-01"`' in card and "until" not in card
    assert "texts `1234`" in card and "start a prompt with `<|startoftext|>`" in card
    result = export(copy, "--checkpoint", "latest")
    assert result.returncode == 0, result.stderr
    card = (copy / "hf" / "README.md").read_text()
    assert f"| checkpoint | {latest}, " in card and "the latest checkpoint (--checkpoint latest)" in card


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(result, run, message, before=None):
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [f"error: {message}"], result.stderr
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no partial folder left
    if before is None:
        assert not (run / "hf").exists()
    else:
        assert tree(run / "hf") == before


@pytest.fixture
def fresh(run, tmp_path):
    copy = tmp_path / "run1"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("hf"))
    return copy


def test_a_missing_tokenizer_file_is_refused(fresh):
    (fresh / "vocab.bpe").unlink()
    assert_refused(export(fresh), fresh, f"{fresh / 'vocab.bpe'} is missing: the run's tokenizer is encoder.json "
                                         "and vocab.bpe")


def test_a_corrupt_checkpoint_is_refused(fresh):
    name = chosen_checkpoint(fresh)[0]
    data = fresh / (name + ".data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:1000])  # cut short, as a copy that stopped half-way
    result = export(fresh)
    assert result.stderr.startswith("error: cannot read ") and str(fresh / name) in result.stderr
    assert_refused(result, fresh, result.stderr.strip()[len("error: "):])


def test_non_finite_weights_are_refused_and_the_previous_export_kept(fresh):
    from test_export import poison_checkpoint

    assert export(fresh).returncode == 0
    before = tree(fresh / "hf")
    poison_checkpoint(fresh, "model/h1/mlp/c_fc/w")
    name = chosen_checkpoint(fresh)[0]
    assert_refused(export(fresh), fresh,
                   f"model/h1/mlp/c_fc/w in {fresh / name} holds NaN or infinite values: the training "
                   "diverged; train again with a lower --learning-rate or from an earlier checkpoint", before)


def test_a_full_disk_is_refused(fresh):
    """No file may grow past 64 KB (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write fails with EFBIG
    as it would with ENOSPC): model.safetensors cannot be written."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    assert export(fresh).returncode == 0
    before = tree(fresh / "hf")
    result = export(fresh, preexec_fn=limit)
    assert result.stderr.startswith(f"error: cannot write {fresh / 'hf'}: "), result.stderr
    assert_refused(result, fresh, result.stderr.strip()[len("error: "):], before)
    shutil.rmtree(fresh / "hf")
    assert_refused(export(fresh, preexec_fn=limit), fresh, result.stderr.strip()[len("error: "):])


def test_quant_is_for_gguf(run):
    result = export(run, "--quant", "F16")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --quant is for --format gguf; the Hugging Face folder holds the checkpoint's float32 weights "
        "(usage: python -m finetune.export RUN_DIR [--quant TYPE | --format hf])"]

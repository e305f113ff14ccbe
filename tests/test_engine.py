"""The llama.cpp engine against gpt-2-simple itself (real TensorFlow, the same checkpoint): an F32
export's logits and greedy tokens, tokenisation, truncate/include_prefix; plus sampling and loading
rules on the default (Q8_0) export."""
import json
import shutil

import numpy as np
import pytest

from app.engine import GPT2, Generation, ModelError, SampleText, samplers
from app.tokenizer import Tokenizer
from conftest import all_logits

TEXTS = [
    "Hello world", "my dog likes the red ball.", "<|endoftext|>", "<|startoftext|>the cat sees a warm day.<|endoftext|>",
    "émoji 🎉🙂 and 中文, ÀÉÎõü", "🇫🇷 👨‍👩‍👧 zero\u200bwidth", "  runs   of\t\tspaces\n\n\n and\r\nlines  ",
    "it's they'll I'd we've you're SHE'S", "1234567890 3.14159 -42", "", " ", "a" * 300, "\x00\x01 control",
    "naïve café résumé", "ﬁ ligature and ½ fraction", "mixed<|endoftext|>inside<|endoftext|>",
]


@pytest.fixture(scope="module")
def model(tiny_run):
    return GPT2(tiny_run)


@pytest.fixture(scope="module")
def f32_model(tiny_run, tmp_path_factory):
    """The same run exported as F32: what parity with TensorFlow is measured on."""
    from finetune.export import export

    run_dir = tmp_path_factory.mktemp("f32") / "run1"
    shutil.copytree(tiny_run, run_dir)
    export(run_dir, "F32")
    return GPT2(run_dir)


@pytest.fixture(scope="module")
def tf_session(tiny_run):
    """gpt-2-simple's model restored from the same checkpoint, and a placeholder -> logits graph."""
    import gpt_2_simple as gpt2
    import tensorflow as tf
    from gpt_2_simple.src import model as tf_model

    tf.compat.v1.reset_default_graph()
    sess = gpt2.start_tf_sess(threads=1)
    gpt2.load_gpt2(sess, run_name=tiny_run.name, checkpoint_dir=str(tiny_run.parent))
    hparams = tf_model.default_hparams()
    hparams.override_from_dict(json.loads((tiny_run / "hparams.json").read_text()))
    context = tf.compat.v1.placeholder(tf.int32, [None, None])
    logits = tf_model.model(hparams=hparams, X=context, reuse=True)["logits"]
    yield sess, context, logits
    sess.close()
    tf.compat.v1.reset_default_graph()


def test_tokenizer_matches_gpt2_simple_encoder(tiny_run):
    from gpt_2_simple.src import encoder

    reference = encoder.get_encoder(str(tiny_run))
    ours = Tokenizer(tiny_run)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == reference.decode(ids) == text
    # "<|endoftext|>" in text is ordinary pieces, not the end token (as in gpt-2-simple)
    assert ours.end_token not in ours.encode("<|endoftext|>")


def test_tokenizer_matches_gpt2_simple_on_many_texts(tiny_run):
    """llama.cpp's BPE (what the server encodes with) against gpt-2-simple's Encoder: this repository's
    English prose and code, and random mixes of scripts, emoji, controls and whitespace."""
    import random
    from pathlib import Path

    from gpt_2_simple.src import encoder

    root = Path(__file__).resolve().parent.parent
    texts = []
    for path in sorted(root.glob("*/*.py")) + sorted(root.glob("**/*.md")):
        if "out" not in path.parts:
            text = path.read_text(encoding="utf-8")
            texts += [text[i:i + 300] for i in range(0, min(len(text), 6000), 300)]
    rng = random.Random(0)
    alphabet = [(0, 0x250), (0x370, 0x600), (0x3000, 0x3100), (0x4E00, 0x4F00), (0x1F300, 0x1F6FF)]
    for _ in range(500):
        texts.append("".join(chr(rng.randrange(*rng.choice(alphabet))) if rng.random() < 0.7
                             else rng.choice(" \n\t\r'") for _ in range(rng.randrange(1, 40))))
    reference = encoder.get_encoder(str(tiny_run))
    ours = Tokenizer(tiny_run)
    assert len(texts) > 1000
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == reference.decode(ids)


# ggml computes GELU through a float16 table (GGML_GELU_FP16): its input is rounded to 11 bits, an
# error of up to 2^-11 (5e-4) relative at each hidden unit, which the layers carry into the logits
# (float32 rounding alone stays near 1e-6). Measured: 1e-4 of the largest logit on this model, about
# 5e-4 on random 124M weights; the tolerance is twice the latter.
LOGIT_TOLERANCE = 1e-3


def last_logits(llama):
    """The logits of the last decode's first output (a prompt's last position, a step's sample 0)."""
    return np.frombuffer(llama.logits(1), np.float32)


def test_logits_match_tensorflow(f32_model, tf_session):
    model = f32_model
    sess, context, logits = tf_session
    ids = model.tokenizer.encode("<|startoftext|>the cat likes the red ball. émoji 🎉 and more text here")
    expected = sess.run(logits, {context: [ids]})[0]
    got = all_logits(model.llama, ids)
    assert got.shape == expected.shape == (len(ids), model.n_vocab)
    error = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"F32 GGUF vs TensorFlow: largest logit difference {error:.2e} of the largest logit")
    assert error <= LOGIT_TOLERANCE

    # The key/value cache path: prompt in one pass, then one token at a time, gives the same logits.
    split = 5
    steps = [all_logits(model.llama, ids[:split])[-1]]
    for i in range(split, len(ids)):
        model.llama.step([ids[i]], i)
        steps.append(last_logits(model.llama))
    assert np.abs(np.array(steps) - expected[split - 1:]).max() <= LOGIT_TOLERANCE * np.abs(expected).max()


def test_50_greedy_tokens_match_tensorflow(f32_model, tf_session, tiny_run):
    import tensorflow as tf
    from gpt_2_simple.src import model as tf_model, sample

    model = f32_model
    sess, _, _ = tf_session
    hparams = tf_model.default_hparams()
    hparams.override_from_dict(json.loads((tiny_run / "hparams.json").read_text()))
    context = tf.compat.v1.placeholder(tf.int32, [1, None])
    output = sample.sample_sequence(hparams=hparams, length=50, context=context, batch_size=1, top_k=1)
    for prefix in ("<|startoftext|>", "<|startoftext|>my dog", "<|startoftext|>the weather found"):
        prompt = model.tokenizer.encode(prefix)
        expected = sess.run(output, {context: [prompt]})[0, len(prompt):].tolist()
        model.llama.prompt(prompt)
        ours = [int(last_logits(model.llama).argmax())]  # straight on, past end tokens
        for i in range(49):
            model.llama.step([ours[-1]], len(prompt) + i)
            ours.append(int(last_logits(model.llama).argmax()))
        assert ours == expected, prefix


def test_greedy_decoding_matches_gpt2_simple(f32_model, tf_session, tiny_run):
    import gpt_2_simple as gpt2
    import tensorflow as tf
    from gpt_2_simple.src import model as tf_model, sample

    model = f32_model
    sess, _, _ = tf_session
    hparams = tf_model.default_hparams()
    hparams.override_from_dict(json.loads((tiny_run / "hparams.json").read_text()))
    context = tf.compat.v1.placeholder(tf.int32, [1, None])
    length = 40
    output = sample.sample_sequence(hparams=hparams, length=length, context=context, batch_size=1, top_k=1)
    for prefix in ("<|startoftext|>", "<|startoftext|>my dog", "<|startoftext|>the weather found"):
        prompt = model.tokenizer.encode(prefix)
        expected = sess.run(output, {context: [prompt]})[0, len(prompt):].tolist()
        generation = Generation(model, prompt, prefix=prefix, length=length, temperature=1.0, top_k=1, top_p=0.0,
                                seed=None, nsamples=1, truncate=None, include_prefix=True)
        generation.run()
        ids = generation.samples[0].ids
        assert ids == expected[:len(ids)]
        assert len(ids) == length or "<|endoftext|>" in model.tokenizer.decode(ids)

        if prefix == "<|startoftext|>":
            continue  # greedy from a bare start repeats itself; the sentence starts below end their texts
        # The whole of gpt-2-simple's generate(): truncate + include_prefix give the same text.
        for include_prefix in (True, False):
            kwargs = dict(prefix=prefix, length=length, temperature=1.0, top_k=1, truncate="<|endoftext|>",
                          include_prefix=include_prefix)
            text = gpt2.generate(sess, run_name=tiny_run.name, checkpoint_dir=str(tiny_run.parent),
                                 return_as_list=True, **kwargs)[0]
            ours = Generation(model, prompt, top_p=0.0, seed=None, nsamples=1, **kwargs).run()
            assert ours["text"] == text
            assert ours["stop_reason"] == "truncate"


def run(model, prefix="", **kwargs):
    args = dict(length=30, temperature=1.0, top_k=0, top_p=0.0, seed=None, nsamples=1, truncate=None,
                include_prefix=True)
    args.update(kwargs)
    prompt = model.tokenizer.encode(prefix) if prefix else [model.tokenizer.end_token]
    generation = Generation(model, prompt, prefix=prefix, **args)
    pieces = [piece for piece in generation]
    return generation, pieces


def test_same_seed_same_text_and_batched_samples(model):
    first, _ = run(model, "<|startoftext|>", seed=7, nsamples=3)
    again, _ = run(model, "<|startoftext|>", seed=7, nsamples=3)
    other, _ = run(model, "<|startoftext|>", seed=8, nsamples=3)
    assert first.result == {**again.result, "seconds": first.result["seconds"]}
    assert first.result["texts"] != other.result["texts"]
    assert len(first.result["texts"]) == 3 and first.result["text"] == first.result["texts"][0]
    assert len(set(first.result["texts"])) > 1  # rows sample independently


def test_stops_at_end_of_text_and_pieces_add_up(model):
    # The tiny model was trained on "<|startoftext|>... .<|endoftext|>" lines, so it ends its texts.
    generation, pieces = run(model, "<|startoftext|>my dog", length=100, seed=1, top_k=1)
    result = generation.result
    assert result["stop_reason"] == "end_token"
    assert result["tokens"] < 100
    assert "<|endoftext|>" not in result["text"] and result["text"].startswith("<|startoftext|>")
    assert "".join(pieces) == result["text"]  # what streaming sends is exactly the final text


def test_truncate_without_prefix_and_pieces(model):
    generation, pieces = run(model, "<|startoftext|>", length=100, seed=3, truncate=" ", include_prefix=False)
    text = generation.result["text"]
    assert generation.result["stop_reason"] == "truncate"
    assert " " not in text and "<|startoftext|>" not in text
    assert "".join(pieces) == text


def test_length_stop(model):
    generation, pieces = run(model, "<|startoftext|>my dog", length=3, seed=1)
    assert generation.result["tokens"] == 3 and generation.result["stop_reason"] == "length"
    assert "".join(pieces) == generation.result["text"]


def test_streamed_pieces_never_split_a_character(model):
    text = "a 🎉 中文 é b"
    ids = model.tokenizer.encode(text)
    assert len(ids) > len(text)  # characters span several byte tokens in this vocabulary
    sample = SampleText(model.tokenizer, "", include_prefix=True, truncate=None)
    pieces = []
    for token_id in ids:
        sample.add(token_id)
        pieces.append(sample.new_piece())
    sample.finish()
    pieces.append(sample.new_piece())
    assert "".join(pieces) == sample.text() == text
    assert not any("\ufffd" in piece for piece in pieces), pieces


def gpt2_simple_kept(logits, temperature, top_k, top_p):
    """The tokens gpt-2-simple's sample.py can draw (its top_k_logits / top_p_logits, in NumPy)."""
    logits = logits.astype(np.float64) / temperature
    order = np.argsort(-logits)
    if top_p > 0:
        probs = np.exp(logits[order] - logits.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs  # exclusive cumulative sum: keep while it is below top_p
        return set(order[:max(int((before < top_p).sum()), 1)].tolist())
    return set(order[:top_k].tolist()) if top_k > 0 else set(order.tolist())


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 3, 0.0), (0.7, 1, 0.0), (1.0, 0, 0.5), (2.0, 0, 0.9),
                                                       (1.0, 2, 0.8)])  # the last: top_p > 0 overrides top_k
def test_samplers_draw_only_what_gpt2_simple_keeps(model, temperature, top_k, top_p):
    model.llama.prompt(model.tokenizer.encode("<|startoftext|>my dog"))
    logits = last_logits(model.llama)
    allowed = gpt2_simple_kept(logits, temperature, top_k, top_p)
    draws = [model.llama.sample(s, -1) for s in samplers(temperature, top_k, top_p, seed=1, nsamples=4)
             for _ in range(100)]  # each sampler draws 100 times from the same logits
    assert set(draws) <= allowed
    if len(allowed) > 1:
        assert len(set(draws)) > 1


def test_samplers_follow_the_softmax(model):
    """Over the whole vocabulary, each token is drawn as often as softmax(logits / temperature) says."""
    model.llama.prompt(model.tokenizer.encode("<|startoftext|>the"))
    logits = last_logits(model.llama).astype(np.float64) / 1.5
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    n = 4000
    counts = np.bincount([model.llama.sample(s, -1) for s in samplers(1.5, 0, 0.0, 3, 4) for _ in range(n // 4)],
                         minlength=len(probs))
    for token in np.argsort(-probs)[:5]:  # the likeliest tokens: each within 5 standard deviations
        expected, sd = n * probs[token], np.sqrt(n * probs[token] * (1 - probs[token]))
        assert abs(counts[token] - expected) <= 5 * sd + 1, (token, counts[token], expected)


def test_refuses_missing_or_stale_export(tiny_run, tmp_path):
    run_dir = tmp_path / "run1"
    shutil.copytree(tiny_run, run_dir)
    with pytest.raises(ModelError, match="does not exist"):
        GPT2(tmp_path / "nowhere")

    manifest = run_dir / "weights" / "manifest.json"
    good = manifest.read_text()
    data = json.loads(good)
    data["checkpoint"] = "model-0"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="python -m finetune.export"):
        GPT2(run_dir)

    manifest.write_text(good)
    index = next(run_dir.glob("model-*.index"))
    index.write_bytes(index.read_bytes() + b"changed")
    with pytest.raises(ModelError, match="python -m finetune.export"):
        GPT2(run_dir)

    shutil.rmtree(run_dir / "weights")
    with pytest.raises(ModelError, match="python -m finetune.export"):
        GPT2(run_dir)


def test_refuses_hparams_that_no_weight_shape_checks(tiny_run, tmp_path):
    run_dir = tmp_path / "run1"
    shutil.copytree(tiny_run, run_dir)
    hparams = json.loads((run_dir / "hparams.json").read_text())
    for n_head in (3, 0):
        (run_dir / "hparams.json").write_text(json.dumps({**hparams, "n_head": n_head}))
        with pytest.raises(ModelError, match=f"not a multiple of n_head {n_head}"):
            GPT2(run_dir)

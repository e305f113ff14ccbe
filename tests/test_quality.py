"""What each --quant costs in quality, measured: held-out perplexity of a model that learned real
structure, served by llama.cpp at F32/F16/Q8_0/Q5_K_M/Q4_K_M, against gpt-2-simple's TensorFlow
model on the same checkpoint.

The model: 2 layers, 256 wide (a multiple of 256, so the K-quants use their real 256-value blocks),
trained from scratch for 400 steps on "subject verb object." lines, with every fifth of the 216
combinations held out; the held-out lines are scored. The table goes to tests/out/quality.md (the
README's table comes from it).
"""
import itertools
import json
import os

import numpy as np
import pytest

from app.engine import GPT2
from conftest import OBJECTS, OUT, SUBJECTS, VERBS, all_logits, trained_run

MODEL_ARGS = ["--from-scratch", "--n-layer", "2", "--n-embd", "256", "--n-head", "4", "--vocab-size", "1000",
              "--n-ctx", "128"]
TRAIN_ARGS = ["--steps", "400", "--learning-rate", "0.002", "--accumulate-gradients", "1", "--sample-every", "0",
              "--save-every", "0", "--seed", "1"]
# Relative perplexity change allowed against TensorFlow. Q8_0's 1% is the issue's promise; F32 and
# F16 differ from float32 only by rounding; the K-quants' bound catches a broken quantisation.
ALLOWED = {"F32": 0.001, "F16": 0.005, "Q8_0": 0.01, "Q5_K_M": 0.05, "Q4_K_M": 0.05}


def lines(held_out):
    combos = list(itertools.product(SUBJECTS, VERBS, OBJECTS))
    return [f"<|startoftext|>{s} {v} {o}.<|endoftext|>" for i, (s, v, o) in enumerate(combos)
            if (i % 5 == 0) == held_out]


@pytest.fixture(scope="module")
def structured_run(tmp_path_factory):
    """The trained run folder (cached like tiny_run)."""
    shuffled = [line + "\n" for line in lines(held_out=False)]
    np.random.default_rng(0).shuffle(shuffled)
    return trained_run(tmp_path_factory, "structured_run", "".join(shuffled * 3), [*MODEL_ARGS, *TRAIN_ARGS])


def token_nll(logits, ids):
    """Negative log-likelihood of ids[1:] under logits[:-1] (float64)."""
    logits = logits[:-1].astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return -log_probs[np.arange(len(ids) - 1), ids[1:]]


def tensorflow_nll(run, sequences):
    import gpt_2_simple as gpt2
    import tensorflow as tf
    from gpt_2_simple.src import model as tf_model

    tf.compat.v1.reset_default_graph()
    sess = gpt2.start_tf_sess(threads=1)
    try:
        gpt2.load_gpt2(sess, run_name=run.name, checkpoint_dir=str(run.parent))
        hparams = tf_model.default_hparams()
        hparams.override_from_dict(json.loads((run / "hparams.json").read_text()))
        context = tf.compat.v1.placeholder(tf.int32, [1, None])
        logits = tf_model.model(hparams=hparams, X=context, reuse=True)["logits"]
        return np.concatenate([token_nll(sess.run(logits, {context: [ids]})[0], ids) for ids in sequences])
    finally:
        sess.close()
        tf.compat.v1.reset_default_graph()


def test_quantisation_perplexity_against_tensorflow(structured_run):
    from finetune.export import export

    tokenizer = GPT2(structured_run).tokenizer
    # Each line scored from the end token, as the server starts a text without prefix.
    sequences = [[tokenizer.end_token] + tokenizer.encode(line) for line in lines(held_out=True)]
    reference = float(np.exp(tensorflow_nll(structured_run, sequences).mean()))
    rows = [("TensorFlow (gpt-2-simple)", reference, 0.0, os.path.getsize(next(structured_run.glob("*.data-*"))))]
    for quant in ALLOWED:
        export(structured_run, quant)
        model = GPT2(structured_run)
        nll = np.concatenate([token_nll(all_logits(model.llama, ids), ids) for ids in sequences])
        perplexity = float(np.exp(nll.mean()))
        rows.append((quant, perplexity, perplexity / reference - 1,
                     os.path.getsize(structured_run / "weights" / "model.gguf")))
    table = ["| weights | held-out perplexity | vs TensorFlow | file size |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {name} | {ppl:.4f} | {change:+.2%} | {size / 1e6:.2f} MB |" for name, ppl, change, size in rows]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quality.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    assert reference < 4  # the model learned the structure (a uniform guess over its vocabulary: ~500)
    for name, _, change, _ in rows[1:]:
        assert abs(change) <= ALLOWED[name], (name, change)

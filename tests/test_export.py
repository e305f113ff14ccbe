"""python -m finetune.export: the GGUF file llama.cpp reads, each --quant, and what it refuses.

Run as the real CLI in a subprocess; the files are read back with the gguf package and served by
app.engine (llama.cpp)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from app.engine import GPT2, Generation
from conftest import ROOT
from finetune.gguf_export import QUANTS


def export(run, *args):
    return subprocess.run([sys.executable, "-m", "finetune.export", str(run), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    copy = tmp_path_factory.mktemp("export") / "run1"
    shutil.copytree(tiny_run, copy)
    return copy


def test_gguf_is_gpt2_with_the_runs_vocabulary(tiny_run):
    import gguf

    reader = gguf.GGUFReader(tiny_run / "weights" / "model.gguf")
    field = lambda key: reader.fields[key].contents()
    hparams = json.loads((tiny_run / "hparams.json").read_text())
    encoder = json.loads((tiny_run / "encoder.json").read_text())
    assert field("general.architecture") == "gpt2"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("gpt2.context_length") == hparams["n_ctx"] and field("gpt2.block_count") == hparams["n_layer"]
    assert field("general.file_type") == QUANTS["Q8_0"]
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == hparams["n_vocab"] and all(tokens[i] == piece for piece, i in encoder.items())
    assert field("tokenizer.ggml.eos_token_id") == encoder["<|endoftext|>"]
    names = {t.name for t in reader.tensors}
    assert len(names) == 4 + 12 * hparams["n_layer"] and "output.weight" not in names  # tied to token_embd


@pytest.mark.parametrize("quant", list(QUANTS))
def test_every_quant_is_served(run, quant):
    result = export(run, "--quant", quant)
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "weights" / "manifest.json").read_text())["quant"] == quant
    model = GPT2(run)
    prompt = model.tokenizer.encode("<|startoftext|>my dog")
    answer = Generation(model, prompt, prefix="<|startoftext|>my dog", length=30, temperature=1.0, top_k=1,
                        top_p=0.0, seed=1, nsamples=1, truncate=None, include_prefix=True).run()
    # The tiny model learned "subject verb object." lines; every quantisation keeps that.
    assert answer["stop_reason"] == "end_token" and answer["text"].endswith("."), (quant, answer)


def test_q8_0_needs_no_llama_cpp(run):
    """The training image has gguf but not llama.cpp: the default export works there, a K-quant says why not."""
    block = "import sys, runpy; sys.modules['llama_cpp'] = None; runpy.run_module('finetune.export', run_name='__main__')"
    command = [sys.executable, "-c", block, str(run)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(command + ["--quant", "Q4_K_M"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: --quant Q4_K_M needs the llama-cpp-python package "
                                          "(pinned in requirements.txt)"]


def test_export_writes_new_files_and_renames_them(run):
    """A server maps model.gguf: an export must never rewrite that file, only put a new one in its place."""
    assert export(run).returncode == 0
    path = run / "weights" / "model.gguf"
    with open(path, "rb") as held:  # as a running server holds it
        before_inode, before = os.fstat(held.fileno()).st_ino, hashlib.sha256(held.read()).hexdigest()
        assert export(run, "--quant", "F16").returncode == 0
        held.seek(0)
        assert hashlib.sha256(held.read()).hexdigest() == before  # the old file is intact
        assert os.stat(path).st_ino != before_inode
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def poison_checkpoint(run, variable):
    """Rewrite the run's latest checkpoint with NaN in one variable, as a diverged step leaves it."""
    import tensorflow as tf

    prefix = str(run / "model-100")
    reader = tf.train.load_checkpoint(prefix)
    graph = tf.Graph()
    with graph.as_default():
        values = {}
        for name in reader.get_variable_to_shape_map():
            value = reader.get_tensor(name)
            if name == variable:
                value = np.full_like(value, np.nan)
            values[name] = tf.compat.v1.Variable(value, name=name)
        saver = tf.compat.v1.train.Saver(values)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, prefix, write_meta_graph=False, write_state=False)


def test_non_finite_weights_are_refused_and_the_export_kept(run):
    assert export(run).returncode == 0
    before = (run / "weights" / "model.gguf").read_bytes()
    poison_checkpoint(run, "model/h1/mlp/c_fc/w")
    result = export(run)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: model/h1/mlp/c_fc/w in {run / 'model-100'} holds NaN or infinite values: the training "
        "diverged; train again with a lower --learning-rate or from an earlier checkpoint"]
    assert (run / "weights" / "model.gguf").read_bytes() == before

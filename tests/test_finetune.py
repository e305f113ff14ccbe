"""python -m finetune end to end: a tiny from-scratch run, its folder, its export, resume."""
import csv
import hashlib
import json
import subprocess
import sys

import numpy as np

from conftest import ROOT, TINY_MODEL_ARGS, run_finetune

GPT2_SIMPLE_FILES = ["checkpoint", "counter", "hparams.json", "encoder.json", "vocab.bpe"]


def read_loss(run):
    with open(run / "loss.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"]), float(r["avg_loss"]), float(r["seconds_per_step"]))
                for r in csv.DictReader(f)]


def test_tiny_run_is_a_complete_gpt2_simple_run_folder(tiny_run):
    for name in GPT2_SIMPLE_FILES:
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "checkpoint").read_text().splitlines()[0] == 'model_checkpoint_path: "model-100"'
    assert (tiny_run / "counter").read_text() == "100\n"
    for suffix in (".data-00000-of-00001", ".index", ".meta"):
        assert (tiny_run / f"model-100{suffix}").is_file()
    assert (tiny_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tiny_run.parent.glob(".*")), "work folders left behind"

    hparams = json.loads((tiny_run / "hparams.json").read_text())
    encoder = json.loads((tiny_run / "encoder.json").read_text())
    assert hparams == {"n_vocab": len(encoder), "n_ctx": 1024, "n_embd": 64, "n_head": 2, "n_layer": 2}
    assert len(encoder) <= 1000
    assert encoder["<|endoftext|>"] == len(encoder) - 1
    assert sorted(encoder.values()) == list(range(len(encoder)))
    assert (tiny_run / "vocab.bpe").read_text().startswith("#version: 0.2\n")


def test_loss_falls(tiny_run):
    rows = read_loss(tiny_run)
    assert [r[0] for r in rows] == list(range(1, 101))
    first = np.mean([r[1] for r in rows[:10]])
    last = np.mean([r[1] for r in rows[-10:]])
    print(f"mean loss, first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last < 0.5 * first
    assert all(r[3] > 0 for r in rows)


def test_export_matches_checkpoint(tiny_run):
    manifest = json.loads((tiny_run / "weights" / "manifest.json").read_text())
    assert manifest["checkpoint"] == "model-100"
    index = (tiny_run / "model-100.index").read_bytes()
    assert manifest["index_sha256"] == hashlib.sha256(index).hexdigest()
    assert manifest["hparams"] == json.loads((tiny_run / "hparams.json").read_text())
    h = manifest["hparams"]
    tensors = manifest["tensors"]
    assert tensors["model/wte"] == {"shape": [h["n_vocab"], h["n_embd"]], "dtype": "float32"}
    assert tensors["model/wpe"]["shape"] == [h["n_ctx"], h["n_embd"]]
    assert tensors["model/h0/attn/c_attn/w"]["shape"] == [1, h["n_embd"], 3 * h["n_embd"]]
    assert len(tensors) == 2 + 12 * h["n_layer"] + 2
    for name, meta in tensors.items():
        array = np.load(tiny_run / "weights" / (name.replace("/", ".") + ".npy"), mmap_mode="r")
        assert array.dtype == np.float32 and list(array.shape) == meta["shape"], name


GENERATE = """
import sys, gpt_2_simple as gpt2
sess = gpt2.start_tf_sess()
gpt2.load_gpt2(sess, run_name=sys.argv[2], checkpoint_dir=sys.argv[1])
texts = gpt2.generate(sess, run_name=sys.argv[2], checkpoint_dir=sys.argv[1], length=60,
                      prefix="<|startoftext|>", truncate="<|endoftext|>", seed=1,
                      temperature=0.7, return_as_list=True, nsamples=2, batch_size=2)
print("\\n---\\n".join(texts))
"""


def test_gpt2_simple_loads_and_generates(tiny_run):
    result = subprocess.run([sys.executable, "-c", GENERATE, str(tiny_run.parent), tiny_run.name],
                            capture_output=True, text=True, timeout=120, cwd=tiny_run.parent)
    assert result.returncode == 0, result.stderr
    texts = result.stdout.split("\n---\n")
    print(texts)
    assert len(texts) == 2
    # The corpus's words: a trained model writes them, a random one writes byte soup.
    words = {"cat", "dog", "model", "weather", "team", "robot", "likes", "hates", "found", "wants"}
    assert any(w in " ".join(texts) for w in words)

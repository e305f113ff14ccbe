"""python -m finetune end to end: a tiny from-scratch run, its folder, its export, resume."""
import csv
import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import ROOT, TINY_MODEL_ARGS, openai_layout, run_finetune, write_corpus

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
    assert manifest["tensors"]["model/wte"] == [h["n_vocab"], h["n_embd"]]
    assert manifest["tensors"]["model/h0/attn/c_attn/w"] == [1, h["n_embd"], 3 * h["n_embd"]]
    assert len(manifest["tensors"]) == 2 + 12 * h["n_layer"] + 2
    assert (manifest["gguf"], manifest["quant"]) == ("model.gguf", "Q8_0")  # the default
    assert sorted(p.name for p in (tiny_run / "weights").iterdir()) == ["manifest.json", "model.gguf"]


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


# -- interruption and resume ---------------------------------------------------------------------

def tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigterm_saves_a_checkpoint_that_resume_continues(tmp_path, tiny_corpus):
    ckpt = tmp_path / "ckpt"
    common = [*TINY_MODEL_ARGS, "--dataset", tiny_corpus, "--checkpoint-dir", ckpt, "--run-name", "r",
              "--learning-rate", "0.003", "--accumulate-gradients", "1", "--save-every", "0",
              "--sample-length", "20"]
    proc = subprocess.Popen([sys.executable, "-m", "finetune", *map(str, common), "--steps", "-1",
                             "--sample-every", "5"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: proc.stderr.read(64), "")))
    reader.start()
    deadline = time.time() + 120
    while not re.search(r"step=(8|9|\d\d+) ", "".join(stderr)):
        assert proc.poll() is None and time.time() < deadline, "".join(stderr)
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    reader.join()
    proc.stdout.close()
    err = "".join(stderr)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    run = ckpt / "r"
    saved = int((run / "counter").read_text())
    assert saved >= 8
    assert err.strip().splitlines()[-1] == (
        f"SIGTERM: saved model-{saved} in {run}; continue with --restore-from latest")
    assert (run / "samples" / "samples-5").read_text().startswith("======== SAMPLE 1 ========\n")
    assert json.loads((run / "weights" / "manifest.json").read_text())["checkpoint"] == f"model-{saved}"
    assert [r[0] for r in read_loss(run)] == list(range(1, saved + 1))
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]

    result = run_finetune(*common, "--steps", "3", "--sample-every", "0", "--restore-from", "latest")
    assert result.returncode == 0, result.stderr
    assert (run / "counter").read_text() == f"{saved + 3}\n"
    assert (run / "checkpoint").read_text().splitlines()[0] == f'model_checkpoint_path: "model-{saved + 3}"'
    assert not list(run.glob(f"model-{saved}.*")), "the previous checkpoint should be replaced"
    assert [r[0] for r in read_loss(run)] == list(range(1, saved + 4))
    assert json.loads((run / "weights" / "manifest.json").read_text())["checkpoint"] == f"model-{saved + 3}"


def test_colab_run_continues_here(tiny_run, tmp_path, tiny_corpus):
    """A run folder written by gpt_2_simple.finetune itself (as in the Colab notebook) resumes here."""
    openai_layout(tiny_run, tmp_path / "models" / "124M")
    colab = (
        "import gpt_2_simple as gpt2\n"
        "sess = gpt2.start_tf_sess()\n"
        f"gpt2.finetune(sess, {str(tiny_corpus)!r}, steps=2, model_name='124M', accumulate_gradients=1,"
        " sample_every=1000, save_every=1000, learning_rate=0.001)\n")
    result = subprocess.run([sys.executable, "-c", colab], cwd=tmp_path, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "checkpoint" / "run1"
    assert (run / "counter").read_text().strip() == "2"

    result = run_finetune("--dataset", tiny_corpus, "--steps", "2", "--accumulate-gradients", "1",
                          "--sample-every", "0", "--checkpoint-dir", tmp_path / "checkpoint",
                          "--model-url", "http://127.0.0.1:9/not-needed")
    assert result.returncode == 0, result.stderr
    assert (run / "counter").read_text() == "4\n"
    assert (run / "model-4.index").is_file() and not (run / "model-2.index").exists()
    assert json.loads((run / "weights" / "manifest.json").read_text())["checkpoint"] == "model-4"


def name_absolute_paths(run, folder):
    """RUN/checkpoint as TensorFlow's Saver writes it for an absolute save folder (gpt-2-simple's
    finetune() with an absolute checkpoint_dir, e.g. a Drive folder in Colab): absolute paths into folder."""
    (run / "checkpoint").write_text(f'model_checkpoint_path: "{folder}/model-100"\n'
                                    f'all_model_checkpoint_paths: "{folder}/model-100"\n')


def test_training_a_copy_never_touches_the_original(tiny_run, tmp_path, tiny_corpus):
    original = tmp_path / "drive" / "run1"
    shutil.copytree(tiny_run, original)
    name_absolute_paths(original, original)
    before = tree_digest(original)
    copy = tmp_path / "local" / "run1"
    shutil.copytree(original, copy)
    # three saves with --max-checkpoints 2: the Saver deletes what it recovered (model-100) and model-101
    result = run_finetune(*TINY_MODEL_ARGS, "--dataset", tiny_corpus, "--checkpoint-dir", copy.parent,
                          "--steps", "3", "--save-every", "1", "--max-checkpoints", "2",
                          "--accumulate-gradients", "1", "--sample-every", "0")
    assert result.returncode == 0, result.stderr
    assert tree_digest(original) == before
    assert f"Loading checkpoint {copy}/model-100\n" in result.stdout  # its own files, not the original's
    assert sorted(p.name for p in copy.glob("model-*.index")) == ["model-102.index", "model-103.index"]
    assert (copy / "checkpoint").read_text() == ('model_checkpoint_path: "model-103"\n'
                                                 'all_model_checkpoint_paths: "model-102"\n'
                                                 'all_model_checkpoint_paths: "model-103"\n')
    assert [r[0] for r in read_loss(copy)][-3:] == [101, 102, 103]


def test_a_colab_run_with_absolute_paths_resumes(tiny_run, tmp_path, tiny_corpus):
    """Its checkpoint file names /content/drive/...: found by base name in the folder, not refused."""
    run = tmp_path / "run1"
    shutil.copytree(tiny_run, run)
    name_absolute_paths(run, "/content/drive/MyDrive/checkpoint/run1")
    result = run_finetune(*TINY_MODEL_ARGS, "--dataset", tiny_corpus, "--checkpoint-dir", tmp_path,
                          "--steps", "1", "--accumulate-gradients", "1", "--sample-every", "0")
    assert result.returncode == 0, result.stderr
    assert (run / "counter").read_text() == "101\n"
    assert (run / "checkpoint").read_text().splitlines()[0] == 'model_checkpoint_path: "model-101"'
    assert not (run / "model-100.index").exists()


def test_a_failed_fresh_run_leaves_the_previous_checkpoint_intact(tiny_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run, ckpt / "run1")
    before = tree_digest(ckpt / "run1")
    small = tmp_path / "small.txt"
    small.write_text("<|startoftext|>too short to fill a window<|endoftext|>\n" * 20)
    result = run_finetune(*TINY_MODEL_ARGS, "--dataset", small, "--restore-from", "fresh",
                          "--checkpoint-dir", ckpt, "--steps", "5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: dataset {small} is too small: ")
    assert "Traceback" not in result.stderr
    assert tree_digest(ckpt / "run1") == before
    assert sorted(p.name for p in ckpt.iterdir()) == ["run1"]


def test_resume_with_another_shape_is_refused(tiny_run, tmp_path, tiny_corpus):
    shutil.copytree(tiny_run, tmp_path / "run1")
    result = run_finetune("--from-scratch", "--n-layer", "3", "--dataset", tiny_corpus,
                          "--checkpoint-dir", tmp_path, "--steps", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'run1'} holds a model with n_layer/n_embd/n_head (2, 64, 2), not (3, 64, 2): "
        "use --restore-from fresh to replace it or another --run-name")



def test_resume_with_a_corrupt_counter_counts_from_the_checkpoint(tiny_run, tmp_path, tiny_corpus):
    shutil.copytree(tiny_run, tmp_path / "run1")
    (tmp_path / "run1" / "counter").write_text("garbage\n")
    result = run_finetune(*TINY_MODEL_ARGS, "--dataset", tiny_corpus, "--checkpoint-dir", tmp_path,
                          "--steps", "1", "--accumulate-gradients", "1", "--sample-every", "0")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run1" / "counter").read_text() == "101\n"


def test_a_folder_that_is_not_a_run_is_not_overwritten(tmp_path, tiny_corpus):
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "notes.txt").write_text("mine")
    result = run_finetune("--from-scratch", "--dataset", tiny_corpus, "--checkpoint-dir", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'run1'} exists but holds no checkpoint to continue: "
        "use --restore-from fresh to replace it or another --run-name")
    assert [p.name for p in (tmp_path / "run1").iterdir()] == ["notes.txt"]


# -- bad input: one line, exit 2, nothing written -------------------------------------------------

BAD_INPUTS = [
    (["--dataset", "{tmp}/missing.txt"], "error: dataset {tmp}/missing.txt does not exist"),
    (["--dataset", "{tmp}/empty.txt"], "error: dataset {tmp}/empty.txt is empty"),
    (["--dataset", "{tmp}/blank.txt"], "error: dataset {tmp}/blank.txt is empty (only whitespace)"),
    (["--dataset", "{tmp}/corpus.txt", "--model", "125M"],
     "error: unknown model '125M': choose one of 124M, 355M, 774M, 1558M"),
    (["--dataset", "{tmp}/corpus.txt", "--from-scratch", "--n-embd", "65", "--n-head", "2"],
     "error: --n-embd 65 is not divisible by --n-head 2"),
    (["--dataset", "{tmp}/corpus.txt", "--from-scratch", "--vocab-size", "100"],
     "error: --vocab-size 100 is too small: the 256 byte tokens and <|endoftext|> need at least 258"),
    (["--dataset", "{tmp}/corpus.txt", "--steps", "0"],
     "error: --steps must be a positive number of steps or -1, not 0"),
    (["--dataset", "{tmp}/corpus.txt", "--restore-from", "newest"],
     "error: --restore-from must be 'latest' or 'fresh', not 'newest'"),
    (["--dataset", "{tmp}/corpus.txt", "--learning-rate", "-1"],
     "error: argument --learning-rate: invalid positive number value: '-1' (see python -m finetune --help)"),
    (["--dataset", "{tmp}/corpus.txt", "--seed", "-1"],
     "error: argument --seed: invalid seed (0 to 4294967295) value: '-1' (see python -m finetune --help)"),
    (["--dataset", "{tmp}/corpus.txt", "--upload", "s3://bucket/x"],
     "error: argument --upload: invalid gs://bucket/prefix URL value: 's3://bucket/x' "
     "(see python -m finetune --help)"),
    (["--dataset", "{tmp}/corpus.txt", "--model-url", "ftp://mirror/gpt-2"],
     "error: --model-url must be an http(s) URL, not 'ftp://mirror/gpt-2'"),
    (["--dataset", "{tmp}/corpus.npz", "--from-scratch"],
     "error: --from-scratch needs a text dataset to build its tokenizer, not a .npz"),
    ([], "error: --dataset is required (the text to fine-tune on)"),
    (["--dataset", "{tmp}/corpus.txt", "--window", "2048"], "error: --window 2048 is above the model's n_ctx 1024"),
    (["--dataset", "{tmp}/corpus.txt", "--from-scratch", "--n-ctx", "256", "--window", "512"],
     "error: --window 512 is above the model's n_ctx 256"),
    (["--dataset", "{tmp}/corpus.txt", "--window", "1"],
     "error: --window 1 is too small: a window predicts its tokens from the ones before"),
    (["--dataset", "{tmp}/random.bin"],
     "error: dataset {tmp}/random.bin is not text: 100% of the start of {tmp}/random.bin is not UTF-8 "
     "(a binary file?)"),
    (["--dataset", "{tmp}/corpus.txt", "--no-such-flag"],
     "error: unrecognized arguments: --no-such-flag (see python -m finetune --help)"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[m.split(":", 1)[1][:40] for _, m in BAD_INPUTS])
def test_bad_input(tmp_path, args, message):
    write_corpus(tmp_path / "corpus.txt")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n \t\n")
    (tmp_path / "corpus.npz").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    (tmp_path / "random.bin").write_bytes(bytes(range(128, 256)) * 1600)  # 200 KB, no UTF-8 in it
    args = [a.format(tmp=tmp_path) for a in args]
    result = run_finetune(*args, "--checkpoint-dir", tmp_path / "ckpt", "--model-dir", tmp_path / "models")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [message.format(tmp=tmp_path)]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "models").exists()


def test_a_dataset_folder_with_one_file_is_accepted(tmp_path):
    from finetune import UsageError
    from finetune.__main__ import check_dataset

    (tmp_path / "texts").mkdir()
    write_corpus(tmp_path / "texts" / "corpus.txt")
    check_dataset(str(tmp_path / "texts"))  # read as the folder's file, not as a file itself
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "only.txt").write_text(" \n")
    with pytest.raises(UsageError, match="only whitespace"):
        check_dataset(str(tmp_path / "blank"))


@pytest.mark.parametrize("kind", ["not a zip", "other vocabulary"])
def test_a_bad_npz_dataset_is_one_line(tiny_run, tmp_path, kind):
    shutil.copytree(tiny_run, tmp_path / "run1")
    before = tree_digest(tmp_path / "run1")
    dataset = tmp_path / "tokens.npz"
    if kind == "not a zip":
        dataset.write_text("not an archive")
        expected = f"error: dataset {dataset} cannot be read: "
    else:  # ids from a bigger vocabulary than the run's
        np.savez(dataset, np.arange(5000, 9000, dtype=np.int32))
        expected = f"error: dataset {dataset} does not hold token ids of this model's vocabulary"
    result = run_finetune("--dataset", dataset, "--checkpoint-dir", tmp_path, "--steps", "1",
                          "--accumulate-gradients", "1", "--sample-every", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(expected)
    assert tree_digest(tmp_path / "run1") == before


# -- python -m finetune.export --------------------------------------------------------------------

def run_export(*args):
    return subprocess.run([sys.executable, "-m", "finetune.export", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_export_cli_recreates_the_same_weights(tiny_run, tmp_path):
    run = tmp_path / "run1"
    shutil.copytree(tiny_run, run)
    before = tree_digest(run / "weights")
    shutil.rmtree(run / "weights")
    result = run_export(run)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"exported model-100 as Q8_0 to {run / 'weights' / 'model.gguf'} (texts: delimited)"
    assert tree_digest(run / "weights") == before


def test_a_failed_export_keeps_the_previous_one(tiny_run, tmp_path):
    run = tmp_path / "run1"
    shutil.copytree(tiny_run, run)
    before = tree_digest(run / "weights")
    (run / "model-100.index").write_bytes(b"not a checkpoint index")
    result = run_export(run)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: cannot read checkpoint {run / 'model-100'}")
    assert tree_digest(run / "weights") == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("args,code,message", [
    ([], 2, "error: the following arguments are required: run_dir "
            "(usage: python -m finetune.export RUN_DIR [--quant TYPE | --format hf])"),
    (["{tmp}", "--quant", "Q2"], 2, "error: argument --quant: invalid choice: 'Q2' (choose from 'F32', 'F16', "
                                    "'Q8_0', 'Q5_K_M', 'Q4_K_M') (usage: python -m finetune.export RUN_DIR [--quant TYPE | --format hf])"),
    (["{tmp}"], 1, "error: {tmp} has no 'checkpoint' file: not a gpt-2-simple run folder"),
    (["{tmp}/nothing"], 1, "error: run folder {tmp}/nothing does not exist"),
])
def test_export_bad_input(tmp_path, args, code, message):
    result = run_export(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == code
    assert result.stderr.splitlines() == [message.format(tmp=tmp_path)]

"""Held-out text, validation loss, early stopping and the best checkpoint (python -m finetune), and
the memorization report (python -m finetune.report), on real runs of tiny from-scratch models.

The corpus is real English: the paragraphs of the license texts every Debian system has. A small
model trained long on a few hundred of them learns them by heart: its loss on held-out paragraphs
turns up while its training loss keeps falling.
"""
import csv
import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_finetune, write_corpus

LICENSES = ["GPL-3", "Apache-2.0", "GFDL-1.3", "MPL-2.0", "Artistic", "CC0-1.0"]
# float32 everywhere: --precision auto would pick bfloat16 on CPUs with AMX, whose slower learning
# changes how far the overfit run gets by its early stop.
# Tiny and fast: 64-token windows, n_ctx 128.
FAST = ["--precision", "fp32", "--from-scratch", "--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--vocab-size", "400",
        "--n-ctx", "128", "--window", "64", "--batch-size", "4", "--accumulate-gradients", "1",
        "--learning-rate", "0.003", "--sample-every", "0", "--seed", "1"]
# Big enough to learn 20 paragraphs by heart in a few hundred steps.
OVERFIT = ["--precision", "fp32", "--from-scratch", "--n-layer", "2", "--n-embd", "256", "--n-head", "4", "--vocab-size", "400",
           "--n-ctx", "128", "--window", "64", "--batch-size", "8", "--accumulate-gradients", "1",
           "--learning-rate", "0.002", "--sample-every", "0", "--seed", "1"]


def paragraphs():
    texts = []
    for name in LICENSES:
        text = Path("/usr/share/common-licenses", name).read_text(encoding="utf-8", errors="ignore")
        texts += [" ".join(p.split()) for p in text.split("\n\n")]
    return list(dict.fromkeys(t for t in texts if 80 <= len(t) <= 500))


def write_texts(path, texts):
    path.write_text("".join(f"<|startoftext|>{t}<|endoftext|>\n" for t in texts), encoding="utf-8")
    return path


def write_licenses(path, order_seed=None):
    texts = paragraphs()
    if order_seed is not None:
        random.Random(order_seed).shuffle(texts)
    return write_texts(path, texts)


def read_loss(run):
    with open(run / "loss.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"]), float(r["avg_loss"]),
                 float(r["val_loss"]) if r["val_loss"] else None) for r in csv.DictReader(f)]


def run_report(*args):
    return subprocess.run([sys.executable, "-m", "finetune.report", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_licenses(tmp_path_factory.mktemp("licenses") / "licenses.txt")


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """20 paragraphs trained on until --early-stop 8 ends it, 12 others held out (--val-dataset);
    a checkpoint every 100 steps, one kept (--max-checkpoints 1) besides the best."""
    folder = tmp_path_factory.mktemp("overfit")
    texts = paragraphs()
    train, val = write_texts(folder / "train.txt", texts[:20]), write_texts(folder / "val.txt", texts[20:32])
    result = run_finetune(*OVERFIT, "--dataset", train, "--val-dataset", val, "--val-tokens", "1024",
                          "--checkpoint-dir", folder, "--steps", "1000", "--val-every", "50", "--early-stop", "8",
                          "--save-every", "100", "--max-checkpoints", "1", timeout=900)
    assert result.returncode == 0, result.stderr
    return folder / "run1", result, train


def test_validation_loss_turns_up_while_training_loss_falls(overfit):
    run, result, _ = overfit
    rows = read_loss(run)
    evaluated = [r for r in rows if r[3] is not None]
    assert all(r[0] % 50 == 0 for r in evaluated) and len(evaluated) >= 6
    best = min(evaluated, key=lambda r: r[3])
    last = evaluated[-1]
    print(f"best val {best[3]:.3f} at step {best[0]}, last val {last[3]:.3f} at step {last[0]}; "
          f"train avg {best[2]:.3f} -> {last[2]:.3f}")
    assert evaluated[0][3] > best[3]  # it learned something first
    assert last[3] > best[3] + 0.5  # then held-out loss went up
    assert last[2] < best[2] - 0.5  # while training loss kept falling
    assert f"Best validation loss {best[3]:.2f} at step {best[0]}; by step {last[0]} it was {last[3]:.2f} " \
           "while training loss kept falling: the later steps overfit" in result.stdout
    assert "val=" in result.stderr  # in the progress bar


def test_early_stop_ends_the_run_and_the_export_is_the_best_step(overfit):
    run, result, _ = overfit
    rows = read_loss(run)
    evaluated = [r for r in rows if r[3] is not None]
    best = min(evaluated, key=lambda r: r[3])
    last_step = rows[-1][0]
    assert last_step == best[0] + 8 * 50 < 1000  # 8 evaluations without improvement
    assert f"Early stop at step {last_step}: validation loss has not improved on {best[3]:.3f} " \
           f"(step {best[0]}) in 8 evaluations (--early-stop 8)" in result.stderr

    # the latest checkpoint (what --restore-from latest continues) and the best, both kept
    assert (run / "checkpoint").read_text().splitlines()[0] == f'model_checkpoint_path: "model-{last_step}"'
    assert json.loads((run / "best.json").read_text()) == {
        "checkpoint": f"model-{best[0]}", "step": best[0], "val_loss": pytest.approx(best[3], abs=1e-5)}
    kept = sorted(p.name for p in run.glob("model-*.index"))
    assert kept == sorted([f"model-{best[0]}.index", f"model-{last_step}.index"])

    manifest = json.loads((run / "weights" / "manifest.json").read_text())
    assert (manifest["checkpoint"], manifest["step"]) == (f"model-{best[0]}", best[0])
    assert manifest["val_loss"] == pytest.approx(best[3], abs=1e-5)
    assert manifest["reason"] == f"the lowest validation loss (the latest, model-{last_step}, is not better)"
    assert f"Exported weights to {run / 'weights'} (model-{best[0]}: the lowest validation loss" in result.stdout


def test_the_best_export_is_served_and_reported(overfit, tmp_path):
    import httpx
    from conftest import find_free_port
    from test_server import running_server

    run, result, train = overfit
    best = json.loads((run / "best.json").read_text())
    # The server accepts an export of the best, not the latest, checkpoint and says which it serves.
    with running_server(run, find_free_port(), tmp_path / "server.log") as server:
        limits = httpx.get(server.url + "/limits").json()
        (model,) = httpx.get(server.url + "/v1/models").json()["data"]
    for served in (limits, model):
        assert (served["checkpoint"], served["step"]) == (best["checkpoint"], best["step"])
        assert served["val_loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    report = json.loads((run / "report.json").read_text())
    assert result.stdout.count(f"Memorization: {report['summary']}") == 1
    assert report["settings"]["checkpoint"] == best["checkpoint"]
    settings = report["settings"]
    assert settings["samples"] == 50 and settings["temperature"] == 0.7
    assert settings["text_format"] == "delimited" and settings["prompt"].startswith("<|startoftext|>")
    assert settings["length"] == 128 - settings["prompt_tokens"]  # 200 tokens capped by n_ctx after the prompt
    assert report["cost"]["corpus_bytes"] == train.stat().st_size
    p = report["heldout_perplexity"]  # Q8_0 against the float32 checkpoint, on the same windows
    assert p["quant"] == "Q8_0" and p["checkpoint_loss"] == pytest.approx(best["val_loss"])
    assert p["export"] == pytest.approx(p["checkpoint"], rel=0.02)


def test_the_report_of_the_overfit_latest_checkpoint_finds_copied_spans(overfit, tmp_path):
    run, _, train = overfit
    best_share = json.loads((run / "report.json").read_text())["share_of_samples_with_copied_span"]
    export = subprocess.run([sys.executable, "-m", "finetune.export", run, "--checkpoint", "latest"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr
    result = run_report(run)  # on demand, on the corpus the last report named
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "report.json").read_text())
    print(report["summary"], f"(the best checkpoint's: {best_share:.0%})")
    assert f"\nMemorization: {report['summary']}\n" in result.stdout
    # What the report guarantees on every machine: a model that copies is caught copying, with the
    # copied text quoted. How often it copies depends on each CPU's numerics (3 to 20 of 20 fragments
    # seen before whole texts), so no share is asserted beyond "some".
    share = report["share_of_samples_with_copied_span"]
    assert 0 < share <= 1 and report["share_interval_95"][0] > 0
    text = train.read_text()
    spans = report["longest_spans"]
    for span in spans:  # quoted, word for word from the corpus, their length right
        assert span["text"] in text and len(span["text"]) == span["chars"] >= 50
    assert spans[0]["chars"] >= 60  # longer than the 50 the search needs (76-163 seen, by machine and numerics)
    md = (run / "report.md").read_text()
    assert report["summary"] in md and f"{spans[0]['chars']} characters" in md
    if report["share_of_samples_with_copied_span_100"] >= 0.25:
        assert report["warning"].startswith("the model repeats its training text")
        assert "Warning: the model repeats its training text" in result.stdout
    again = run_report(run, "--dataset", train)
    assert again.returncode == 0 and json.loads((run / "report.json").read_text())["longest_spans"] == spans


# -- the split -------------------------------------------------------------------------------------

VAL = ["--val-fraction", "0.1", "--val-tokens", "1024"]


def training_text(run, corpus, *flags):
    """The text the trainer samples its training windows from, for this run folder and command line."""
    from finetune.__main__ import build_parser
    from finetune.train import Trainer

    args = build_parser().parse_args([*FAST, *VAL, "--dataset", str(corpus), *flags])
    trainer = Trainer(args, str(run), work_dir=str(run), init_from=None)
    trainer.load_data()
    return trainer.enc.decode(np.concatenate(trainer.sampler.chunks).tolist())


def test_resume_and_retry_keep_the_split_and_a_barely_trained_model_copies_nothing(tmp_path, corpus):
    from finetune.validation import text_hash

    common = [*FAST, *VAL, "--checkpoint-dir", tmp_path, "--val-every", "5"]
    result = run_finetune(*common, "--dataset", corpus, "--steps", "10", "--report-samples", "0")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run1"
    held = (run / "heldout-sha256.txt").read_text().split()
    windows = np.load(run / "val-windows.npy")
    texts = {text_hash(t): t for t in corpus.read_text().split("\n") if t}
    assert len(held) >= 10 and set(held) <= set(texts)
    info = json.loads((run / "validation.json").read_text())
    assert (info["texts"], info["windows"], info["source"]) == (len(held), len(windows), "--val-fraction 0.1")

    # A retry sees the corpus in another order (as a re-extraction may write it): the same texts
    # are held out, measured on the same windows, and the curve continues.
    shuffled = write_licenses(tmp_path / "shuffled.txt", order_seed=7)
    result = run_finetune(*common, "--dataset", shuffled, "--steps", "10")
    assert result.returncode == 0, result.stderr
    assert (run / "heldout-sha256.txt").read_text().split() == held
    assert np.array_equal(np.load(run / "val-windows.npy"), windows)
    rows = read_loss(run)
    assert [r[0] for r in rows] == list(range(1, 21))
    assert [r[0] for r in rows if r[3] is not None] == [5, 10, 15, 20]
    assert "Best validation loss" in result.stdout and "at step 20, the last evaluation; it was still falling" \
        in result.stdout

    # No held-out text is in what training samples its windows from; every other text is.
    trained = training_text(run, shuffled)
    for digest, text in texts.items():
        assert (text in trained) == (digest not in held), text

    # 20 steps: the report finds nothing copied (the words, not the texts, are what it has learned)
    report = json.loads((run / "report.json").read_text())
    print(report["summary"])
    assert report["share_of_samples_with_copied_span"] <= 0.05 and report["warning"] is None


def test_the_default_holds_out_five_percent_or_says_why_not(tmp_path):
    many = write_corpus(tmp_path / "many.txt")  # 432 short comments, 216 different
    result = run_finetune(*FAST, "--dataset", many, "--checkpoint-dir", tmp_path, "--steps", "2",
                          "--report-samples", "0")
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "run1" / "validation.json").read_text())
    assert info["source"] == "--val-fraction 0.05" and 0.02 * 432 < info["texts"] < 0.09 * 432
    assert (tmp_path / "run1" / "best.json").is_file()

    few = tmp_path / "few.txt"
    few.write_text("".join(many.read_text().splitlines(keepends=True)[:150]))
    result = run_finetune(*FAST, "--dataset", few, "--checkpoint-dir", tmp_path, "--run-name", "few",
                          "--steps", "2", "--report-samples", "0")
    assert result.returncode == 0, result.stderr
    assert "Validation is off: the corpus has 150 texts, fewer than 200 to hold some out " \
           "(give --val-fraction F or --val-dataset FILE)" in result.stdout
    assert not (tmp_path / "few" / "validation.json").exists()
    assert not (tmp_path / "few" / "best.json").exists()
    assert read_loss(tmp_path / "few")[-1][3] is None
    manifest = json.loads((tmp_path / "few" / "weights" / "manifest.json").read_text())
    assert (manifest["checkpoint"], manifest["step"], manifest["val_loss"]) == ("model-2", 2, None)
    assert manifest["reason"] == "the latest checkpoint (no validation loss was measured)"


def test_a_val_dataset_on_cloud_storage_is_held_out_of_training(tmp_path, corpus, storage_emulator):
    """--val-dataset gs://... (here gcp-storage-emulator) is downloaded, and its texts are removed
    from the corpus's training text."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    texts = corpus.read_text().splitlines()
    val = tmp_path / "val.txt"
    val.write_text("\n".join(texts[:40]) + "\n")
    client = storage.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": storage_emulator})
    bucket = client.create_bucket(f"val-{uuid.uuid4().hex[:8]}")
    bucket.blob("val.txt").upload_from_filename(str(val))
    result = run_finetune(*FAST, "--val-dataset", f"gs://{bucket.name}/val.txt", "--val-tokens", "1024",
                          "--dataset", corpus, "--checkpoint-dir", tmp_path, "--steps", "3", "--report-samples", "0",
                          env=dict(os.environ, STORAGE_EMULATOR_HOST=storage_emulator))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run1"
    assert json.loads((run / "validation.json").read_text())["texts"] == 40
    assert read_loss(run)[-1][3] is not None
    trained = training_text(run, corpus, "--val-dataset", str(val))
    assert not any(t in trained for t in texts[:40])
    assert all(t in trained for t in texts[40:])


# -- bad input: one line, exit 2 --------------------------------------------------------------------

BAD = [
    (["--val-fraction", "0.6"], "error: argument --val-fraction: invalid fraction (0 to 0.5) value: '0.6' "
                                "(see python -m finetune --help)"),
    (["--val-fraction", "-0.1"], "error: argument --val-fraction: invalid fraction (0 to 0.5) value: '-0.1' "
                                 "(see python -m finetune --help)"),
    (["--val-every", "0"], "error: argument --val-every: invalid positive integer value: '0' "
                           "(see python -m finetune --help)"),
    (["--val-dataset", "{tmp}/empty.txt"], "error: --val-dataset {tmp}/empty.txt is empty"),
    (["--val-dataset", "{tmp}/random.bin"], "error: --val-dataset {tmp}/random.bin is not text: 100% of the "
                                            "start of {tmp}/random.bin is not UTF-8 (a binary file?)"),
    (["--val-dataset", "{tmp}/small.txt", "--val-fraction", "0.1"],
     "error: give --val-fraction or --val-dataset, not both"),
    (["--val-fraction", "0.01"], "error: the held-out part (--val-fraction 0.01: ... tokens) is too small for "
                                 "one 64-token window: give a larger --val-fraction, more text, or a smaller --window"),
    (["--val-fraction", "0.1", "--val-tokens", "32"], "error: --val-tokens 32 is less than one 64-token window"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m[7:50] for _, m in BAD])
def test_bad_input(tmp_path, args, message):
    small = write_corpus(tmp_path / "small.txt", repeat=1)  # 216 short comments
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "random.bin").write_bytes(bytes(range(128, 256)) * 100)
    result = run_finetune(*FAST, "--dataset", small, *[a.format(tmp=tmp_path) for a in args],
                          "--checkpoint-dir", tmp_path / "ckpt", "--steps", "1")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    head, _, tail = message.format(tmp=tmp_path).partition("...")
    assert last.startswith(head) and last.endswith(tail), last
    assert not (tmp_path / "ckpt" / "run1").exists()


def test_val_fraction_with_a_npz_dataset_is_one_line(tmp_path):
    np.savez(tmp_path / "tokens.npz", np.arange(100, dtype=np.int32))
    result = run_finetune("--dataset", tmp_path / "tokens.npz", "--val-fraction", "0.1",
                          "--checkpoint-dir", tmp_path / "ckpt")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: a .npz dataset is already encoded and cannot be split into texts: "
        "hold out text with --val-dataset FILE instead of --val-fraction"]


@pytest.mark.parametrize("args,code,message", [
    (["{tmp}/nothing"], 2, "error: run folder {tmp}/nothing does not exist"),
    (["{tmp}"], 2, "error: {tmp} has no report naming its corpus: give --dataset FILE"),
    (["{tmp}", "--dataset", "{tmp}/missing.txt"], 2, "error: dataset {tmp}/missing.txt does not exist: "
                                                     "give --dataset FILE"),
    (["{tmp}", "--dataset", "{tmp}"], 1, "error: {tmp}/hparams.json is missing: {tmp} is not a complete "
                                         "gpt-2-simple run folder"),
    (["{tmp}", "--samples", "0"], 2, "error: argument --samples: invalid positive integer value: '0' "
                                     "(see python -m finetune.report --help)"),
])
def test_report_bad_input(tmp_path, args, code, message):
    result = run_report(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == code
    assert result.stderr.splitlines() == [message.format(tmp=tmp_path)]

"""Resuming a run that holds texts out (python -m finetune --restore-from latest, the default), its
damaged records, and the corpus record (RUN/corpus.json), on real runs of a tiny from-scratch model.

One run is trained once (198 license paragraphs, --val-fraction 0.2, 4 steps); each test resumes
a copy of it for a step or two.
"""
import json
import shutil

import numpy as np
import pytest

from conftest import run_finetune
from test_validation import FAST, paragraphs, run_report, write_licenses, write_texts

RUN = "run1"
VAL = ["--val-fraction", "0.2", "--val-tokens", "1024"]
QUICK = ["--report-samples", "0"]
META = {"project": "test", "subreddit": "licenses", "texts": 198}


def dataset_tokens(result):
    """N of the "dataset has N tokens" line: what the training windows are drawn from."""
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("dataset has ")]
    return int(line.split()[2])


def read_loss(run):
    return [line.split(",") for line in (run / "loss.csv").read_text().splitlines()[1:]]


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(run folder, corpus, the run's CompletedProcess)."""
    folder = tmp_path_factory.mktemp("resume_base")
    corpus = write_licenses(folder / "licenses.txt")
    (folder / "licenses.txt.meta.json").write_text(json.dumps(META))
    result = run_finetune(*FAST, *VAL, *QUICK, "--dataset", corpus, "--checkpoint-dir", folder / "ckpt",
                          "--steps", "4", "--val-every", "2")
    assert result.returncode == 0, result.stderr
    return folder / "ckpt" / RUN, corpus, result


@pytest.fixture
def run(base, tmp_path):
    """A copy of the base run in tmp_path/run1."""
    shutil.copytree(base[0], tmp_path / RUN)
    return tmp_path / RUN


def resume(run, corpus, *flags, steps=2):
    return run_finetune(*FAST, *QUICK, "--dataset", corpus, "--checkpoint-dir", run.parent, "--steps", steps, *flags)


def held(run):
    return set((run / "heldout-sha256.txt").read_text().split())


def trained_text(run, corpus, *flags):
    """The text the trainer samples its training windows from, for this run folder and command line."""
    from finetune.__main__ import build_parser
    from finetune.train import Trainer

    args = build_parser().parse_args([*FAST, "--dataset", str(corpus), *flags])
    trainer = Trainer(args, str(run), work_dir=str(run), init_from=None)
    trainer.load_data()
    return trainer.enc.decode(np.concatenate(trainer.sampler.chunks).tolist())


# -- a resume keeps the held-out texts out and measured ---------------------------------------------

def test_a_resume_without_validation_flags_keeps_holding_out_and_measuring(base, run):
    _, corpus, first = base
    before = snapshot(run)
    result = resume(run, corpus)
    assert result.returncode == 0, result.stderr
    assert "Validation is off" not in result.stdout
    assert dataset_tokens(result) == dataset_tokens(first)  # no held-out text joined the training text
    for name in ("heldout-sha256.txt", "val-windows.npy"):
        assert (run / name).read_bytes() == before[name]
    assert json.loads((run / "validation.json").read_text()) == json.loads(before["validation.json"])
    rows = read_loss(run)
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5", "6"] and rows[-1][4] != ""  # step 6 measured
    manifest = json.loads((run / "weights" / "manifest.json").read_text())
    assert manifest["val_loss"] is not None


def test_val_fraction_0_on_resume_keeps_them_out_and_the_export_never_calls_a_step_not_measured_worse(base, run):
    _, corpus, first = base
    texts = held(run)
    result = resume(run, corpus, "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    assert f"Validation is off (--val-fraction 0); the {len(texts)} texts this run held out " \
           "(heldout-sha256.txt) stay out of training" in result.stdout
    assert dataset_tokens(result) == dataset_tokens(first)
    assert held(run) == texts and read_loss(run)[-1][4] == ""
    best = json.loads((run / "best.json").read_text())
    manifest = json.loads((run / "weights" / "manifest.json").read_text())
    assert manifest["checkpoint"] == best["checkpoint"] != "model-6"
    assert manifest["reason"] == "the lowest validation loss measured (the latest, model-6, was not measured)"
    assert f"Exported weights to {run / 'weights'} ({best['checkpoint']}: the lowest validation loss measured " \
           "(the latest, model-6, was not measured))" in result.stdout


def test_another_val_dataset_on_resume_keeps_the_old_texts_out_and_the_record_in_step(base, run, tmp_path):
    from finetune.validation import text_hash

    _, corpus, first = base
    old, windows = held(run), np.load(run / "val-windows.npy")
    info = json.loads((run / "validation.json").read_text())
    fresh = [t for t in paragraphs() if text_hash(t) not in old][:12]
    val = write_texts(tmp_path / "val.txt", fresh)
    result = resume(run, corpus, "--val-dataset", val)
    assert result.returncode == 0, result.stderr
    assert dataset_tokens(result) < dataset_tokens(first)
    assert held(run) == old | {text_hash(t) for t in fresh}
    # measured on the windows best.json's loss was measured on; validation.json says so
    assert np.array_equal(np.load(run / "val-windows.npy"), windows)
    assert json.loads((run / "validation.json").read_text()) == {**info, "also_held_out": f"--val-dataset {val}"}
    assert read_loss(run)[-1][4] != ""
    trained = trained_text(run, corpus)
    for text in paragraphs():
        assert (text in trained) == (text_hash(text) not in held(run)), text


def test_a_val_dataset_that_is_the_corpus_is_refused(base, tmp_path):
    _, corpus, _ = base
    result = run_finetune(*FAST, *QUICK, "--dataset", corpus, "--val-dataset", corpus, "--checkpoint-dir", tmp_path,
                          "--steps", "1")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: --val-dataset {corpus} holds every text of the dataset {corpus}: nothing is left to train on "
        "(held-out texts are removed from training)"]
    assert not (tmp_path / RUN).exists()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "plain.txt"
    path.write_text("\n\n".join(paragraphs()) + "\n", encoding="utf-8")
    return path


def test_val_fraction_on_a_corpus_without_markers_says_it_is_one_text(plain, tmp_path):
    result = run_finetune(*FAST, *QUICK, "--dataset", plain, "--val-fraction", "0.2", "--checkpoint-dir", tmp_path,
                          "--steps", "1")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --val-fraction holds out whole texts, and the corpus is one text (no <|startoftext|> or "
        "<|endoftext|> markers to cut it at): give --val-dataset FILE"]
    assert not (tmp_path / RUN).exists()


def test_early_stop_without_validation_is_one_warning_and_a_plain_corpus_is_recorded(plain, tmp_path):
    result = run_finetune(*FAST, *QUICK, "--dataset", plain, "--early-stop", "3", "--checkpoint-dir", tmp_path,
                          "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert "Validation is off: the corpus is one text (no <|startoftext|> or <|endoftext|> markers to cut it at) " \
           "(give --val-dataset FILE)" in result.stdout
    assert [line for line in result.stderr.splitlines() if "early-stop" in line] == [
        "warning: --early-stop 3 does nothing: validation is off"]
    assert json.loads((tmp_path / RUN / "corpus.json").read_text()) == {
        "text_format": "plain", "dataset": "plain.txt", "source": None}


# -- best.json names only the run's own checkpoints ----------------------------------------------------

def test_best_json_cannot_delete_outside_the_run_folder(base, run, tmp_path):
    _, corpus, _ = base
    victim = tmp_path / "victim"
    victim.mkdir()
    for suffix in (".index", ".meta", ".data-00000-of-00001"):
        (victim / ("model-1" + suffix)).write_text("someone else's file")
    (run / "best.json").write_text(json.dumps({"checkpoint": "../victim/model-1", "step": 1, "val_loss": 99.0}))
    result = resume(run, corpus)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in victim.iterdir()) == [
        "model-1.data-00000-of-00001", "model-1.index", "model-1.meta"]
    best = json.loads((run / "best.json").read_text())
    assert best["checkpoint"] == "model-6" and (run / "model-6.index").is_file()


# -- damaged run files: one line naming the file and the fix, exit 2, nothing changed ------------------

def truncated(path):
    return path.read_bytes()[:len(path.read_bytes()) // 2]


def npy(array):
    import io
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


DAMAGED = {
    "heldout not text": ("heldout-sha256.txt", lambda run: b"\x89PNG\r\n\x1a\n\x00\xff\xfe",
                         "is not a list of sha256 hashes: delete it and resume with the same --val-fraction"),
    "windows truncated": ("val-windows.npy", lambda run: truncated(run / "val-windows.npy"),
                          "cannot be read ("),
    "windows ids >= n_vocab": ("val-windows.npy", lambda run: npy(np.full((4, 64), 10**6, np.int32)),
                               "holds token ids outside the model's vocabulary (0 to "),
    "windows wider than n_ctx": ("val-windows.npy", lambda run: npy(np.ones((2, 200), np.int32)),
                                 "holds windows of 200 tokens, more than the model's n_ctx 128: delete it"),
    "best val_loss null": ("best.json", lambda run: b'{"checkpoint": "model-4", "step": 4, "val_loss": null}',
                           "holds checkpoint 'model-4', step 4, val_loss None: not a checkpoint name, a step and "
                           "a finite validation loss; delete it"),
    "best val_loss string": ("best.json", lambda run: b'{"checkpoint": "model-4", "step": 4, "val_loss": "2.5"}',
                             "val_loss '2.5'"),
    "validation.json not JSON": ("validation.json", lambda run: b'{"source": "--val-fraction 0.2",',
                                 "is not a JSON object as training writes it: delete it"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_run_file_is_one_line_before_the_first_step(base, run, case):
    _, corpus, _ = base
    name, content, message = DAMAGED[case]
    (run / name).write_bytes(content(run))
    before = snapshot(run)
    result = resume(run, corpus)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {run / name} ") and message in line, line
    assert snapshot(run) == before


# -- the memorization report's windows -----------------------------------------------------------------

def test_the_report_with_no_windows_writes_null_and_refuses_bad_ones(base, run):
    _, corpus, _ = base
    report = ["--dataset", corpus, "--samples", "1", "--length", "8"]
    np.save(run / "val-windows.npy", np.zeros((0, 64), np.int32))
    result = run_report(run, *report)
    assert result.returncode == 0, result.stderr
    text = (run / "report.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in report.json"))["heldout_perplexity"] is None

    for array, message in [(np.ones((2, 200), np.int32), "holds windows of 200 tokens, more than the model's n_ctx 128"),
                           (np.full((2, 64), 10**6, np.int32), "holds token ids outside the model's vocabulary")]:
        np.save(run / "val-windows.npy", array)
        result = run_report(run, *report)
        assert result.returncode == 2
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"error: {run / 'val-windows.npy'} {message}"), line
        assert (run / "report.json").read_text() == text


# -- RUN/corpus.json -------------------------------------------------------------------------------------

def test_training_records_the_corpus_and_a_resume_on_a_npz_rewrites_it(base, run, tmp_path):
    from gpt_2_simple.src import encoder

    _, corpus, _ = base
    assert json.loads((run / "corpus.json").read_text()) == {
        "text_format": "delimited", "dataset": "licenses.txt", "source": META}
    tokens = encoder.get_encoder(str(run)).encode(corpus.read_text())
    np.savez(tmp_path / "tokens.npz", np.array(tokens, np.int32))
    # a .npz cannot be given with --from-scratch; a resume continues the run's own model
    flags = ["--precision", "fp32", "--window", "64", "--batch-size", "4", "--accumulate-gradients", "1",
             "--learning-rate", "0.003", "--sample-every", "0", "--seed", "1"]
    result = run_finetune(*flags, *QUICK, "--dataset", tmp_path / "tokens.npz", "--checkpoint-dir", tmp_path,
                          "--steps", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "corpus.json").read_text()) == {
        "text_format": "plain", "dataset": "tokens.npz", "source": None}
    assert read_loss(run)[-1][4] != ""  # still measured, on the recorded windows

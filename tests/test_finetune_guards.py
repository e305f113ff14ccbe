"""python -m finetune's guard rails, run as the real CLI: the device report, the time-left estimate,
--window, --require-gpu, and the failures that must never cost the previous checkpoint (a diverging
loss, a full disk, a batch that cannot fit, a second process, a binary dataset, a kill mid-save)."""
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import types

import pytest

from conftest import ROOT, TINY_MODEL_ARGS, finetune_cmd, run_finetune, write_corpus
from test_finetune import read_loss, tree_digest

QUICK = ["--accumulate-gradients", "1", "--sample-every", "0", "--learning-rate", "0.003"]


def error_line(result):
    """The one line a failed run must end with, after asserting it is the only error output."""
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_device_report_estimate_and_window(tmp_path):
    # ~560 tokens: too few for the default 1,024-token window, enough for --window 64.
    corpus = tmp_path / "short.txt"
    corpus.write_text("".join(f"<|startoftext|>comment number {i} is short.<|endoftext|>\n" for i in range(40)))
    common = [*TINY_MODEL_ARGS, *QUICK, "--dataset", corpus, "--checkpoint-dir", tmp_path / "ckpt"]

    result = run_finetune(*common, "--steps", "2")
    assert result.returncode == 2
    assert re.fullmatch(rf"error: dataset {corpus} is too small: \d+ tokens, and training needs more "
                        r"than 1024 per window", error_line(result))

    result = run_finetune(*common, "--steps", "8", "--window", "64")
    assert result.returncode == 0, result.stderr
    threads = len(os.sched_getaffinity(0))
    assert re.search(rf"^Training on CPU, {threads} threads in (bfloat16 mixed precision|float32) \(auto: ",
                     result.stdout, re.M), result.stdout
    estimate = re.search(r"About (\d+ s|\d+ min) left: 5 more steps at (\d[\d.]*(?:e-\d+)?) s/step on CPU, "
                         rf"{threads} threads\n", result.stderr)
    assert estimate, result.stderr
    assert float(estimate.group(2)) > 0
    assert "Faster:" not in result.stderr  # a tiny model: no hint
    assert (tmp_path / "ckpt" / "run1" / "counter").read_text() == "8\n"


def test_faster_options_hint():
    """The hint's rule: CPU, a model of GPT-2 124M's size or more, and over an hour left."""
    from finetune.train import faster_options

    cpu, gpu = types.SimpleNamespace(gpu=False), types.SimpleNamespace(gpu=True)
    args = types.SimpleNamespace(accumulate_gradients=5)
    hint = faster_options(cpu, 124e6, 16 * 3600, args, 1024)
    assert hint == ("Faster: a GPU (make setup-gpu), a Cloud Run GPU job (python -m finetune.cloud), "
                    "--accumulate-gradients 1 (1/5 the windows per step), "
                    "--window 256 (about 1/4 the time per step)")
    assert faster_options(gpu, 124e6, 16 * 3600, args, 1024) is None
    assert faster_options(cpu, 124e6, 3000, args, 1024) is None
    assert faster_options(cpu, 0.2e6, 16 * 3600, args, 1024) is None
    assert faster_options(cpu, 355e6, 7200, types.SimpleNamespace(accumulate_gradients=1), 256) == (
        "Faster: a GPU (make setup-gpu), a Cloud Run GPU job (python -m finetune.cloud)")


def test_require_gpu_without_one_fails_at_once(tmp_path):
    started = time.time()
    result = run_finetune(*TINY_MODEL_ARGS, "--dataset", write_corpus(tmp_path / "c.txt"),
                          "--checkpoint-dir", tmp_path / "ckpt", "--require-gpu")
    assert result.returncode == 2
    assert re.fullmatch(r"error: a GPU was required \(--require-gpu\) but TensorFlow [\d.]+ \(.+\) sees "
                        r"none: check the driver with nvidia-smi", error_line(result))
    # Above it, at most TensorFlow's own start-up log lines (absl prints them whatever the log level).
    assert all(line.startswith(("WARNING: All log messages", "I0000 ")) for line in
               result.stderr.strip().splitlines()[:-1]), result.stderr
    assert time.time() - started < 60
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_a_diverging_run_stops_without_saving(tiny_run, tmp_path, tiny_corpus, resume):
    ckpt = tmp_path / "ckpt"
    if resume:
        shutil.copytree(tiny_run, ckpt / "run1")
    before = tree_digest(ckpt) if resume else {}
    result = run_finetune(*TINY_MODEL_ARGS, "--dataset", tiny_corpus, "--checkpoint-dir", ckpt,
                          "--steps", "20", "--accumulate-gradients", "1", "--sample-every", "0",
                          "--learning-rate", "1e12")
    assert result.returncode == 1, result.stderr
    kept = f"model-100 in {ckpt / 'run1'} is untouched" if resume else "nothing was saved"
    assert re.fullmatch(r"error: the (loss became nan at step \d+|weights hold NaN or infinity after step "
                        r"\d+): training diverged \(try a lower --learning-rate than 1e\+12\); stopped "
                        rf"without saving, {re.escape(kept)}", error_line(result)), result.stderr
    assert (tree_digest(ckpt) if ckpt.exists() else {}) == before


def test_a_batch_that_cannot_fit_is_refused_before_training(tmp_path, tiny_corpus):
    result = run_finetune(*TINY_MODEL_ARGS, "--dataset", tiny_corpus, "--checkpoint-dir", tmp_path,
                          "--batch-size", "100000000", timeout=120)
    assert result.returncode == 2
    assert re.fullmatch(r"error: a 0.\d+M-parameter model \(Adam, all weights, (bf16|fp32), 100000000 x 1,024 "
                        r"tokens\) needs ~[\d.]+ GiB, this machine gives TensorFlow ~[\d.]+ GiB: add --batch-size 1 "
                        r"\(~[\d.]+ GiB\)", error_line(result))
    assert os.listdir(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that many bytes (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = []

    def mount(size):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_checkpoint(tiny_run, small_disk, tiny_corpus):
    size = sum(p.stat().st_size for p in tiny_run.rglob("*") if p.is_file())
    disk = small_disk(size + 256 * 1024)  # room for the run, not for a second checkpoint
    shutil.copytree(tiny_run, disk / "run1")
    before = tree_digest(disk)
    result = run_finetune(*TINY_MODEL_ARGS, *QUICK, "--dataset", tiny_corpus, "--checkpoint-dir", disk,
                          "--steps", "2")
    assert result.returncode == 1
    assert re.fullmatch(rf"error: cannot save model-102 in {disk / 'run1'}: .*(No space left on device|"
                        rf"Resource exhausted).*; model-100 in {disk / 'run1'} is untouched",
                        error_line(result)), result.stderr
    assert tree_digest(disk) == before


def test_a_binary_dataset_is_refused(tmp_path):
    data = tmp_path / "random.bin"
    data.write_bytes(os.urandom(200_000))
    result = run_finetune(*TINY_MODEL_ARGS, "--dataset", data, "--checkpoint-dir", tmp_path / "ckpt")
    assert result.returncode == 2
    assert re.fullmatch(rf"error: dataset {data} is not text: \d+% of the start of {data} is not UTF-8 "
                        r"\(a binary file\?\)", error_line(result))
    assert not (tmp_path / "ckpt").exists()


def test_resume_counts_from_the_checkpoint_not_a_stale_counter(tiny_run, tmp_path, tiny_corpus):
    """As after a kill between writing the checkpoint and the counter (or a Ctrl-C in the save)."""
    shutil.copytree(tiny_run, tmp_path / "run1")
    (tmp_path / "run1" / "counter").write_text("3\n")
    result = run_finetune(*TINY_MODEL_ARGS, *QUICK, "--dataset", tiny_corpus, "--checkpoint-dir", tmp_path,
                          "--steps", "2")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run1"
    assert (run / "counter").read_text() == "102\n"
    assert (run / "checkpoint").read_text().splitlines()[0] == 'model_checkpoint_path: "model-102"'
    assert [r[0] for r in read_loss(run)] == list(range(1, 103))


def test_a_second_process_on_the_run_is_refused_and_two_sigterms_keep_the_run_whole(tmp_path, tiny_corpus):
    ckpt = tmp_path / "ckpt"
    common = [*TINY_MODEL_ARGS, *QUICK, "--dataset", tiny_corpus, "--checkpoint-dir", ckpt]
    proc = subprocess.Popen(finetune_cmd(*common, "--steps", "-1", "--save-every", "3"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: proc.stderr.read(64), "")))
    reader.start()
    try:
        deadline = time.time() + 120
        while not re.search(r"step=(1[0-9]|[2-9]\d) ", "".join(stderr)):
            assert proc.poll() is None and time.time() < deadline, "".join(stderr)
            time.sleep(0.1)
        second = run_finetune(*common, "--steps", "1")
        assert second.returncode == 2
        assert error_line(second) == (f"error: another process (pid {proc.pid}) is using {ckpt / 'run1'}: "
                                      "wait for it to finish or stop it")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the second one stops without saving, maybe mid-save
        proc.wait(timeout=60)
    finally:
        proc.kill()
        reader.join()
    assert proc.returncode in (128 + signal.SIGTERM, 130), "".join(stderr)
    run = ckpt / "run1"
    saved = int((run / "checkpoint").read_text().splitlines()[0].split('"')[1].split("-")[1])
    assert saved >= 9
    assert (run / f"model-{saved}.index").is_file()
    assert not (ckpt / ".run1.lock").exists()

    # Whatever the second signal interrupted, the run continues from its checkpoint's step.
    result = run_finetune(*common, "--steps", "1")
    assert result.returncode == 0, result.stderr
    assert (run / "counter").read_text() == f"{saved + 1}\n"
    assert [r[0] for r in read_loss(run)][-1] == saved + 1


def test_until_step_trains_only_what_is_left(tiny_run, tmp_path, tiny_corpus):
    """What a retried cloud task does: the same command twice ends at the same step."""
    shutil.copytree(tiny_run, tmp_path / "run1")
    common = [*TINY_MODEL_ARGS, *QUICK, "--dataset", tiny_corpus, "--checkpoint-dir", tmp_path, "--until-step", "102"]
    result = run_finetune(*common)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run1" / "counter").read_text() == "102\n"
    again = run_finetune(*common)
    assert again.returncode == 0, again.stderr
    assert f"{tmp_path / 'run1'} is at step 102 already: nothing to train (--until-step 102)" in again.stdout
    assert (tmp_path / "run1" / "counter").read_text() == "102\n"
    assert [r[0] for r in read_loss(tmp_path / "run1")][-1] == 102

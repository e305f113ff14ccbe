"""--upload / --download against gcp-storage-emulator, started by the storage_emulator fixture."""
import filecmp
import os
import uuid

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from conftest import openai_layout, run_finetune, write_corpus


@pytest.fixture
def gcs(storage_emulator, monkeypatch):
    """A client for the emulator, a fresh bucket, and the environment for the CLI."""
    client = storage.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": storage_emulator})
    bucket = client.create_bucket(f"runs-{uuid.uuid4().hex[:8]}")
    env = dict(os.environ, STORAGE_EMULATOR_HOST=storage_emulator)
    return client, bucket, env


def relative_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_upload_then_download_a_run(tiny_run, tmp_path, gcs):
    client, bucket, env = gcs
    url = f"gs://{bucket.name}/runs/run1"
    # An object left by an older upload of this run goes away.
    bucket.blob("runs/run1/model-1.index").upload_from_string(b"old")

    result = run_finetune("--upload", url, "--run-name", tiny_run.name,
                          "--checkpoint-dir", tiny_run.parent, env=env)
    assert result.returncode == 0, result.stderr
    names = sorted(b.name[len("runs/run1/"):] for b in client.list_blobs(bucket.name, prefix="runs/run1/"))
    assert names == relative_files(tiny_run)
    assert "weights/manifest.json" in names and "model-100.index" in names

    result = run_finetune("--download", url, "--run-name", "copy", "--checkpoint-dir", tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert f"to {tmp_path / 'copy'}" in result.stdout
    assert relative_files(tmp_path / "copy") == relative_files(tiny_run)
    for rel in relative_files(tiny_run):
        assert filecmp.cmp(tiny_run / rel, tmp_path / "copy" / rel, shallow=False), rel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_download_checks_integrity(tiny_run, tmp_path, gcs):
    """The object's CRC32C/MD5 metadata is what the local copy is held to."""
    from finetune.gcs import mismatch

    _, bucket, _ = gcs
    blob = bucket.blob("x/hparams.json")
    blob.upload_from_filename(str(tiny_run / "hparams.json"))
    blob.reload()
    local = tmp_path / "hparams.json"
    blob.download_to_filename(str(local))
    assert mismatch(blob, str(local)) is None
    local.write_bytes(local.read_bytes().replace(b"64", b"65"))
    assert "CRC32C" in mismatch(blob, str(local))


def test_download_a_base_model_then_fine_tune_it(tiny_run, tmp_path, gcs):
    client, bucket, env = gcs
    release = openai_layout(tiny_run, tmp_path / "release" / "124M")
    for path in release.iterdir():
        bucket.blob(f"models/124M/{path.name}").upload_from_filename(str(path))
    corpus = write_corpus(tmp_path / "corpus.txt")
    result = run_finetune(
        "--download", f"gs://{bucket.name}/models/124M", "--model", "124M", "--model-dir", tmp_path / "models",
        "--model-url", "http://127.0.0.1:9/unused", "--dataset", corpus, "--steps", "2",
        "--accumulate-gradients", "1", "--sample-every", "0", "--checkpoint-dir", tmp_path / "ckpt",
        env=env)
    assert result.returncode == 0, result.stderr
    for path in release.iterdir():
        assert filecmp.cmp(path, tmp_path / "models" / "124M" / path.name, shallow=False)
    assert (tmp_path / "ckpt" / "run1" / "counter").read_text() == "2\n"


@pytest.mark.parametrize("flag", ["--upload", "--download"])
def test_missing_bucket(tmp_path, gcs, flag):
    _, _, env = gcs
    corpus = write_corpus(tmp_path / "corpus.txt")
    result = run_finetune(flag, "gs://no-such-bucket-here/run1", "--dataset", corpus, "--from-scratch",
                          "--checkpoint-dir", tmp_path / "ckpt", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: bucket gs://no-such-bucket-here does not exist"]
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_download_of_an_empty_prefix(tmp_path, gcs):
    _, bucket, env = gcs
    result = run_finetune("--download", f"gs://{bucket.name}/nothing", "--checkpoint-dir", tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: gs://{bucket.name}/nothing holds no run (no checkpoint file) and no GPT-2 release"]
    assert not any(tmp_path.iterdir())

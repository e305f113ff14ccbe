"""Copy run folders and GPT-2 releases to and from Cloud Storage, checksums checked.

Uses google-cloud-storage, so credentials come from Application Default Credentials, and
STORAGE_EMULATOR_HOST (e.g. http://127.0.0.1:9023) points it at an emulator. Every object is
compared with a local CRC32C (and MD5 when the object has one) after upload and after download.
An upload sends the `checkpoint` file last, so a reader never sees a run whose `checkpoint` names
files not there yet; a download lands in a hidden folder that takes the run's name only when complete.
"""
import base64
import contextlib
import hashlib
import os
import shutil

import google_crc32c
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import storage

from finetune import UsageError
from finetune.files import partial_dir, replace_dir

ATTEMPTS = 3


def split_url(url):
    bucket, _, prefix = url[len("gs://"):].partition("/")
    return bucket, prefix.strip("/")


def client():
    try:
        return storage.Client()
    except auth_exceptions.DefaultCredentialsError:
        raise UsageError("no Google Cloud credentials: run `gcloud auth application-default login` "
                         "(or set STORAGE_EMULATOR_HOST for an emulator)") from None


@contextlib.contextmanager
def cloud_errors(action):
    """Turn Cloud Storage failures into one-line UsageErrors that say what was being done."""
    try:
        yield
    except UsageError:
        raise
    except api_exceptions.NotFound as e:
        raise UsageError(f"{action}: not found ({e.message})") from None
    except (api_exceptions.Forbidden, api_exceptions.Unauthorized) as e:
        raise UsageError(f"{action}: access denied ({e.message})") from None
    except (api_exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError, OSError) as e:
        # OSError covers requests' connection errors and local disk errors
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"{action}: {first}") from None


def check_bucket(url):
    name, _ = split_url(url)
    with cloud_errors(f"cannot reach bucket gs://{name}"):
        if client().lookup_bucket(name) is None:
            raise UsageError(f"bucket gs://{name} does not exist")


def checksums(path):
    crc, md5 = google_crc32c.Checksum(), hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc.update(block)
            md5.update(block)
    return base64.b64encode(crc.digest()).decode(), base64.b64encode(md5.digest()).decode()


def mismatch(blob, path):
    """None when the local file matches the object's CRC32C/MD5 metadata, else a description."""
    if not blob.crc32c and not blob.md5_hash:
        return f"gs://{blob.bucket.name}/{blob.name} has no checksum to verify against"
    crc, md5 = checksums(path)
    if blob.crc32c and blob.crc32c != crc:
        return f"CRC32C of gs://{blob.bucket.name}/{blob.name} is {blob.crc32c}, the local copy's is {crc}"
    if blob.md5_hash and blob.md5_hash != md5:
        return f"MD5 of gs://{blob.bucket.name}/{blob.name} is {blob.md5_hash}, the local copy's is {md5}"
    return None


def upload(run_dir, url):
    """Copy run_dir's files to url/…; objects under url left from an older upload are removed."""
    if not os.path.isfile(os.path.join(run_dir, "checkpoint")):
        raise UsageError(f"{run_dir} is not a run folder (no checkpoint file) to upload")
    name, prefix = split_url(url)
    files = run_files(run_dir)
    files.remove("checkpoint")
    files.append("checkpoint")  # last: it names the model files, which must be there first
    with cloud_errors(f"cannot upload to {url}"):
        bucket = client().lookup_bucket(name)
        if bucket is None:
            raise UsageError(f"bucket gs://{name} does not exist")
        # Files already there with the same CRC32C are not sent again: a run uploaded after every
        # checkpoint re-sends only what changed.
        there = {b.name: b.crc32c for b in bucket.list_blobs(prefix=f"{prefix}/" if prefix else None)}
        for rel in files:
            path = os.path.join(run_dir, rel)
            blob = bucket.blob(f"{prefix}/{rel}" if prefix else rel)
            if there.get(blob.name) == checksums(path)[0] and rel != "checkpoint":
                continue
            for attempt in range(1, ATTEMPTS + 1):
                blob.upload_from_filename(path, checksum="crc32c")
                blob.reload()
                problem = mismatch(blob, path)
                if problem is None:
                    break
                if attempt == ATTEMPTS:
                    raise UsageError(f"upload of {path} failed its integrity check: {problem}")
        wanted = {f"{prefix}/{rel}" if prefix else rel for rel in files}
        for name in there.keys() - wanted:
            bucket.blob(name).delete()
    print(f"Uploaded {len(files)} files from {run_dir} to {url}")


def holds_run(url):
    """Whether url holds a run folder (its `checkpoint` object)."""
    name, prefix = split_url(url)
    with cloud_errors(f"cannot read {url}"):
        bucket = client().lookup_bucket(name)
        if bucket is None:
            raise UsageError(f"bucket gs://{name} does not exist")
        return bucket.get_blob(f"{prefix}/checkpoint" if prefix else "checkpoint") is not None


def download_file(url, path):
    """Fetch one object (e.g. a corpus) to path, checksums checked."""
    name, key = split_url(url)
    with cloud_errors(f"cannot download {url}"):
        bucket = client().lookup_bucket(name)
        if bucket is None:
            raise UsageError(f"bucket gs://{name} does not exist")
        blob = bucket.get_blob(key) if key else None
        if blob is None:
            raise UsageError(f"{url} does not exist")
        fetch(blob, path, url)
    print(f"Downloaded {url} ({blob.size:,} bytes)")


def fetch(blob, path, url):
    """Download blob to path, again until its CRC32C/MD5 match (ATTEMPTS tries)."""
    for _ in range(ATTEMPTS):
        blob.download_to_filename(path, checksum=None)  # verified here, both sums
        problem = mismatch(blob, path)
        if problem is None:
            return
    raise UsageError(f"download of {url} failed its integrity check: {problem}")


def run_files(run_dir):
    """The run folder's files, relative, without hidden work files and folders."""
    files = []
    for folder, dirs, names in os.walk(run_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.relpath(os.path.join(folder, n), run_dir) for n in names if not n.startswith(".")]
    return sorted(files)


def download(url, run_dir, model_dir):
    """Fetch a run folder (into run_dir) or a GPT-2 release (into model_dir) stored at url."""
    name, prefix = split_url(url)
    with cloud_errors(f"cannot download {url}"):
        bucket = client().lookup_bucket(name)
        if bucket is None:
            raise UsageError(f"bucket gs://{name} does not exist")
        base = f"{prefix}/" if prefix else ""
        blobs = [b for b in bucket.list_blobs(prefix=base or None) if not b.name.endswith("/")]
        names = {b.name[len(base):] for b in blobs}
        if "model.ckpt.index" in names:
            target, kind = model_dir, "GPT-2 release"
        elif "checkpoint" in names:
            target, kind = run_dir, "run"
        else:
            raise UsageError(f"{url} holds no run (no checkpoint file) and no GPT-2 release")
        work = partial_dir(os.path.dirname(os.path.abspath(target)), os.path.basename(target))
        try:
            for blob in blobs:
                path = os.path.normpath(os.path.join(work, blob.name[len(base):]))
                if not path.startswith(work + os.sep):  # an object named ../x or /x must not escape
                    raise UsageError(f"refusing gs://{name}/{blob.name}: its name leads outside {target}")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fetch(blob, path, url)
            problem = folder_problem(work, kind)
            if problem:
                raise UsageError(f"{kind} at {url} is incomplete: {problem}")
            replace_dir(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # gone already once it took its name
    print(f"Downloaded {kind} {url} to {target}")


def folder_problem(folder, kind):
    if kind == "GPT-2 release":
        from finetune.download import model_problem
        return model_problem(folder)
    from finetune.export import ExportError, latest_checkpoint_name
    try:
        latest = latest_checkpoint_name(folder)
    except ExportError as e:
        return str(e)
    for suffix in (".index", ".data-00000-of-00001"):
        if not os.path.isfile(os.path.join(folder, latest + suffix)):
            return f"the checkpoint file names {latest} but {latest}{suffix} is missing"
    for name in ("hparams.json", "encoder.json", "vocab.bpe"):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"{name} is missing"
    return None

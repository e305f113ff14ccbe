"""Download a GPT-2 release (OpenAI's file layout) and refuse a broken one.

gpt_2_simple.download_gpt2 writes whatever arrives straight into models/124M, so a dropped
connection leaves a truncated model.ckpt.data that fails much later, or loads garbage. Here each
file goes to a hidden work folder and is checked as it arrives (HTTP status, Content-Length,
Content-MD5 when the server sends one), a bad transfer is retried, and the whole model is checked
before the folder takes its name: JSON files parse, the checkpoint index opens and the data file
holds exactly the bytes the index describes, the meta graph parses. Files are fetched from
BASE_URL/MODEL/FILE, as at https://openaipublic.blob.core.windows.net/gpt-2/models/124M/hparams.json.
"""
import base64
import hashlib
import json
import os
import shutil
import sys
import time

import requests
from tqdm import tqdm

from finetune import UsageError
from finetune.files import partial_dir, replace_dir

MODEL_FILES = ["checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
               "model.ckpt.index", "model.ckpt.meta", "vocab.bpe"]
ATTEMPTS = 3
RETRY_PAUSE_S = 1.0


class TransferError(Exception):
    """A download that did not arrive whole; worth another try."""


def ensure_model(model_dir, name, base_url):
    """Return model_dir/name, downloading it first when it is missing or incomplete."""
    dest = os.path.join(model_dir, name)
    if os.path.isdir(dest):
        problem = model_problem(dest)
        if problem is None:
            return dest
        print(f"{dest} is incomplete ({problem}): downloading it again")
    work = partial_dir(model_dir, name)
    try:
        for file_name in MODEL_FILES:
            fetch(f"{base_url.rstrip('/')}/{name}/{file_name}", os.path.join(work, file_name))
        problem = model_problem(work)
        if problem:
            raise UsageError(f"model {name} downloaded from {base_url} is broken: {problem}")
        replace_dir(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already once it took the model's name
    return dest


def fetch(url, path):
    """Download url to path, retrying transfers that break off or arrive corrupted."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fetch_once(url, path)
        except TransferError as e:
            if attempt == ATTEMPTS:
                raise UsageError(f"cannot download {url}: {e} (tried {ATTEMPTS} times)") from None
            tqdm.write(f"{url}: {e}; retrying ({attempt}/{ATTEMPTS - 1})", file=sys.stderr)
            time.sleep(RETRY_PAUSE_S * attempt)


def fetch_once(url, path):
    try:
        # identity: Content-Length and Content-MD5 then describe the very bytes written to disk
        response = requests.get(url, stream=True, timeout=(10, 60), headers={"Accept-Encoding": "identity"})
    except requests.RequestException as e:
        raise TransferError(reason(e)) from None
    with response:
        if response.status_code in (404, 403, 401, 410):  # a wrong URL: trying again will not help
            raise UsageError(f"cannot download {url}: HTTP {response.status_code}")
        if response.status_code != 200:
            raise TransferError(f"HTTP {response.status_code}")
        expected = response.headers.get("Content-Length")
        expected = int(expected) if expected and expected.isdigit() else None
        expected_md5 = response.headers.get("Content-MD5")
        md5 = hashlib.md5()
        size = 0
        with open(path, "wb") as f, tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=os.path.basename(path), leave=False) as bar:
            try:
                for chunk in response.iter_content(1 << 20):
                    f.write(chunk)
                    md5.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
            except Exception as e:  # urllib3 raises several types for a connection cut mid-body
                raise TransferError(f"transfer broke off after {size} bytes ({reason(e)})") from None
    if expected is not None and size != expected:
        raise TransferError(f"got {size} of {expected} bytes")
    if expected_md5 and base64.b64encode(md5.digest()).decode() != expected_md5:
        raise TransferError("content does not match its Content-MD5")
    return size


def reason(error):
    text = str(error)
    return text.splitlines()[0][:200] if text else type(error).__name__


def model_problem(folder):
    """None when folder holds a complete GPT-2 release, else what is wrong with it."""
    for name in MODEL_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            return f"{name} is missing or empty"
    try:
        with open(os.path.join(folder, "hparams.json"), encoding="utf-8") as f:
            hparams = json.load(f)
        with open(os.path.join(folder, "encoder.json"), encoding="utf-8") as f:
            encoder = json.load(f)
    except ValueError as e:
        return f"a JSON file does not parse ({e})"
    if not all(isinstance(hparams.get(k), int) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")):
        return "hparams.json lacks n_vocab/n_ctx/n_embd/n_head/n_layer"
    if len(encoder) != hparams["n_vocab"]:
        return f"encoder.json has {len(encoder)} tokens, hparams.json says {hparams['n_vocab']}"
    with open(os.path.join(folder, "vocab.bpe"), encoding="utf-8", errors="replace") as f:
        if not f.readline().startswith("#version"):
            return "vocab.bpe does not start with its #version line"

    import numpy as np
    import tensorflow as tf

    prefix = os.path.join(folder, "model.ckpt")
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
    except Exception as e:  # TF's own error types for a corrupt bundle
        return f"model.ckpt.index does not open ({reason(e)})"
    wanted = sum(int(np.prod(shape)) * dtypes[name].size for name, shape in shapes.items())
    have = os.path.getsize(prefix + ".data-00000-of-00001")
    if have != wanted:
        return f"model.ckpt.data-00000-of-00001 has {have} bytes, its index describes {wanted}"
    if shapes.get("model/wte") != [hparams["n_vocab"], hparams["n_embd"]]:
        return f"model/wte is {shapes.get('model/wte')}, hparams.json says [n_vocab, n_embd]"
    try:
        with open(prefix + ".meta", "rb") as f:
            tf.compat.v1.MetaGraphDef().ParseFromString(f.read())
    except Exception as e:
        return f"model.ckpt.meta does not parse ({reason(e)})"
    return None

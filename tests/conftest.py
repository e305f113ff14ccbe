"""Shared fixtures: a tiny trained run folder, free ports, a Cloud Storage emulator.

- tiny_run (session): pathlib.Path of a from-scratch run folder (gpt-2-simple's layout, exported
  weights/), built with `python -m finetune --from-scratch ...` on a small repetitive corpus of
  <|startoftext|>...<|endoftext|> comments, so the model learns to end its texts. A build is cached
  per user (CACHE/runs, so a fresh clone on the same machine reuses it) keyed by the finetune sources,
  the pinned requirements and the command (TINY_RUN_NO_CACHE=1 builds afresh); each session gets its
  own copy, so tests may change it.
- tiny_corpus (session): the corpus file it was trained on; write_corpus(path) writes one.
- openai_layout(run_dir, dest): a run's checkpoint as a GPT-2 release (models/124M's files).
- free_port (fixture returning a function) / find_free_port(): a TCP port nobody listens on.
- storage_emulator (session): gcp-storage-emulator on a free port; yields its URL
  ("http://127.0.0.1:PORT") for STORAGE_EMULATOR_HOST. It sets no environment variable itself.

The suite runs on two workers (pytest-xdist, pytest.ini): pytest_xdist_make_scheduler keeps each module
on one worker, so that its module fixtures (trained runs, servers) are made once.
"""
import hashlib
import itertools
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests import finetune/ and app/ however pytest was started
    sys.path.insert(0, str(ROOT))
OUT = ROOT / "tests" / "out"
# What tests build once per user and machine: trained runs, the container test's base image, the 124M model.
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2-run-tests"

# Small enough to train in seconds on two cores; n_ctx stays GPT-2's 1024 (see interfaces.md).
TINY_MODEL_ARGS = ["--from-scratch", "--n-layer", "2", "--n-embd", "64", "--n-head", "2",
                   "--vocab-size", "1000"]
TINY_TRAIN_ARGS = ["--steps", "100", "--learning-rate", "0.003", "--accumulate-gradients", "1",
                   "--sample-every", "0", "--save-every", "0", "--seed", "1"]

SUBJECTS = ["the cat", "my dog", "this model", "the weather", "our team", "a small robot"]
VERBS = ["likes", "hates", "found", "wants", "made", "sees"]
OBJECTS = ["the red ball", "a warm day", "good code", "some fresh bread", "the quiet park", "a long walk"]


def corpus_text(repeat=2, seed=0):
    """216 short comments in gpt-2-simple's <|startoftext|>...<|endoftext|> format, ~5,600 tokens."""
    lines = [f"<|startoftext|>{s} {v} {o}.<|endoftext|>\n"
             for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    random.Random(seed).shuffle(lines)
    return "".join(lines * repeat)


def write_corpus(path, repeat=2, seed=0):
    path = Path(path)
    path.write_text(corpus_text(repeat, seed), encoding="utf-8")
    return path


def finetune_cmd(*args):
    return [sys.executable, "-m", "finetune", *map(str, args)]


def run_finetune(*args, env=None, timeout=300, cwd=ROOT):
    """Run `python -m finetune ARGS` from the repository root; return the CompletedProcess."""
    return subprocess.run(finetune_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def openai_layout(run_dir, dest):
    """Copy a run folder's latest checkpoint as a GPT-2 release in OpenAI's layout (model.ckpt.*).

    A checkpoint bundle's index does not name its files, so renaming the prefix is enough.
    """
    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True)
    latest = (run_dir / "checkpoint").read_text().splitlines()[0].split('"')[1]
    for suffix in (".data-00000-of-00001", ".index", ".meta"):
        shutil.copyfile(run_dir / (latest + suffix), dest / ("model.ckpt" + suffix))
    for name in ("hparams.json", "encoder.json", "vocab.bpe"):
        shutil.copyfile(run_dir / name, dest / name)
    (dest / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n'
                                     'all_model_checkpoint_paths: "model.ckpt"\n')
    return dest


def all_logits(llama, ids):
    """The logits llama.cpp computes for every position of `ids`, as a NumPy array [len(ids), n_vocab]."""
    import numpy as np

    llama.prompt(ids, all_logits=True)
    return np.frombuffer(llama.logits(len(ids)), np.float32).reshape(len(ids), llama.n_vocab)


# Modules that share something outside their tmp_path run on the same worker as each other.
SHARED = {"test_container": "podman", "test_finetune_cloud": "podman",  # one podman store and base image
          # one folder of built models, tests/out/bench-models
          "test_bench": "bench", "test_bench_steering": "bench", "test_bench_finetune": "bench"}


def pytest_xdist_make_scheduler(config, log):
    """Each module's tests on one worker, and modules that share something (SHARED) on the same one.
    (xdist's own xdist_group marks do nothing under pytest 9: they rename a node id that is no longer
    stored where they look.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = Path(nodeid.split("::")[0]).stem
            return SHARED.get(module, module)

    return ByModule(config, log)


def find_free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    return find_free_port


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def _run_key(text, args):
    digest = hashlib.sha256()
    for path in [*sorted((ROOT / "finetune").glob("*.py")), *sorted(ROOT.glob("requirements*.txt"))]:
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(repr((args, text)).encode())
    return digest.hexdigest()[:16]


def trained_run(tmp_path_factory, name, text, args):
    """A run folder trained from scratch on `text` with `python -m finetune ARGS`, cached as tiny_run
    is (see the module's docstring); each call gets its own copy."""
    cached = CACHE / "runs" / f"{name}-{_run_key(text, args)}" / "run1"
    use_cache = os.environ.get("TINY_RUN_NO_CACHE") != "1"
    if not (use_cache and (cached / "weights" / "manifest.json").is_file()):
        checkpoint_dir = tmp_path_factory.mktemp(f"{name}_build")
        corpus = checkpoint_dir / "corpus.txt"
        corpus.write_text(text, encoding="utf-8")
        result = run_finetune(*args, "--dataset", corpus, "--run-name", "run1", "--checkpoint-dir", checkpoint_dir)
        assert result.returncode == 0, f"building {name} failed:\n{result.stdout}\n{result.stderr}"
        built = checkpoint_dir / "run1"
        if not use_cache:
            return built
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.parent / f".run1.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(built, staging)
        try:
            os.rename(staging, cached)
        except OSError:  # another session cached it first
            shutil.rmtree(staging, ignore_errors=True)
    run = tmp_path_factory.mktemp(name) / "run1"
    shutil.copytree(cached, run)
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_corpus):
    return trained_run(tmp_path_factory, "tiny_run", tiny_corpus.read_text(encoding="utf-8"),
                       [*TINY_MODEL_ARGS, *TINY_TRAIN_ARGS])


@pytest.fixture(scope="session")
def storage_emulator(tmp_path_factory):
    port = find_free_port()
    log = (tmp_path_factory.mktemp("storage_emulator") / "emulator.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
         "--port", str(port), "--in-memory"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"gcp-storage-emulator did not start; see {log.name}")
            time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()

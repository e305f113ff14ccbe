"""The Cloud Run image, built from the project's Dockerfile unchanged and run for real with podman.

No Docker daemon and no registry are reachable here, so the test
- runs Debian's podman with runc, from a containers.conf and storage.conf of its own (its images live
  in a cache folder, $GPT2_RUN_CONTAINER_CACHE or ~/.cache/gpt2-run-tests, so the next run reuses the
  base image and every unchanged layer: the TensorFlow and package installs are not redone);
- builds a stand-in for python:3.11-slim with tests/base_image.sh (debootstrap; ~1 minute, once);
- builds the image with the tiny_run model in checkpoint/run1 of a copy of the checkout, made a run whose
  best step is not its latest (best.json names model-50, `checkpoint` model-100, as training leaves an
  overfit run), with its corpus.json, plus files a real checkout may hold that must stay out of the image
  (corpus, other runs, samples, .venv);
- runs it as Cloud Run would (--memory 2g, --cpus 1, PORT other than 8080) and talks to it over HTTP;
- runs cloudbuild.yaml's memory step on it as Cloud Build would (docker being podman here).
The first run on a fresh machine takes ~3 minutes (debootstrap, TensorFlow download and install).
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import CACHE, find_free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "out" / "container"
BASE_IMAGE = "docker.io/library/python:3.11-slim"  # the Dockerfile's FROM; here, the stand-in
IMAGE = "localhost/gpt2-run-test:latest"  # kept between runs, as is EXPORT_STAGE: they hold the layer cache
EXPORT_STAGE = "localhost/gpt2-run-test:export"
CONTAINER_PORT = 8123  # not Cloud Run's 8080: the server must really follow $PORT
BEST, LATEST = "model-50", "model-100"  # the run in the image: its best step is not its latest
CORPUS_RECORD = {"text_format": "delimited", "dataset": "corpus.txt", "source": None}
STANDIN_KEY_LABEL = "gpt2-run.standin-key"

# Things a real checkout may hold that must not reach the image (path -> content).
DECOYS = {
    ".venv/pyvenv.cfg": "home = /usr/bin\n",
    "data/corpus.txt": "<|startoftext|>a corpus<|endoftext|>\n",
    "checkpoint/run2/model-9.data-00000-of-00001": "another run",
    "checkpoint/run1/samples/run1-step100.txt": "a sample",
    "checkpoint/run1/loss.png": "a plot",
    "samples/run1.txt": "a sample",
    "models/124M/model.ckpt.data-00000-of-00001": "a downloaded base model",
    "tests/out/leftover.log": "a log",
    "app/__pycache__/main.cpython-311.pyc": "stale bytecode",
}


def cache_dir():
    return Path(os.environ.get("GPT2_RUN_CONTAINER_CACHE", CACHE))


class Podman:
    """podman with this test's own configuration; each call returns the CompletedProcess."""

    def __init__(self, env):
        self.env = env

    def __call__(self, *args, timeout=120, check=True):
        result = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            pytest.fail(f"podman {' '.join(args[:3])}... failed ({result.returncode}):\n"
                        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result


def podman_env(conf_dir, driver):
    """Write containers.conf + storage.conf for `driver`; return the environment that selects them."""
    graphroot = cache_dir() / "containers" / driver
    graphroot.mkdir(parents=True, exist_ok=True)
    # Run-time state belongs on /run (cleared at boot); one folder per graphroot, as podman's database
    # records these paths and refuses to open with others.
    state = Path("/run/gpt2-run-tests") / hashlib.sha256(str(graphroot).encode()).hexdigest()[:12]
    (conf_dir / "containers.conf").write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        f'tmp_dir = "{state}/libpod"\n')
    (conf_dir / f"storage-{driver}.conf").write_text(
        "[storage]\n"
        f'driver = "{driver}"\n'
        f'graphroot = "{graphroot}"\n'
        f'runroot = "{state}/storage"\n')
    return {**os.environ, "CONTAINERS_CONF": str(conf_dir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(conf_dir / f"storage-{driver}.conf")}


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the container test runs podman and debootstrap as root")
    missing = [t for t in ("podman", "runc", "debootstrap") if not shutil.which(t)]
    assert not missing, f"{', '.join(missing)} missing: `make setup-system` installs them"
    OUT.mkdir(parents=True, exist_ok=True)
    conf_dir = tmp_path_factory.mktemp("podman-conf")
    errors = []
    for driver in ("overlay", "vfs"):  # overlay where the kernel allows it; vfs copies, but works anywhere
        env = podman_env(conf_dir, driver)
        info = subprocess.run(["podman", "info", "--format", "{{.Store.GraphDriverName}}"], env=env,
                              capture_output=True, text=True, timeout=60)
        if info.returncode == 0:
            return Podman(env)
        errors.append(f"{driver}: {info.stderr.strip()[-500:]}")
    pytest.fail("podman does not work here:\n" + "\n".join(errors))


def standin_key():
    """Changes when the stand-in would come out differently: its script or the host's CA bundle."""
    digest = hashlib.sha256((ROOT / "tests" / "base_image.sh").read_bytes())
    digest.update(Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")).read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def base_image(podman):
    key = standin_key()
    found = podman("image", "inspect", "--format", f'{{{{index .Labels "{STANDIN_KEY_LABEL}"}}}}', BASE_IMAGE,
                   check=False)
    if found.returncode == 0 and found.stdout.strip() == key:
        return BASE_IMAGE
    env = {**podman.env, "PYTHON": sys.executable, "STANDIN_KEY": key,
           "DEBOOTSTRAP_CACHE": str(cache_dir() / "debootstrap")}
    started = time.monotonic()
    result = subprocess.run([str(ROOT / "tests" / "base_image.sh"), BASE_IMAGE], env=env,
                            capture_output=True, text=True, timeout=900)
    (OUT / "base_image.log").write_text(result.stderr)
    assert result.returncode == 0, f"tests/base_image.sh failed:\n{result.stderr[-3000:]}"
    print(f"built the python:3.11-slim stand-in in {time.monotonic() - started:.0f} s")
    return BASE_IMAGE


def checkout_files():
    """The checkout's files as git sees them: tracked and untracked, not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [p for p in listed.split("\0") if p and (ROOT / p).is_file()]


def make_best_not_latest(run):
    """The run as training leaves one that overfit: the best step's checkpoint (model-50) kept beside
    the latest (model-100), best.json naming it (finetune/train.py's keep_best), and corpus.json. The
    best's files are the latest's under its name (a bundle's .index does not name its files): which one
    the image serves shows in the name it reports, not in the text."""
    assert (run / "checkpoint").read_text().splitlines()[0] == f'model_checkpoint_path: "{LATEST}"'
    for path in run.glob(f"{LATEST}.*"):
        shutil.copy2(path, run / path.name.replace(LATEST, BEST))
    (run / "best.json").write_text(json.dumps({"checkpoint": BEST, "step": 50, "val_loss": 2.5}) + "\n")
    if not (run / "corpus.json").exists():  # training writes it once branch `resume` is in
        (run / "corpus.json").write_text(json.dumps(CORPUS_RECORD) + "\n")


@pytest.fixture(scope="module")
def context(tmp_path_factory, tiny_run):
    """A build context as a user's checkout would be: the project, the llama-cpp-python wheel that
    `make setup` built (so the image build does not compile it again), a run in checkpoint/run1 whose
    best step is not its latest (with a local export in weights/), and the decoys."""
    ctx = tmp_path_factory.mktemp("context")
    for rel in checkout_files():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, ctx / rel)
    for wheel in (ROOT / "wheels").glob("llama_cpp_python-*"):  # the wheel and its build-flags stamp
        shutil.copy2(wheel, ctx / "wheels" / wheel.name)
    shutil.copytree(tiny_run, ctx / "checkpoint" / "run1")
    make_best_not_latest(ctx / "checkpoint" / "run1")
    for rel, text in DECOYS.items():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(text)
    return ctx


def build(podman, context, tag, log_name, *options):
    started = time.monotonic()
    result = podman("build", "--pull=never", "--tag", tag, *options, "--file", str(context / "Dockerfile"),
                    str(context), timeout=1200, check=False)
    seconds = time.monotonic() - started
    log = result.stdout + result.stderr
    (OUT / log_name).write_text(log)
    assert result.returncode == 0, f"podman build failed ({seconds:.0f} s); see {OUT / log_name}:\n{log[-4000:]}"
    return log, seconds


def build_steps(log):
    """[(stage, instruction, came from the layer cache)] in the order podman ran them."""
    steps = []
    for line in log.splitlines():
        match = re.match(r"\[(\d+)/\d+\] STEP \d+/\d+: (.*)", line)
        if match:
            steps.append([int(match.group(1)), match.group(2), False])
        elif line.startswith("--> Using cache") and steps:
            steps[-1][2] = True
    return [tuple(s) for s in steps]


@pytest.fixture(scope="module")
def image(podman, base_image, context):
    log, seconds = build(podman, context, IMAGE, "build.log")
    report(image_build_seconds=round(seconds, 1))
    # Keep the cache to what this build used: the export stage gets a tag too (all cached, a second), then
    # layers no tag reaches (an older TensorFlow install, an older model) are dropped.
    build(podman, context, EXPORT_STAGE, "build-export-stage.log", "--target", "export")
    podman("image", "prune", "--force", timeout=300)
    return IMAGE


@pytest.fixture(scope="module")
def container(podman, image):
    """The image running as Cloud Run runs it; yields its base URL."""
    name = f"gpt2-run-test-{os.getpid()}"
    host_port = find_free_port()
    podman("run", "--detach", "--name", name, "--memory", "2g", "--cpus", "1",
           "--env", f"PORT={CONTAINER_PORT}", "--publish", f"127.0.0.1:{host_port}:{CONTAINER_PORT}", image)
    url = f"http://127.0.0.1:{host_port}"
    started = time.monotonic()
    try:
        while True:
            try:
                if httpx.head(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() - started > 60:
                logs = podman("logs", name, check=False)
                pytest.fail(f"the container did not answer HEAD / on PORT={CONTAINER_PORT} ({state}):\n"
                            f"{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
            time.sleep(0.3)
        report(container_ready_seconds=round(time.monotonic() - started, 1))
        yield name, url
    finally:
        logs = podman("logs", name, check=False)
        (OUT / "container.log").write_text(logs.stdout + logs.stderr)
        podman("rm", "--force", "--time", "2", name, check=False)


_report = {}


def report(**figures):
    """Figures for people: kept in tests/out/container/report.json, printed at the end of the module."""
    _report.update(figures)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(_report, indent=1) + "\n")


@pytest.fixture(scope="module", autouse=True)
def print_report(request):
    yield
    if _report:
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\ncontainer: " + ", ".join(f"{k}={v}" for k, v in _report.items()))


def test_head_answers(container):
    _, url = container
    response = httpx.head(url + "/", timeout=10)
    assert response.status_code == 200
    assert response.content == b""


def test_get_generates(container):
    _, url = container
    response = httpx.get(url + "/", params={"length": 20, "seed": 1}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["text"], str) and body["text"]
    assert 1 <= body["tokens"] <= 20
    assert body["stop_reason"] in ("length", "end_token", "truncate")
    assert body["seconds"] >= 0


def test_post_generates(container):
    _, url = container
    response = httpx.post(url + "/", json={"prefix": "the cat", "length": 20, "seed": 2}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"].startswith("the cat")
    assert 1 <= body["tokens"] <= 20


def test_bad_input_is_a_json_4xx(container):
    _, url = container
    response = httpx.get(url + "/", params={"length": "many"}, timeout=10)
    assert response.status_code == 400
    assert response.json()["parameter"] == "length"


def test_serves_the_page(container):
    _, url = container
    response = httpx.get(url + "/ui/", timeout=10)
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]


def test_runs_as_non_root(podman, container, image):
    name, _ = container
    uid = podman("exec", name, "id", "-u").stdout.strip()
    assert uid != "0"
    assert podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == uid
    # The server cannot change its own code or model.
    touch = podman("exec", name, "touch", "/srv/app/x", "/srv/checkpoint/run1/x", check=False)
    assert touch.returncode != 0


def test_runs_with_cloud_run_limits(podman, container):
    name, url = container
    limits = podman("inspect", "--format", "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}", name).stdout.split()
    assert limits == [str(2 * 1024**3), str(10**9)]  # --memory 2g --cpus 1, as Cloud Run's 2Gi and 1 CPU
    assert httpx.get(url + "/", params={"length": 20}, timeout=60).status_code == 200
    report(container_memory=podman("stats", "--no-stream", "--format", "{{.MemUsage}}", name).stdout.strip())


def image_files(podman, image, *find_args):
    result = podman("run", "--rm", "--user", "0", "--entrypoint", "find", image, *find_args, check=False)
    return [line for line in result.stdout.splitlines() if line]


def test_image_holds_no_tensorflow(podman, image):
    found = image_files(podman, image, "/", "-xdev", "(", "-iname", "tensorflow*", "-o", "-iname", "keras*",
                        "-o", "-name", "huggingface_hub*", ")")
    assert found == []
    spec = podman("run", "--rm", image, "python", "-c",
                  "import importlib.util as u; print(u.find_spec('tensorflow'))").stdout.strip()
    assert spec == "None"


def test_serves_the_best_step_not_the_latest(container):
    # The build exported model-50, and the server, given the best.json naming it, started on it.
    _, url = container
    limits = httpx.get(url + "/limits", timeout=10).json()
    assert (limits["checkpoint"], limits["step"], limits["val_loss"]) == (BEST, 50, 2.5)
    assert httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["checkpoint"] == BEST


def test_image_holds_the_exported_model_only(podman, image, tiny_run):
    model = {Path(p).name for p in image_files(podman, image, "/srv/checkpoint/run1", "-mindepth", "1",
                                                "-maxdepth", "1")}
    # What the server reads: the export, the files it checks the export against (`checkpoint` names
    # model-100, best.json model-50, whose .index the export's sha256 is of), the tokenizer files, and
    # the run's text-format record.
    assert model == {"weights", "checkpoint", "best.json", "corpus.json", "hparams.json", "encoder.json",
                     "vocab.bpe", f"{BEST}.index"}
    manifest = json.loads(podman("run", "--rm", "--entrypoint", "cat", image,
                                 "/srv/checkpoint/run1/weights/manifest.json").stdout)
    assert (manifest["checkpoint"], manifest["step"]) == (BEST, 50)
    assert image_files(podman, image, "/", "-xdev", "-name", "*.data-0*") == []  # the TF checkpoint stays out
    weights = {Path(p).name for p in image_files(podman, image, "/srv/checkpoint/run1/weights", "-type", "f")}
    assert weights == {p.name for p in (tiny_run / "weights").iterdir()}


def test_image_size(podman, image, base_image):
    def size(name):
        return int(podman("image", "inspect", "--format", "{{.Size}}", name).stdout.strip())

    total, base = size(image), size(base_image)
    report(image_mb=round(total / 1e6), base_standin_mb=round(base / 1e6), added_mb=round((total - base) / 1e6))
    # Serving packages + app + tiny model; TensorFlow alone would add ~1.9 GB.
    assert total - base < 200e6


def test_dockerignore_keeps_the_context_small(podman, base_image, context, tmp_path):
    # A probe image that copies the whole context in, built by the same engine from the same folder:
    # what it holds is exactly what .dockerignore lets through.
    probe = tmp_path / "Containerfile"
    probe.write_text(f"FROM {base_image}\nCOPY . /context/\n")
    podman("build", "--pull=never", "--tag", "localhost/gpt2-run-context-probe", "--file", str(probe), str(context),
           timeout=300)
    try:
        listed = image_files(podman, "localhost/gpt2-run-context-probe", "/context", "-type", "f")
    finally:
        podman("rmi", "localhost/gpt2-run-context-probe", check=False)
    sent = {p.removeprefix("/context/") for p in listed}
    for rel in DECOYS:
        assert rel not in sent
    assert not [p for p in sent if p.startswith("checkpoint/run1/weights/")]  # exported afresh in the build
    assert {"requirements.txt", "requirements-train.txt", "app/main.py", "finetune/export.py",
            "checkpoint/run1/checkpoint", "checkpoint/run1/hparams.json"} <= sent
    assert {p.split("/")[0] for p in sent} == {"requirements.txt", "requirements-train.txt", "app", "finetune",
                                               "checkpoint", "scripts", "wheels"}
    assert [p for p in sent if p.startswith("scripts/")] == ["scripts/llama_wheel.sh"]


def test_memory_step_of_cloud_build_reads_the_image(podman, image, tmp_path):
    """cloudbuild.yaml's memory step, its script as written, with `docker` being podman: it picks Cloud
    Run's memory from the export in the image (the tiny model: 512Mi) into memory.txt, or stops."""
    config = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    steps = {s["id"]: s for s in config["steps"]}
    tags = {"PROJECT_ID": "test-project", "BUILD_ID": "test-build"}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text('#!/bin/sh\nexec podman "$@"\n')
    (bin_dir / "docker").chmod(0o755)

    def memory_step(memory):
        subs = {**config["substitutions"], "_MEMORY": memory}
        text = re.sub(r"\$\{(_[A-Z0-9_]+)\}", lambda m: subs[m.group(1)], steps["memory"]["args"][-1])
        text = re.sub(r"\$([A-Z_]+)", lambda m: tags[m.group(1)], text.replace("$$", "\0")).replace("\0", "$")
        workspace = tmp_path / f"workspace-{memory}"  # Cloud Build's /workspace: the checkout
        shutil.copytree(ROOT / "scripts", workspace / "scripts")
        result = subprocess.run(["bash", *steps["memory"]["args"][:-1], text], cwd=workspace,
                                env={**podman.env, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                                capture_output=True, text=True, timeout=120)
        return result, workspace / "memory.txt"

    built = "{_REGION}-docker.pkg.dev/{PROJECT_ID}/{_REPOSITORY}/{_SERVICE}:{BUILD_ID}".format(
        **config["substitutions"], **tags)
    podman("tag", image, built)
    try:
        result, written = memory_step("auto")
        assert result.returncode == 0, result.stderr
        assert written.read_text() == "512Mi\n"
        assert "Cloud Run memory: 512Mi" in result.stdout
        result, _ = memory_step("lots")  # a typo stops the build before the push, in one line
        assert result.returncode == 1
        assert result.stderr.startswith("error: _MEMORY=lots is not") and result.stderr.count("\n") == 1
    finally:
        podman("untag", image, built, check=False)


def test_new_checkpoint_keeps_the_package_layers(podman, image, context, tmp_path):
    # The run folder changes, as a new checkpoint changes it: only the export and the layers after it
    # are rebuilt, never the TensorFlow or serving package installs. The new run has no best.json and
    # no corpus.json, as a run from a gpt-2-simple notebook: the image is built without them, and starts.
    changed = tmp_path / "context"
    shutil.copytree(context, changed)
    (changed / "checkpoint" / "run1" / "counter").write_text(f"{time.time_ns()}\n")
    for name in ("best.json", "corpus.json", f"{BEST}.index", f"{BEST}.data-00000-of-00001", f"{BEST}.meta"):
        (changed / "checkpoint" / "run1" / name).unlink(missing_ok=True)
    tag = "localhost/gpt2-run-test:new-checkpoint"
    log, seconds = build(podman, changed, tag, "build-new-checkpoint.log")
    try:
        steps = build_steps(log)
        installs = [cached for _, step, cached in steps if "pip install" in step]
        assert installs == [True, True], steps
        export = [cached for _, step, cached in steps if "finetune.export" in step]
        assert export == [False], steps  # the checkpoint changed: it was exported again
        report(rebuild_after_new_checkpoint_seconds=round(seconds, 1))
        started = podman("run", "--rm", "--entrypoint", "python", tag, "-c",
                         "from app.engine import GPT2, MODEL_DIR; print(GPT2(MODEL_DIR).served()['checkpoint'])")
        assert started.stdout.splitlines()[-1] == LATEST
    finally:
        # This one-off checkpoint's layers would only fill the cache.
        podman("rmi", tag, check=False)
        podman("image", "prune", "--force", timeout=300)


def test_sigterm_stops_it_cleanly(podman, container):
    # Last: it stops the container. Cloud Run sends SIGTERM and waits 10 s before SIGKILL.
    name, _ = container
    started = time.monotonic()
    podman("stop", "--time", "10", name, timeout=30)
    assert time.monotonic() - started < 9  # exited by itself, not killed at the deadline
    assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"

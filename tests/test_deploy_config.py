"""The deployment's configuration: the Dockerfile lints clean, cloudbuild.yaml is a valid Cloud Build
config, its `gcloud run deploy` carries the flags Cloud Run needs for this server, and the memory it
deploys with comes from scripts/cloud_run_memory.py (run here on exports of each measured size; the
container test runs it in the built image as the build does)."""
import json
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUILTIN_SUBSTITUTIONS = {"PROJECT_ID", "BUILD_ID"}  # the ones Cloud Build fills in itself


def tool(name):
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed (it is in requirements-dev.txt)"
    return found


def run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def hadolint(path):
    return run(tool("hadolint"), "--no-color", "--failure-threshold", "style", str(path))


def test_dockerfile_lints_clean():
    result = hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_dockerfile_ignores_are_justified():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            before = lines[i - 1] if i else ""
            assert before.startswith("#") and "hadolint" not in before, \
                f"line {i + 1}: a hadolint ignore needs a comment line above it saying why"


def test_hadolint_really_checks(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install numpy\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3013" in result.stdout  # untagged image, unpinned pip


def check_cloudbuild(path):
    return run(tool("check-jsonschema"), "--builtin-schema", "vendor.cloudbuild", str(path))


def test_cloudbuild_is_valid():
    result = check_cloudbuild(ROOT / "cloudbuild.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_cloudbuild_schema_really_checks(tmp_path):
    bad = tmp_path / "cloudbuild.yaml"
    bad.write_text("steps:\n  - name: gcr.io/cloud-builders/docker\n    arg: [build]\n")  # args misspelt
    assert check_cloudbuild(bad).returncode != 0


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())


def substitute(text, substitutions):
    return re.sub(r"\$\{(_[A-Z0-9_]+)\}", lambda m: substitutions[m.group(1)], text)


def step(config, step_id):
    steps = {s.get("id"): s for s in config["steps"]}
    assert step_id in steps, f"no step with id {step_id!r}"
    return steps[step_id]


def bash_script(config, step_id, substitutions=None):
    """A bash step's script as bash runs it: substitutions filled in, Cloud Build's $$ made $."""
    found = step(config, step_id)
    assert found["entrypoint"] == "bash" and found["args"][0] == "-euc"
    return substitute(found["args"][-1], substitutions or config["substitutions"]).replace("$$", "$")


def deploy_flags(config):
    """The deploy step's --flag=value arguments with the default substitutions, and the rest."""
    words = shlex.split(bash_script(config, "deploy").replace("\\\n", " "))
    assert words[:3] == ["gcloud", "run", "deploy"]
    flags, positional = {}, []
    for arg in words[3:]:
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            flags[name] = value
        else:
            positional.append(arg)
    return flags, positional


def test_substitutions_are_all_defined_and_used(config):
    # Cloud Build refuses a build that uses an undefined substitution or defines an unused one.
    text = (ROOT / "cloudbuild.yaml").read_text()
    body = "\n".join(line.split("#")[0] for line in text.splitlines())  # comments do not count
    used = set(re.findall(r"\$\{(_[A-Z0-9_]+)\}", body))
    builtin = set(re.findall(r"\$([A-Z][A-Z0-9_]*)", body))
    assert used == set(config["substitutions"])
    assert builtin <= BUILTIN_SUBSTITUTIONS, builtin - BUILTIN_SUBSTITUTIONS


def test_deploy_flags(config):
    flags, positional = deploy_flags(config)
    subs = config["substitutions"]
    assert positional == [subs["_SERVICE"]]
    assert "--allow-unauthenticated" in flags  # a public URL by default (the _AUTH substitution)
    assert flags["--concurrency"] == "1"  # the server generates one text at a time
    assert flags["--cpu"] == "1"
    assert flags["--memory"] == "$(cat memory.txt)"  # what the memory step picked
    assert flags["--port"] == "8080"
    assert "--cpu-boost" in flags  # startup CPU boost: shorter cold starts
    assert flags["--min-instances"] == "0"  # scales to zero: nothing to pay at rest
    assert 1 <= int(flags["--max-instances"]) <= 5  # a small cap on spending by default
    assert re.fullmatch(r"\d+s", flags["--timeout"]) and int(flags["--timeout"][:-1]) >= 60
    assert flags["--region"] == subs["_REGION"]


def test_deploy_settings_are_substitutions(config):
    deploy = step(config, "deploy")["args"][-1]
    for flag, name in [("--max-instances", "_MAX_INSTANCES"), ("--timeout", "_TIMEOUT"), ("--region", "_REGION")]:
        assert f"{flag}=${{{name}}}" in deploy
    assert "${_SERVICE}" in deploy and "${_AUTH}" in deploy
    assert config["substitutions"]["_MEMORY"] == "auto"
    memory = step(config, "memory")["args"][-1]
    assert '"${_MEMORY}" < scripts/cloud_run_memory.py > memory.txt' in memory


def test_image_built_pushed_then_deployed(config):
    ids = [s.get("id") for s in config["steps"]]
    assert ids == ["fetch-run", "build", "memory", "push", "deploy"]  # a model too big stops it before the push
    image = "${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/${_SERVICE}:$BUILD_ID"
    assert image.startswith("${_REGION}-docker.pkg.dev/")  # Artifact Registry, not Container Registry
    assert step(config, "build")["args"] == ["build", f"--tag={image}", "."]
    assert step(config, "push")["args"] == ["push", image]
    assert f"--image={image}" in step(config, "deploy")["args"][-1]
    assert f"--entrypoint python {image}" in step(config, "memory")["args"][-1]  # the image's own export
    assert config["images"] == [image]


def test_fetch_copies_the_run_from_cloud_storage(config):
    fetch = step(config, "fetch-run")
    script = fetch["args"][-1]
    assert "gcloud storage cp" in script and "gs://${_BUCKET}/${_RUN}/" in script
    assert "checkpoint/run1/" in script
    # *.json: hparams.json and encoder.json, and best.json and corpus.json when training wrote them.
    for name in ("checkpoint", "*.json", "vocab.bpe", "model-*"):
        assert f"gs://${{_BUCKET}}/${{_RUN}}/{name}\"" in script
    assert config["substitutions"]["_BUCKET"] == ""  # must be given; the step says so when it is not
    assert 'test -n "${_BUCKET}"' in script


def test_memory_and_deploy_steps_share_the_file(config):
    # The memory step writes memory.txt in the workspace, which every step shares; deploy reads it.
    memory = bash_script(config, "memory")
    assert memory.splitlines()[-2].endswith("> memory.txt")
    assert memory.count("scripts/cloud_run_memory.py") == 1
    assert "$(cat memory.txt)" in bash_script(config, "deploy")


# GPT-2's shapes: n_layer, n_embd (n_vocab 50257, n_ctx 1024)
GPT2 = {"124M": (12, 768), "355M": (24, 1024), "774M": (36, 1280), "1558M": (48, 1600)}


def export(run_dir, shape, gguf_mb, n_vocab=50257, n_ctx=1024):
    """A run folder's weights/ as finetune.export writes it, its GGUF file sparse (it takes no disk)."""
    n_layer, n_embd = GPT2[shape] if isinstance(shape, str) else shape
    weights = run_dir / "weights"
    weights.mkdir(parents=True)
    hparams = {"n_vocab": n_vocab, "n_ctx": n_ctx, "n_embd": n_embd, "n_head": 2, "n_layer": n_layer}
    (weights / "manifest.json").write_text(json.dumps({"checkpoint": "model-1", "hparams": hparams,
                                                       "gguf": "model.gguf"}))
    with open(weights / "model.gguf", "wb") as f:
        f.truncate(int(gguf_mb * 1e6))
    return run_dir


def memory(run_dir, *requested):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "cloud_run_memory.py"), str(run_dir), *requested],
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("shape, gguf_mb, expected", [
    ((2, 64), 1, "512Mi"),  # the tests' tiny model, at any weight type
    ("124M", 137, "512Mi"),  # Q8_0: peaks at 242 MB, 281 MB with the largest requests
    ("124M", 251, "512Mi"),  # F16: 350 MB
    ("124M", 500, "2Gi"),  # F32: never measured; the 774M Q8_0 row is the first with a file this big
    ("355M", 242, "1Gi"),  # Q4_K_M: 471 MB
    ("355M", 380, "1Gi"),  # Q8_0: 490 MB
    ("774M", 514, "2Gi"),  # Q4_K_M: 905 MB
    ("774M", 826, "2Gi"),  # Q8_0: 938 MB
])
def test_memory_is_picked_from_the_measured_peaks(tmp_path, shape, gguf_mb, expected):
    assert memory(export(tmp_path, shape, gguf_mb)) == (0, expected + "\n", "")
    assert memory(tmp_path, "auto") == (0, expected + "\n", "")


def test_a_bigger_context_or_vocabulary_is_not_covered_by_a_smaller_shape(tmp_path):
    assert memory(export(tmp_path / "ctx", (2, 64), 1, n_ctx=2048))[0] == 1
    assert memory(export(tmp_path / "vocab", (2, 64), 1, n_vocab=60000))[0] == 1


def one_line_error(result, *words):
    code, out, err = result
    assert code == 1 and out == "" and err.startswith("error: ") and err.count("\n") == 1, result
    for word in words:
        assert word in err, err


def test_an_unmeasured_size_stops_naming_memory(tmp_path):
    run = export(tmp_path, "1558M", 1700)
    one_line_error(memory(run), "_MEMORY=", "docs/benchmarks.md")
    assert memory(run, "4Gi") == (0, "4Gi\n", "")  # the builder's own figure, beyond the measurements


def test_a_memory_below_the_measured_need_stops_naming_it(tmp_path):
    run = export(tmp_path, "774M", 826)
    one_line_error(memory(run, "512Mi"), "_MEMORY=2Gi", "938 MB")
    one_line_error(memory(run, "2000M"), "_MEMORY=2Gi")  # 2 GB is less than 2 GiB
    assert memory(run, "2Gi") == (0, "2Gi\n", "")
    assert memory(run, "4096Mi") == (0, "4096Mi\n", "")


@pytest.mark.parametrize("requested", ["", "lots", "2 Gi", "2gi", "-1Gi", "1.5Gi", "２Gi"])
def test_a_memory_that_is_no_size_stops(tmp_path, requested):
    one_line_error(memory(export(tmp_path, "124M", 137), requested), f"_MEMORY={requested} ")


def test_the_memory_table_is_the_measured_one():
    # scripts/cloud_run_memory.py's rows are the figures of the benchmark run docs/benchmarks.md cites.
    measured = runpy.run_path(str(ROOT / "scripts" / "cloud_run_memory.py"))["MEASURED"]
    results = (ROOT / "bench" / "results" / "2026-11-23-gguf.md").read_text()
    for shape, n_layer, n_embd, n_vocab, n_ctx, gguf_mb, peak_mb, setting in measured:
        size, weights = shape.removeprefix("GPT-2 ").split()
        assert (n_layer, n_embd, n_vocab, n_ctx) == (*GPT2[size], 50257, 1024)  # the benchmark's models
        if size == "124M":  # | weights | GGUF (MB) | threads | 3 speeds | ours peak RSS (MB) | ...
            row = rf"^\| {weights} \| {gguf_mb} \| 1 \|(?: [^|]+ \|){{3}} {peak_mb} \|"
        else:  # | shape | weights | GGUF (MB) | tokens/s | peak RSS (MB) | Cloud Run --memory |
            row = rf"^\| {size} \| {weights} \| {gguf_mb} \| [^|]+ \| {peak_mb} \| {setting} \|"
        assert re.search(row, results, re.M), shape
        assert size_in_bytes(setting) >= 1.25 * peak_mb * 1e6  # 25% above the peak


def size_in_bytes(setting):
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", setting).groups()
    return int(number) * {"Mi": 2**20, "Gi": 2**30}[unit]


def test_no_export_stops(tmp_path):
    one_line_error(memory(tmp_path), "python -m finetune.export")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "manifest.json").write_text('{"hparams": {"n_layer": 1}}')
    one_line_error(memory(tmp_path), "python -m finetune.export")


def llama_wheel_check(folder):
    return subprocess.run(["sh", "scripts/llama_wheel.sh", str(folder), "--check"], cwd=ROOT,
                          env={"PATH": f"{BIN}:/usr/bin:/bin", "PIP": f"{sys.executable} -m pip"},
                          capture_output=True, text=True, timeout=120).returncode


def test_llama_wheel_is_reused_only_when_built_with_the_portable_flags(tmp_path):
    """The image build reuses wheels/'s llama-cpp-python only with the stamp of scripts/llama_wheel.sh's
    flags: a wheel's name does not say how it was compiled, and pip's default is GGML_NATIVE=ON."""
    wheel = next((ROOT / "wheels").glob("llama_cpp_python-*.whl"))
    stamp = next((ROOT / "wheels").glob("llama_cpp_python-*.cmake-args"))
    shutil.copy2(wheel, tmp_path / wheel.name)
    assert llama_wheel_check(tmp_path) == 1  # no stamp: compile
    (tmp_path / stamp.name).write_text(stamp.read_text().replace("-DGGML_NATIVE=OFF", "-DGGML_NATIVE=ON"))
    assert llama_wheel_check(tmp_path) == 1  # built for the build machine's CPU: compile
    shutil.copy2(stamp, tmp_path / stamp.name)
    assert llama_wheel_check(tmp_path) == 0


def test_llama_wheel_has_no_avx512(tmp_path):
    """The CPU backend make setup built (and the image installs) uses AVX2 at most, even when built on
    a machine with AVX-512 like this one may be: no zmm register anywhere in libggml-cpu."""
    wheel = next((ROOT / "wheels").glob("llama_cpp_python-*.whl"))
    shutil.unpack_archive(wheel, tmp_path, format="zip")
    libraries = list(tmp_path.glob("**/libggml-cpu.so"))
    assert libraries
    for library in libraries:
        code = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
        assert "%ymm" in code  # the AVX2 build really is there
        assert "%zmm" not in code

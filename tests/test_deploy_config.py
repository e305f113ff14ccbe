"""The deployment's configuration: the Dockerfile lints clean, cloudbuild.yaml is a valid Cloud Build
config, and its `gcloud run deploy` carries the flags Cloud Run needs for this server."""
import re
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


def deploy_flags(config):
    """The deploy step's --flag=value arguments with the default substitutions, and the rest."""
    deploy = step(config, "deploy")
    assert deploy["entrypoint"] == "gcloud" and deploy["args"][:2] == ["run", "deploy"]
    subs = config["substitutions"]
    flags, positional = {}, []
    for arg in (substitute(a, subs) for a in deploy["args"][2:]):
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
    assert flags["--memory"] == "512Mi"  # 124M Q8_0 peaks under 300 MB (bench/results)
    assert "--cpu-boost" in flags  # startup CPU boost: shorter cold starts
    assert flags["--min-instances"] == "0"  # scales to zero: nothing to pay at rest
    assert 1 <= int(flags["--max-instances"]) <= 5  # a small cap on spending by default
    assert re.fullmatch(r"\d+s", flags["--timeout"]) and int(flags["--timeout"][:-1]) >= 60
    assert flags["--region"] == subs["_REGION"]


def test_deploy_settings_are_substitutions(config):
    deploy_args = step(config, "deploy")["args"]
    for flag, name in [("--memory", "_MEMORY"), ("--max-instances", "_MAX_INSTANCES"),
                       ("--timeout", "_TIMEOUT"), ("--region", "_REGION")]:
        assert f"{flag}=${{{name}}}" in deploy_args
    assert "${_SERVICE}" in deploy_args and "${_AUTH}" in deploy_args


def test_image_built_pushed_then_deployed(config):
    ids = [s.get("id") for s in config["steps"]]
    assert ids == ["fetch-run", "build", "push", "deploy"]
    image = "${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/${_SERVICE}:$BUILD_ID"
    assert image.startswith("${_REGION}-docker.pkg.dev/")  # Artifact Registry, not Container Registry
    assert step(config, "build")["args"] == ["build", f"--tag={image}", "."]
    assert step(config, "push")["args"] == ["push", image]
    assert f"--image={image}" in step(config, "deploy")["args"]
    assert config["images"] == [image]


def test_fetch_copies_the_run_from_cloud_storage(config):
    fetch = step(config, "fetch-run")
    script = fetch["args"][-1]
    assert "gcloud storage cp" in script and "gs://${_BUCKET}/${_RUN}/" in script
    assert "checkpoint/run1/" in script
    for name in ("checkpoint", "hparams.json", "encoder.json", "vocab.bpe", "model-*"):
        assert f"gs://${{_BUCKET}}/${{_RUN}}/{name}\"" in script
    assert config["substitutions"]["_BUCKET"] == ""  # must be given; the step says so when it is not
    assert 'test -n "${_BUCKET}"' in script


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

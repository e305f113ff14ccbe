"""python -m finetune.cloud up to the cloud's edge, and its training image for real.

No gcloud account here: the tool's commands are checked flag by flag from --dry-run, its bad input
against gcp-storage-emulator, its one-line explanations of gcloud failures from gcloud's own error
texts. The training image (finetune/Dockerfile) is built with podman on the python:3.11-slim
stand-in (test_container's), with tensorflow-cpu of the pinned TensorFlow version instead of the
3 GB of CUDA wheels, and its entry point trains against the emulator: corpus from the bucket, run to
the bucket, a second task resumes from the bucket, SIGTERM mid-run then resume, --require-gpu on a
machine without a GPU.
"""
import os
import re
import shlex
import subprocess
import sys
import time
import uuid

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from conftest import ROOT, TINY_MODEL_ARGS, corpus_text
from test_container import base_image, podman  # noqa: F401 (fixtures: podman, the stand-in base image)


def cloud(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "finetune.cloud", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def bucket(storage_emulator):
    """A fresh emulator bucket holding corpus.txt; the environment for the CLI."""
    client = storage.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": storage_emulator})
    b = client.create_bucket(f"gpt2-{uuid.uuid4().hex[:8]}")
    b.blob("corpus.txt").upload_from_string(corpus_text())
    return b, dict(os.environ, STORAGE_EMULATOR_HOST=storage_emulator)


def flags(argv):
    """{--flag: value} of a command line (--flag=value form; a bare --flag maps to True)."""
    out = {}
    for a in argv:
        if a.startswith("--"):
            key, eq, value = a.partition("=")
            out[key] = value if eq else True
    return out


def test_dry_run_prints_every_command_flag_by_flag(bucket):
    b, env = bucket
    result = cloud("--bucket", b.name, "--dataset", f"gs://{b.name}/corpus.txt", "--region", "europe-west4",
                   "--run-name", "aita", "--project", "my-project", "--dry-run",
                   "--steps", "1000", "--window", "256", "--learning-rate", "5e-5", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"Estimated: \d+ min on one L4 for 1000 steps, about \$\d+\.\d\d at \$1\.05/h "
                        r"\(L4 \$0\.67 \+ 4 vCPU \+ 16Gi, https://cloud\.google\.com/run/pricing\); "
                        r"the speed is assumed, the job prints the measured one", lines[0])
    build, deploy, execute = (shlex.split(line) for line in lines[1:4])
    image = "europe-west4-docker.pkg.dev/my-project/gpt2/finetune:latest"

    assert build[:3] == ["gcloud", "builds", "submit"] and build[-1] == "."
    assert flags(build) == {"--project": "my-project", "--region": "europe-west4",
                            "--config": "finetune/cloudbuild.yaml", "--substitutions": f"_IMAGE={image}"}

    assert deploy[:5] == ["gcloud", "run", "jobs", "deploy", "gpt2-finetune"]
    deploy_flags = flags(deploy)
    job_args = deploy_flags.pop("--args")
    assert deploy_flags == {"--project": "my-project", "--region": "europe-west4", "--image": image,
                            "--gpu": "1", "--gpu-type": "nvidia-l4", "--cpu": "4", "--memory": "16Gi",
                            "--tasks": "1", "--max-retries": "3", "--task-timeout": "3600s"}
    delimiter = job_args[1]
    assert job_args[0] == job_args[2] == "^"  # gcloud's alternate delimiter syntax
    assert job_args[3:].split(delimiter) == [
        "--dataset", f"gs://{b.name}/corpus.txt", "--run-name", "aita", "--upload", f"gs://{b.name}/aita",
        "--require-gpu", "--steps", "1000", "--window", "256", "--learning-rate", "5e-5", "--until-step", "1000"]

    assert execute[:5] == ["gcloud", "run", "jobs", "execute", "gpt2-finetune"]
    assert flags(execute) == {"--project": "my-project", "--region": "europe-west4", "--wait": True}
    assert lines[4] == ("# progress: gcloud beta run jobs logs tail gpt2-finetune --project=my-project "
                        "--region=europe-west4")
    assert lines[5] == (f"# the run: gs://{b.name}/aita; deploy it with: gcloud builds submit "
                        "--project=my-project --config=cloudbuild.yaml "
                        f"--substitutions=_BUCKET={b.name},_RUN=aita,_REGION=europe-west4")
    assert len(lines) == 6
    assert [blob.name for blob in b.list_blobs()] == ["corpus.txt"]  # touched nothing


CLOUD_BAD_INPUTS = [
    (["--bucket", "nope-{id}", "--dataset", "gs://nope-{id}/corpus.txt"],
     "error: bucket gs://nope-{id} does not exist: gcloud storage buckets create gs://nope-{id} "
     "--location=us-central1"),
    (["--bucket", "{bucket}", "--dataset", "gs://{bucket}/missing.txt"],
     "error: gs://{bucket}/missing.txt does not exist: upload the corpus first, e.g. gcloud storage cp "
     "data/corpus.txt gs://{bucket}/missing.txt"),
    (["--bucket", "{bucket}", "--dataset", "gs://{bucket}/corpus.txt", "--region", "us-west1"],
     "error: region us-west1 has no L4 GPUs for Cloud Run jobs: choose one of us-central1, europe-west1, "
     "europe-west4, asia-southeast1 (https://cloud.google.com/run/docs/configuring/jobs/gpu)"),
    (["--bucket", "{bucket}", "--dataset", "gs://{bucket}/corpus.txt", "--window", "2048"],
     "error: --window 2048 is above the model's n_ctx 1024"),
    (["--bucket", "{bucket}", "--dataset", "gs://{bucket}/corpus.txt", "--upload", "gs://{bucket}/x"],
     "error: --upload is set by the job itself (the run goes to gs://{bucket}/run1)"),
    (["--bucket", "{bucket}", "--dataset", "gs://{bucket}/corpus.txt", "--task-timeout", "7200"],
     "error: --task-timeout must be 1 to 3600 seconds for a GPU task, not 7200"),
    (["--bucket", "{bucket}", "--dataset", "gs://{bucket}/corpus.txt", "--stepz", "5"],
     "error: unrecognized arguments: --stepz 5 (see python -m finetune.cloud --help)"),
    (["--dataset", "gs://{bucket}/corpus.txt"],
     "error: the following arguments are required: --bucket (see python -m finetune.cloud --help)"),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
@pytest.mark.parametrize("args,message", CLOUD_BAD_INPUTS, ids=[m[7:40] for _, m in CLOUD_BAD_INPUTS])
def test_cloud_bad_input(bucket, args, message, dry_run):
    b, env = bucket
    env["PATH"] = os.path.dirname(sys.executable)  # no gcloud: the checks come before it is needed
    names = {"bucket": b.name, "id": uuid.uuid4().hex[:8]}
    result = cloud(*[a.format(**names) for a in args], *(["--dry-run"] if dry_run else []), env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [message.format(**names)]


JOB_RULE = ("a Cloud Run job name is 1-63 lowercase letters, digits and hyphens, starting with a letter and not "
            "ending with a hyphen")
REPOSITORY_RULE = ("an Artifact Registry repository name is 1-63 lowercase letters, digits and hyphens, starting "
                   "with a letter and not ending with a hyphen")
RUN_RULE = "a run name is 1-63 letters, digits, '.', '_' and '-', starting with a letter or digit"
BUCKET_RULE = ("a Cloud Storage bucket name is 3-63 lowercase letters, digits, '-', '_' and '.' (up to 222 with "
               "dots, 63 between two), starting and ending with a letter or digit")
PROJECT_RULE = ("a project ID is 6-30 lowercase letters, digits and hyphens, starting with a letter and not ending "
                "with a hyphen")
BAD_NAMES = [  # each would reach gcloud's command line or a Cloud Build substitution
    ("--run-name", "x,_REGION=evil", RUN_RULE),  # one more substitution in the deploy command
    ("--run-name", "$(id)", RUN_RULE),  # cloudbuild.yaml puts _RUN into a bash line
    ("--run-name", "-x", RUN_RULE),
    ("--run-name", "a" * 64, RUN_RULE),
    ("--job", "--impersonate-service-account=x@y.iam.gserviceaccount.com", JOB_RULE),  # a gcloud flag
    ("--job", "Gpt2", JOB_RULE),
    ("--job", "gpt2-", JOB_RULE),
    ("--job", "a" * 64, JOB_RULE),
    ("--repository", "gpt2,_IMAGE=evil", REPOSITORY_RULE),
    ("--repository", "-gpt2", REPOSITORY_RULE),
    ("--project", "my-project,_X=y", PROJECT_RULE),
    ("--project", "--verbosity=debug", PROJECT_RULE),
    ("--bucket", "b,_RUN=x", BUCKET_RULE),
    ("--bucket", "-bucket", BUCKET_RULE),
    ("--bucket", "My-Bucket", BUCKET_RULE),
    ("--bucket", "ab", BUCKET_RULE),
    ("--bucket", "a/b", BUCKET_RULE),
    ("--bucket", "192.168.5.4", "Cloud Storage refuses names that look like an IP address, start with 'goog' or "
                                "hold 'google'"),
    ("--bucket", "my-google-runs", "Cloud Storage refuses names that look like an IP address, start with 'goog' "
                                   "or hold 'google'"),
]


@pytest.mark.parametrize("flag,value,rule", BAD_NAMES, ids=[f"{f}={v[:20]}" for f, v, _ in BAD_NAMES])
def test_a_name_that_a_cloud_service_refuses_is_one_line(bucket, flag, value, rule):
    b, env = bucket
    env["PATH"] = os.path.dirname(sys.executable)  # no gcloud: refused before anything runs
    args = {"--bucket": b.name, "--dataset": f"gs://{b.name}/corpus.txt", flag: value}
    result = cloud(*[f"{k}={v}" for k, v in args.items()], "--dry-run", env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {flag} {value!r} is not a valid name: {rule}"]
    assert result.stdout == ""


def test_names_the_services_accept_pass():
    from finetune.cloud import parse

    args = parse(["--bucket", "gs://runs_2026.example.com/", "--dataset", "gs://runs_2026.example.com/c.txt",
                  "--run-name", "AITA_v2.1-final", "--job", "j" + "a" * 62, "--repository", "gpt2-models",
                  "--project", "my-project-123"])
    assert (args.bucket, args.run_name, args.job) == ("runs_2026.example.com", "AITA_v2.1-final", "j" + "a" * 62)


def test_without_gcloud_a_real_run_says_how_to_get_it(bucket):
    b, env = bucket
    env["PATH"] = os.path.dirname(sys.executable)
    result = cloud("--bucket", b.name, "--dataset", f"gs://{b.name}/corpus.txt", env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: gcloud is not installed: https://cloud.google.com/sdk/docs/install (or use --dry-run to see "
        "the commands)"]


def test_gcloud_failures_become_one_line_naming_the_fix():
    from finetune.cloud import explain

    where = ["run", "jobs", "deploy", "job", "--project=p1", "--region=us-central1"]
    quota = ("ERROR: (gcloud.run.jobs.deploy) spec.template.spec.template.spec.containers[0].resources."
             "limits: Quota exceeded for total allowable count of GPUs per project per region.\n")
    assert explain(quota, where) == (
        "project p1 has no Cloud Run L4 GPU quota in us-central1: request 'Total Nvidia L4 GPU allocation "
        "without zonal redundancy, per project per region' (Cloud Run Admin API) at "
        "https://console.cloud.google.com/iam-admin/quotas?project=p1")
    disabled = ("ERROR: (gcloud.run.jobs.deploy) PERMISSION_DENIED: Cloud Run Admin API has not been used in "
                "project p1 before or it is disabled. Enable it by visiting https://console.developers.google."
                "com/apis/api/run.googleapis.com/overview?project=p1\n")
    assert explain(disabled, where) == (
        "the Cloud Run Admin API is not enabled in p1: gcloud services enable run.googleapis.com --project=p1")
    other = "Deploying...\nERROR: (gcloud.run.jobs.deploy) Image 'x' not found.\n"
    assert explain(other, where) == "gcloud run jobs deploy failed: ERROR: (gcloud.run.jobs.deploy) Image 'x' not found."


def test_training_image_config_lints_and_validates():
    """finetune/Dockerfile lints clean; finetune/cloudbuild.yaml is a valid Cloud Build config that
    builds that Dockerfile into the _IMAGE that python -m finetune.cloud passes."""
    import yaml

    from test_deploy_config import check_cloudbuild, hadolint

    lint = hadolint(ROOT / "finetune" / "Dockerfile")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    schema = check_cloudbuild(ROOT / "finetune" / "cloudbuild.yaml")
    assert schema.returncode == 0, schema.stdout + schema.stderr
    config = yaml.safe_load((ROOT / "finetune" / "cloudbuild.yaml").read_text())
    build = next(step for step in config["steps"] if step["id"] == "build")
    assert build["args"] == ["build", "--file=finetune/Dockerfile", "--tag=${_IMAGE}", "."]
    assert config["images"] == ["${_IMAGE}"]


# -- the training image, for real with podman ----------------------------------------------------

TRAIN_IMAGE = "localhost/gpt2-run-test:finetune"
TRAIN_ARGS = [*TINY_MODEL_ARGS, "--accumulate-gradients", "1", "--sample-every", "0",
              "--learning-rate", "0.003", "--seed", "1"]


@pytest.fixture(scope="module")
def train_image(podman, base_image):  # noqa: F811 (fixtures imported above)
    started = time.monotonic()
    result = podman("build", "--pull=never", "--tag", TRAIN_IMAGE, "--file", str(ROOT / "finetune" / "Dockerfile"),
                    "--ignorefile", str(ROOT / "finetune" / "Dockerfile.dockerignore"),
                    "--build-arg", "TENSORFLOW_PACKAGE=tensorflow-cpu", str(ROOT), timeout=1500, check=False)
    assert result.returncode == 0, f"podman build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    print(f"built the training image in {time.monotonic() - started:.0f} s")
    return TRAIN_IMAGE


def blob_text(b, name):
    blob = b.get_blob(name)
    return blob.download_as_text() if blob else None


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_training_image_trains_from_and_to_the_bucket_and_resumes(podman, train_image, bucket):  # noqa: F811
    b, env = bucket
    emulator = env["STORAGE_EMULATOR_HOST"]
    job = ["--dataset", f"gs://{b.name}/corpus.txt", "--upload", f"gs://{b.name}/run1", *TRAIN_ARGS]

    def task(*args, name=None, detach=False):
        return podman("run", *(["--detach", "--name", name] if detach else ["--rm"]), "--network", "host",
                      "--env", f"STORAGE_EMULATOR_HOST={emulator}", train_image, *job, *args,
                      timeout=600, check=False)

    first = task("--steps", "12", "--save-every", "6")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Training on CPU" in first.stdout
    assert blob_text(b, "run1/counter") == "12\n"
    assert blob_text(b, "run1/checkpoint").splitlines()[0] == 'model_checkpoint_path: "model-12"'
    assert b.get_blob("run1/weights/manifest.json") is not None

    second = task("--steps", "3")  # a new task: empty disk, the run comes from the bucket
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Continuing the run at gs://{b.name}/run1" in second.stdout
    assert blob_text(b, "run1/counter") == "15\n"
    assert b.get_blob("run1/model-12.index") is None  # the bucket keeps --max-checkpoints, as the folder

    # SIGTERM mid-run (Cloud Run's notice before stopping a task): the checkpoint reaches the bucket.
    name = f"gpt2-run-train-{os.getpid()}"
    podman("rm", "--force", name, check=False)
    assert task("--steps", "-1", "--save-every", "50", name=name, detach=True).returncode == 0
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"step=(2[4-9]|[3-9]\d) ", podman("logs", name, check=False).stderr):
            assert time.monotonic() < deadline, podman("logs", name, check=False).stderr[-3000:]
            time.sleep(0.5)
        podman("kill", "--signal", "TERM", name)
        code = podman("wait", name, timeout=120).stdout.strip()
        logs = podman("logs", name, check=False).stderr
    finally:
        podman("rm", "--force", name, check=False)
    assert code == "143", logs[-3000:]
    saved = int(blob_text(b, "run1/counter"))
    assert saved >= 24
    assert blob_text(b, "run1/checkpoint").splitlines()[0] == f'model_checkpoint_path: "model-{saved}"'
    assert f"SIGTERM: saved model-{saved} in checkpoint/run1 and gs://{b.name}/run1; continue" in logs

    third = task("--steps", "2")
    assert third.returncode == 0, third.stderr[-3000:]
    assert blob_text(b, "run1/counter") == f"{saved + 2}\n"


@pytest.mark.slow
def test_training_image_refuses_to_train_without_the_gpu_it_was_promised(podman, train_image, bucket):  # noqa: F811
    b, env = bucket
    started = time.monotonic()
    result = podman("run", "--rm", "--network", "host", "--env", f"STORAGE_EMULATOR_HOST={env['STORAGE_EMULATOR_HOST']}",
                    train_image, "--dataset", f"gs://{b.name}/corpus.txt", "--upload", f"gs://{b.name}/run1",
                    "--require-gpu", timeout=300, check=False)
    assert result.returncode == 2
    assert re.fullmatch(r"error: a GPU was required \(--require-gpu\) but TensorFlow 2\.15\.1 \(a CPU-only "
                        r"build\) sees none: check the driver with nvidia-smi",
                        result.stderr.strip().splitlines()[-1]), result.stderr
    assert time.monotonic() - started < 120
    assert [blob.name for blob in b.list_blobs()] == ["corpus.txt"]


def test_a_run_already_in_the_bucket_is_continued_to_steps_more(bucket):
    """The job gets --until-step, so that a retried task finishes the run instead of adding --steps again."""
    b, env = bucket
    b.blob("run1/checkpoint").upload_from_string('model_checkpoint_path: "model-40"\n'
                                                 'all_model_checkpoint_paths: "model-40"\n')
    result = cloud("--bucket", b.name, "--dataset", f"gs://{b.name}/corpus.txt", "--dry-run", "--steps", "100",
                   env=env)
    assert result.returncode == 0, result.stderr
    assert f"gs://{b.name}/run1 is at step 40: the job continues it to step 140\n" in result.stdout
    deploy = next(line for line in result.stdout.splitlines() if line.startswith("gcloud run jobs deploy"))
    assert deploy.endswith("|--steps|100|--until-step|140'")

"""python -m finetune.cloud: fine-tune as a Cloud Run job on one NVIDIA L4 GPU.

    python -m finetune.cloud --bucket BUCKET --dataset gs://BUCKET/corpus.txt [--region REGION] \\
        [--run-name NAME] [--dry-run] [any flag of python -m finetune]

Builds the training image (finetune/Dockerfile, with Cloud Build), deploys the job (`gcloud run jobs
deploy`, --gpu 1 --gpu-type nvidia-l4, 4 CPU, 16 GiB), runs it and waits, streaming its log. The
job reads the corpus from the bucket and writes the run to gs://BUCKET/NAME after every
checkpoint, so a retried or re-run task continues from there; at the end it prints the command
that deploys the run (cloudbuild.yaml). --dry-run prints every command and the estimated cost and
runs nothing. Bad input or a missing API/quota is one line on stderr and exit status 2.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

from finetune import UsageError
from finetune.__main__ import build_parser as finetune_parser
from finetune.__main__ import validate
from finetune.arguments import gs_url

# Regions whose Cloud Run jobs offer L4 GPUs: https://cloud.google.com/run/docs/configuring/jobs/gpu
# ("Supported regions", read 2026-11; asia-south1 is by invitation only, so not listed here).
L4_REGIONS = ["us-central1", "europe-west1", "europe-west4", "asia-southeast1"]
# What a GPU job must have (same page): at least 4 CPU and 16 GiB. A GPU task runs at most 1 hour
# (https://cloud.google.com/run/docs/configuring/task-timeout); longer runs continue on retries.
CPU, MEMORY, MAX_TASK_TIMEOUT_S = 4, "16Gi", 3600
# Tier 1 prices, https://cloud.google.com/run/pricing (read 2026-11): jobs' vCPU-second and GiB-second,
# and an L4 GPU-second without zonal redundancy (jobs always are), about $0.67 an hour.
PRICE_VCPU_S, PRICE_GIB_S, PRICE_L4_S = 0.000018, 0.000002, 0.0001867
# Not measured (no GPU here): GPT-2 124M's ~0.86 GFLOP per trained token (6 x 124M parameters plus
# attention) at an assumed 12 TFLOP/s, 40% of the L4's 30 TFLOP/s float32 peak. The job prints the
# measured time left after its first steps.
L4_SECONDS_PER_TOKEN_124M = 0.86e9 / 12e12
MODEL_SCALE = {"124M": 1, "355M": 2.9, "774M": 6.3, "1558M": 12.7}  # parameters relative to 124M
STARTUP_S = 300  # image pull, base model download, final save and upload
APIS = {"run.googleapis.com": "Cloud Run Admin API", "cloudbuild.googleapis.com": "Cloud Build API",
        "artifactregistry.googleapis.com": "Artifact Registry API"}
OWN_FLAGS = ["--upload", "--checkpoint-dir", "--require-gpu"]  # the job sets these itself
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the build context


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see python -m finetune.cloud --help)")


def build_parser():
    p = Parser(prog="python -m finetune.cloud", description=__doc__.split("\n\n")[0],
               epilog="Every other flag goes to python -m finetune in the job, e.g. --steps 1000 --window 256.")
    p.add_argument("--bucket", required=True, help="bucket for the corpus and the run (gs://BUCKET/RUN-NAME)")
    p.add_argument("--dataset", required=True, type=gs_url, metavar="gs://BUCKET/FILE", help="the corpus")
    p.add_argument("--region", default="us-central1", help="one with L4 GPUs: " + ", ".join(L4_REGIONS))
    p.add_argument("--run-name", default="run1", help="the run: gs://BUCKET/RUN-NAME")
    p.add_argument("--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT"),
                   help="default: $GOOGLE_CLOUD_PROJECT, else gcloud's configured project")
    p.add_argument("--job", default="gpt2-finetune", help="Cloud Run job name")
    p.add_argument("--repository", default="gpt2", help="Artifact Registry Docker repository in REGION")
    p.add_argument("--no-build", action="store_true", help="use the image already pushed")
    p.add_argument("--max-retries", type=int, default=3, help="task retries; each continues from the bucket")
    p.add_argument("--task-timeout", type=int, default=MAX_TASK_TIMEOUT_S,
                   help=f"seconds per attempt (GPU tasks: at most {MAX_TASK_TIMEOUT_S})")
    p.add_argument("--no-wait", action="store_true", help="start the execution and return")
    p.add_argument("--dry-run", action="store_true", help="print the commands and the cost; run nothing")
    return p


# What Cloud Run (job names), Artifact Registry (repositories), Cloud Storage (buckets) and Resource
# Manager (project IDs) accept, per their naming pages. Each value also reaches a gcloud command line
# or a Cloud Build substitution (`_RUN=...,_REGION=...`, a bash line in cloudbuild.yaml), so nothing
# else may pass: no comma, quote, `$`, space, or leading '-' (gcloud would read a flag).
DNS_LABEL = r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?"
NAME_RULES = {
    "--job": (DNS_LABEL, "a Cloud Run job name is 1-63 lowercase letters, digits and hyphens, starting "
                         "with a letter and not ending with a hyphen"),
    "--repository": (DNS_LABEL, "an Artifact Registry repository name is 1-63 lowercase letters, digits and "
                                "hyphens, starting with a letter and not ending with a hyphen"),
    "--project": (r"[a-z][a-z0-9-]{4,28}[a-z0-9]", "a project ID is 6-30 lowercase letters, digits and "
                                                    "hyphens, starting with a letter and not ending with a hyphen"),
    "--run-name": (r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", "a run name is 1-63 letters, digits, '.', '_' and '-', "
                                                       "starting with a letter or digit"),
    "--bucket": (r"(?=.{3,222}$)[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?)*",
                 "a Cloud Storage bucket name is 3-63 lowercase letters, digits, '-', '_' and '.' (up to 222 "
                 "with dots, 63 between two), starting and ending with a letter or digit"),
}


def check_names(args):
    """Every name that reaches gcloud or Cloud Build, against what the service accepts (UsageError)."""
    for flag, (pattern, rule) in NAME_RULES.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and not re.fullmatch(pattern, value):
            raise UsageError(f"{flag} {value!r} is not a valid name: {rule}")
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", args.bucket) or args.bucket.startswith("goog") or "google" in args.bucket:
        raise UsageError(f"--bucket {args.bucket!r} is not a valid name: Cloud Storage refuses names that look "
                         "like an IP address, start with 'goog' or hold 'google'")


def parse(argv):
    args, rest = build_parser().parse_known_args(argv)
    bucket = args.bucket = args.bucket.removeprefix("gs://").rstrip("/")
    check_names(args)
    if args.region not in L4_REGIONS:
        raise UsageError(f"region {args.region} has no L4 GPUs for Cloud Run jobs: choose one of "
                         f"{', '.join(L4_REGIONS)} (https://cloud.google.com/run/docs/configuring/jobs/gpu)")
    if not 1 <= args.task_timeout <= MAX_TASK_TIMEOUT_S:
        raise UsageError(f"--task-timeout must be 1 to {MAX_TASK_TIMEOUT_S} seconds for a GPU task, "
                         f"not {args.task_timeout}")
    if not 0 <= args.max_retries <= 10:
        raise UsageError(f"--max-retries must be 0 to 10, not {args.max_retries}")
    for flag in OWN_FLAGS:
        if any(r == flag or r.startswith(flag + "=") for r in rest):
            raise UsageError(f"{flag} is set by the job itself (the run goes to gs://{bucket}/{args.run_name})")
    args.job_args = ["--dataset", args.dataset, "--run-name", args.run_name,
                     "--upload", f"gs://{bucket}/{args.run_name}", "--require-gpu", *rest]
    # The job's own command line, checked here as the job would check it, so that a typo fails now
    # and not after the image build.
    try:
        args.finetune = finetune_parser().parse_args(args.job_args)
    except UsageError as e:
        raise UsageError(str(e).replace("python -m finetune --help", "python -m finetune.cloud --help")) from None
    validate(args.finetune)
    check_fit(args.finetune)
    return args


def check_fit(ft):
    """The run must fit the L4's memory, in the precision the job will pick there (finetune.fit):
    checked before anything is built, with the same one line as the job's."""
    from finetune import fit, precision
    chosen, _ = precision.choose(ft.precision, gpu_capability=fit.L4_CAPABILITY)
    if ft.from_scratch:
        hp, name = fit.Shape(ft.vocab_size, ft.n_ctx, ft.n_embd, ft.n_head, ft.n_layer), None
    else:
        hp, name = fit.release_shape(ft.model), ft.model
    options = fit.Options.from_args(ft, ft.window or hp.n_ctx, chosen)
    fit.check(hp, options, fit.L4_MEMORY, "the L4", name=name)


def commands(args, project):
    image = f"{args.region}-docker.pkg.dev/{project}/{args.repository}/finetune:latest"
    where = [f"--project={project}", f"--region={args.region}"]
    build = ["gcloud", "builds", "submit", *where, "--config=finetune/cloudbuild.yaml",
             f"--substitutions=_IMAGE={image}", "."]
    deploy = ["gcloud", "run", "jobs", "deploy", args.job, *where, f"--image={image}",
              "--gpu=1", "--gpu-type=nvidia-l4", f"--cpu={CPU}", f"--memory={MEMORY}", "--tasks=1",
              f"--max-retries={args.max_retries}", f"--task-timeout={args.task_timeout}s",
              f"--args={list_flag(args.job_args)}"]
    execute = ["gcloud", "run", "jobs", "execute", args.job, *where, "--async" if args.no_wait else "--wait"]
    logs = ["gcloud", "beta", "run", "jobs", "logs", "tail", args.job, f"--project={project}",
            f"--region={args.region}"]
    return ([] if args.no_build else [build]) + [deploy, execute], logs


def list_flag(values):
    """gcloud's list syntax; values may hold commas, so pick a delimiter none of them holds
    (`gcloud topic escaping`)."""
    for delimiter in "|#~@":
        if not any(delimiter in v for v in values):
            return f"^{delimiter}^" + delimiter.join(values)
    raise UsageError("the job's arguments hold every delimiter gcloud can use: | # ~ @")


def hourly_rate():
    return (PRICE_L4_S + CPU * PRICE_VCPU_S + int(MEMORY.removesuffix("Gi")) * PRICE_GIB_S) * 3600


def cost_line(ft):
    """The run's estimated time and cost on one L4, from the assumed speed above."""
    if ft.steps < 0:
        return f"Estimated: about ${hourly_rate():.2f} per hour, until the task timeout (--steps -1)"
    window = ft.window or (ft.n_ctx if ft.from_scratch else 1024)
    tokens = ft.batch_size * window * ft.accumulate_gradients * ft.steps
    scale = 1 if ft.from_scratch else MODEL_SCALE[ft.model]
    seconds = tokens * L4_SECONDS_PER_TOKEN_124M * scale + STARTUP_S
    return (f"Estimated: {seconds / 60:.0f} min on one L4 for {ft.steps} steps, about "
            f"${seconds / 3600 * hourly_rate():.2f} at ${hourly_rate():.2f}/h (L4 ${PRICE_L4_S * 3600:.2f} "
            f"+ {CPU} vCPU + {MEMORY}, https://cloud.google.com/run/pricing); the speed is assumed, "
            "the job prints the measured one")


def check_bucket(args):
    """The bucket and the corpus exist (google-cloud-storage: credentials or STORAGE_EMULATOR_HOST);
    return the step of the run already at gs://BUCKET/RUN-NAME (0: none)."""
    from finetune import gcs
    with gcs.cloud_errors(f"cannot read gs://{args.bucket}"):
        bucket = gcs.client().lookup_bucket(args.bucket)
        if bucket is None:
            raise UsageError(f"bucket gs://{args.bucket} does not exist: gcloud storage buckets create "
                             f"gs://{args.bucket} --location={args.region}")
        name, key = gcs.split_url(args.dataset)
        corpus = gcs.client().bucket(name).get_blob(key) if key else None
        if corpus is None:
            raise UsageError(f"{args.dataset} does not exist: upload the corpus first, e.g. "
                             f"gcloud storage cp data/corpus.txt {args.dataset}")
        state = bucket.get_blob(f"{args.run_name}/checkpoint")
        match = re.search(r'model_checkpoint_path: ".*-(\d+)"', state.download_as_text() if state else "")
        return int(match.group(1)) if match else 0


def gcloud(*argv):
    """Run gcloud; its output, or a one-line UsageError naming the fix."""
    result = subprocess.run(["gcloud", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise UsageError(explain(result.stderr, argv))
    return result.stdout


def explain(stderr, argv):
    """One line for a gcloud failure: the fix for the usual ones, else gcloud's last error line."""
    text = stderr.lower()
    project = next((a.split("=", 1)[1] for a in argv if a.startswith("--project=")), "PROJECT")
    region = next((a.split("=", 1)[1] for a in argv if a.startswith("--region=")), "REGION")
    if "quota" in text and ("gpu" in text or "nvidia" in text):
        return (f"project {project} has no Cloud Run L4 GPU quota in {region}: request 'Total Nvidia L4 GPU "
                "allocation without zonal redundancy, per project per region' (Cloud Run Admin API) at "
                f"https://console.cloud.google.com/iam-admin/quotas?project={project}")
    for api in APIS:
        if api in text and ("not been used" in text or "disabled" in text):
            return f"the {APIS[api]} is not enabled in {project}: gcloud services enable {api} --project={project}"
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    last = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "")
    return f"gcloud {' '.join(argv[:3])} failed: {last}"


def check_project(args):
    """gcloud is there, knows a project, and the project has the APIs the job needs."""
    if not shutil.which("gcloud"):
        raise UsageError("gcloud is not installed: https://cloud.google.com/sdk/docs/install "
                         "(or use --dry-run to see the commands)")
    project = args.project or gcloud("config", "get-value", "project").strip()
    if not project or project == "(unset)":
        raise UsageError("no Google Cloud project: pass --project or run gcloud config set project PROJECT")
    enabled = set(gcloud("services", "list", "--enabled", f"--project={project}",
                         "--format=value(config.name)").split())
    for api, name in APIS.items():
        if api not in enabled:
            raise UsageError(f"the {name} is not enabled in {project}: "
                             f"gcloud services enable {api} --project={project}")
    return project


def main(argv=None):
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the job goes on in the cloud; stop it with gcloud run jobs executions cancel",
              file=sys.stderr)
        return 130


def run(args):
    if args.dry_run:
        project = args.project or "PROJECT"  # a dry run needs no gcloud and no account
        try:
            step = check_bucket(args)
        except UsageError as e:
            if "credentials" not in str(e):
                raise
            print(f"(bucket not checked: {e})")
            step = 0
    else:
        step = check_bucket(args)
        project = check_project(args)
    ft = args.finetune
    if ft.until_step is None and ft.steps > 0:
        # A retried task must finish this run, not add --steps again to what its predecessor saved.
        args.job_args += ["--until-step", str(step + ft.steps)]
        if step:
            print(f"gs://{args.bucket}/{args.run_name} is at step {step}: the job continues it to step "
                  f"{step + ft.steps}")
    steps, logs = commands(args, project)
    run_url = f"gs://{args.bucket}/{args.run_name}"
    deploy = ["gcloud", "builds", "submit", f"--project={project}", "--config=cloudbuild.yaml",
              f"--substitutions=_BUCKET={args.bucket},_RUN={args.run_name},_REGION={args.region}"]
    print(cost_line(args.finetune))
    if args.dry_run:
        for argv in steps:
            print(shlex.join(argv))
        print(f"# progress: {shlex.join(logs)}")
        print(f"# the run: {run_url}; deploy it with: {shlex.join(deploy)}")
        return 0
    for argv in steps:
        print(f"$ {shlex.join(argv)}", flush=True)
        if argv[:4] == ["gcloud", "run", "jobs", "execute"] and not args.no_wait:
            execute_and_follow(argv, logs)
        else:
            result = subprocess.run(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            if result.returncode != 0:
                sys.stderr.write(result.stderr)
                raise UsageError(explain(result.stderr, argv[1:]))
    if args.no_wait:
        print(f"Started; follow it with: {shlex.join(logs)}")
    print(f"The run: {run_url}")
    print(f"Deploy it: {shlex.join(deploy)}")
    return 0


def execute_and_follow(execute, logs):
    """Run the execution with --wait while its log streams here (best effort: the log tail needs
    gcloud's beta component; the execution's result decides)."""
    print(f"Streaming the job's log ({shlex.join(logs)}); Ctrl-C stops watching, not the job", flush=True)
    tail = subprocess.Popen(logs, stderr=subprocess.DEVNULL)
    try:
        result = subprocess.run(execute, stderr=subprocess.PIPE, text=True)
    finally:
        tail.terminate()
        tail.wait()
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise UsageError(explain(result.stderr, execute[1:]))


if __name__ == "__main__":
    sys.exit(main())

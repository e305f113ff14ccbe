"""`python -m data.extract` against a real BigQuery emulator (bqemulator, started here) and a real
Cloud Storage emulator (the storage_emulator fixture): the exact corpus for seeded rows, each bad
input as a one-line error that leaves the previous corpus alone, and the --gcs-out upload.

bqemulator has no cost model (dry runs report 0 bytes, maximum_bytes_billed is not enforced), so the
cost guard's decision and the job settings are checked as functions (test_cost_guard, test_job_config).
"""
import gzip
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data import extract
from data.emulator import Emulator

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "test-project"
WILDCARD = f"{PROJECT}.reddit_comments.2019_*"
AITA = "AmItheAsshole"


def row(body, author="someone", subreddit=AITA):
    return {"id": "x", "author": author, "subreddit": subreddit, "body": body, "score": 1, "created_utc": 0}


# One row per rule, in the order the emulator returns them (table by table, insertion order).
TABLES = {
    "2018_12": [row("YTA, but this month is outside the 2019_* wildcard.")],
    "2019_01": [
        row("YTA, you should apologize."),
        row("yta. Lowercase still counts."),                            # case-insensitive match
        row("NTA, this one is not a YTA verdict... wait, it is."),      # matches too: \bYTA\b anywhere
        row("NTA, you are fine."),                                      # no match
        row("This is so playtable, honestly."),                         # "yta" inside a word: no \b match
        row("YTA or NTA? Vote below.", author="AutoModerator"),         # bot
        row("YTA from an account that is gone.", author="[deleted]"),   # deleted author
        row("YTA, but wrong subreddit.", subreddit="AskReddit"),        # other subreddit
        row("YTA &amp; your &quot;jokes&quot; aren&#39;t funny &gt;:( &hellip; &#x1F600;"),  # entities
        row("YTA\ufffd for sure."),                                     # U+FFFD
        row("YTA."),                                                    # too short for --min-length 5
        row("   YTA, padded with spaces.   "),
        row("YTA.\n\nSecond paragraph stays."),
        row("YTA in a lowercase subreddit name.", subreddit="amitheasshole"),
    ],
    "2019_02": [
        row("YTA, you should apologize."),                              # exact duplicate of 2019_01's
        row("YTA &amp; you should apologize."),                         # not a duplicate once unescaped
        row("[deleted]"),
        row("[removed]"),
        row("Honestly YTA here."),
    ],
}

EXPECTED_YTA = [
    "YTA, you should apologize.",
    "yta. Lowercase still counts.",
    "NTA, this one is not a YTA verdict... wait, it is.",
    "YTA & your \"jokes\" aren't funny >:( \u2026 \U0001F600",
    "YTA for sure.",
    "YTA, padded with spaces.",
    "YTA.\n\nSecond paragraph stays.",
    "YTA in a lowercase subreddit name.",
    "YTA & you should apologize.",
    "Honestly YTA here.",
]


@pytest.fixture(scope="module")
def bigquery(tmp_path_factory):
    """The emulator with the seeded test tables and the bundled sample (fh-bigquery.reddit_comments.*)."""
    log = tmp_path_factory.mktemp("bqemulator") / "emulator.log"
    with Emulator(log_path=log) as emulator:
        for name, rows in TABLES.items():
            emulator.create_table(f"{PROJECT}.reddit_comments.{name}", rows)
        emulator.load_sample()
        yield emulator


def run_extract(*args, env=None, timeout=120):
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("BIGQUERY_EMULATOR_HOST", "STORAGE_EMULATOR_HOST")}
    environment.update(env or {})
    environment = {k: v for k, v in environment.items() if v is not None}  # None: unset it
    return subprocess.run([sys.executable, "-m", "data.extract", "--quiet", *map(str, args)],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)


def figures(stdout):
    """The summary's 'label   1,234' lines as {label: 1234}."""
    return {m[1].strip(): int(m[2].replace(",", "")) for m in re.finditer(r"^(\D+?)\s+([\d,]+)\b", stdout, re.M)}


def gpt2_corpus(texts):
    return "".join(f"<|startoftext|>{t}<|endoftext|>\n" for t in texts)


def test_yta_corpus_exact(bigquery, tmp_path):
    out = tmp_path / "corpus.txt"
    result = run_extract("--endpoint", bigquery.url, "--table", WILDCARD, "--subreddit", AITA,
                         "--match", r"(?i)\bYTA\b", "--min-length", "5", "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == gpt2_corpus(EXPECTED_YTA)
    counts = figures(result.stdout)
    # 12 rows pass the query (subreddit, regex, authors); cleaning drops 1 short and 1 duplicate
    assert counts["rows read"] == 12
    assert counts["dropped: too short"] == 1
    assert counts["dropped: duplicate"] == 1
    assert counts["dropped: deleted/removed"] == 0
    assert counts["kept"] == len(EXPECTED_YTA)
    assert counts["cleaned: entities"] == 2
    assert counts["cleaned: U+FFFD"] == 1
    assert counts["characters"] == sum(map(len, EXPECTED_YTA))
    assert counts["approx. tokens"] == sum(map(len, EXPECTED_YTA)) // 4
    assert "dry run: the query will scan" in result.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o644"


def test_plain_format_deleted_bodies_and_default_authors(bigquery, tmp_path):
    out = tmp_path / "plain.txt"
    result = run_extract("--endpoint", bigquery.url, "--table", f"{PROJECT}.reddit_comments.2019_02",
                         "--format", "plain", "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == (
        "YTA, you should apologize.\n\nYTA & you should apologize.\n\nHonestly YTA here.\n\n")
    counts = figures(result.stdout)
    assert (counts["rows read"], counts["dropped: deleted/removed"], counts["kept"]) == (5, 2, 3)


def test_exclude_author_replaces_defaults_and_limit(bigquery, tmp_path):
    out = tmp_path / "corpus.txt"
    result = run_extract("--endpoint", bigquery.url, "--table", f"{PROJECT}.reddit_comments.2019_01",
                         "--exclude-author", "nobody", "--match", "(?i)vote below|gone", "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == gpt2_corpus(
        ["YTA or NTA? Vote below.", "YTA from an account that is gone."])
    result = run_extract("--endpoint", bigquery.url, "--table", WILDCARD, "--limit", "3", "--out", out)
    assert result.returncode == 0, result.stderr
    assert figures(result.stdout)["rows read"] == 3
    assert out.read_text(encoding="utf-8") == gpt2_corpus(
        ["YTA, you should apologize.", "yta. Lowercase still counts.",
         "NTA, this one is not a YTA verdict... wait, it is."])


def test_emulator_host_variable(bigquery, tmp_path):
    out = tmp_path / "corpus.txt"
    host = bigquery.url.removeprefix("http://")  # the variable is usually host:port
    result = run_extract("--table", f"{PROJECT}.reddit_comments.2019_02", "--match", "Honestly",
                         "--out", out, env={"BIGQUERY_EMULATOR_HOST": host})
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == gpt2_corpus(["Honestly YTA here."])


def test_bundled_sample_matches_a_python_reading(bigquery, tmp_path):
    """The demo's extraction over the bundled sample equals the same rules applied here in Python."""
    expected, seen = [], set()
    with gzip.open(ROOT / "data" / "sample" / "comments.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if (r["table"].startswith("2019_") and r["subreddit"].lower() == "amitheasshole"
                    and re.search(r"(?i)\bYTA\b", r["body"]) and r["author"] not in ("AutoModerator", "[deleted]")
                    and r["body"] not in ("[deleted]", "[removed]")):
                text = html.unescape(r["body"]).replace("\ufffd", "").strip()
                if text and text not in seen:
                    seen.add(text)
                    expected.append(text)
    out = tmp_path / "corpus.txt"
    result = run_extract("--endpoint", bigquery.url, "--subreddit", AITA, "--match", r"(?i)\bYTA\b", "--out", out)
    assert result.returncode == 0, result.stderr
    assert len(expected) > 1000
    assert out.read_text(encoding="utf-8") == gpt2_corpus(expected)


PREVIOUS = "<|startoftext|>the previous corpus<|endoftext|>\n"


def closed_port():
    from data.emulator import free_port
    return free_port()  # bound and released: nothing listens there


BAD_INPUTS = {
    "no rows matched": (["--match", "zzz-no-such-text"], {}, 1, "no rows matched"),
    "invalid regex": (["--match", "(?i)(YTA"], {}, 1, "missing )"),
    "missing table": (["--table", f"{PROJECT}.reddit_comments.2030_01"], {}, 1, "not found"),
    "missing dataset": (["--table", f"{PROJECT}.no_such_dataset.2019_01"], {}, 1, "not found"),
    "invalid table name": (["--table", f"{PROJECT}.reddit_comments.x` WHERE 1=1; --"], {}, 2, "not a table name"),
    "two-part table name": (["--table", "reddit_comments.2019_01"], {}, 2, "not a table name"),
    "all rows cleaned away": (["--min-length", "100000"], {}, 1, "dropped by the cleaning rules"),
    "bad --limit": (["--limit", "0"], {}, 2, "--limit"),
    "bad --gcs-out": (["--gcs-out", "s3://bucket/x"], {}, 2, "--gcs-out"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_one_line_error_previous_corpus_untouched(case, bigquery, tmp_path):
    args, env, code, message = BAD_INPUTS[case]
    out = tmp_path / "corpus.txt"
    out.write_text(PREVIOUS, encoding="utf-8")
    result = run_extract("--endpoint", bigquery.url, "--table", WILDCARD, *args, "--out", out, env=env)
    assert_refused(result, code, message, out)


def assert_refused(result, code, message, out):
    assert result.returncode == code, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert out.read_text(encoding="utf-8") == PREVIOUS
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary file left behind


def test_network_error(tmp_path):
    out = tmp_path / "corpus.txt"
    out.write_text(PREVIOUS, encoding="utf-8")
    result = run_extract("--endpoint", f"http://127.0.0.1:{closed_port()}", "--timeout", "2", "--out", out)
    assert_refused(result, 1, "Connection refused", out)


def test_no_credentials(tmp_path):
    out = tmp_path / "out" / "corpus.txt"
    out.parent.mkdir()
    out.write_text(PREVIOUS, encoding="utf-8")
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "CLOUDSDK_CONFIG": str(home / "gcloud"), "GOOGLE_APPLICATION_CREDENTIALS": None,
           "NO_GCE_CHECK": "True"}  # no metadata server probe: this is not a Google Cloud machine
    result = run_extract("--out", out, env=env)
    assert_refused(result, 1, "no Google Cloud credentials", out)


def test_gcs_out(bigquery, storage_emulator, tmp_path, monkeypatch):
    from google.cloud import storage
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", storage_emulator)
    bucket = storage.Client(project=PROJECT).create_bucket("corpora")
    out = tmp_path / "corpus.txt"
    result = run_extract("--endpoint", bigquery.url, "--table", f"{PROJECT}.reddit_comments.2019_02",
                         "--out", out, "--gcs-out", "gs://corpora/aita/corpus.txt",
                         env={"STORAGE_EMULATOR_HOST": storage_emulator})
    assert result.returncode == 0, result.stderr
    assert "uploaded it to gs://corpora/aita/corpus.txt" in result.stdout
    assert bucket.blob("aita/corpus.txt").download_as_bytes() == out.read_bytes()
    assert out.read_text(encoding="utf-8") == gpt2_corpus(
        ["YTA, you should apologize.", "YTA & you should apologize.", "Honestly YTA here."])

    out.write_text(PREVIOUS, encoding="utf-8")
    result = run_extract("--endpoint", bigquery.url, "--table", f"{PROJECT}.reddit_comments.2019_02",
                         "--out", out, "--gcs-out", "gs://no-such-bucket/corpus.txt",
                         env={"STORAGE_EMULATOR_HOST": storage_emulator})
    assert_refused(result, 1, "bucket gs://no-such-bucket does not exist", out)


def test_cost_guard():
    assert "0.500 GB" in extract.check_cost(500_000_000, 10)
    assert "10.000 GB" in extract.check_cost(10 * 10**9, 10)  # the limit itself is allowed
    with pytest.raises(extract.UsageError, match=r"would scan 10.00 GB, more than --max-gb 10"):
        extract.check_cost(10 * 10**9 + 1, 10)


def test_job_config_parameters_and_bytes_cap():
    args = extract.parse_args(["--subreddit", "AmItheAsshole", "--match", r"(?i)\bYTA\b", "--max-gb", "2.5"])
    config = extract.job_config(args)
    assert config.maximum_bytes_billed == 2_500_000_000
    params = {p.name: p.to_api_repr()["parameterValue"] for p in config.query_parameters}
    assert params["subreddit"] == {"value": "AmItheAsshole"}
    assert params["match"] == {"value": r"(?i)\bYTA\b"}
    assert params["exclude_authors"] == {"arrayValues": [{"value": "AutoModerator"}, {"value": "[deleted]"}]}
    assert extract.job_config(args, dry_run=True).dry_run
    # user values never reach the SQL text; only the checked table name does
    sql = extract.query_text(args.table)
    assert "`fh-bigquery.reddit_comments.2019_*`" in sql and "AmItheAsshole" not in sql and "YTA" not in sql


@pytest.mark.parametrize("name,ok", [
    ("fh-bigquery.reddit_comments.2019_*", True),
    ("fh-bigquery.reddit_comments.2019_08", True),
    ("my-project-123.dataset_1.*", True),
    ("fh-bigquery.reddit_comments.2019_**", False),
    ("fh-bigquery.reddit_comments.20*19", False),
    ("Fh-bigquery.reddit_comments.2019_01", False),
    ("fh-bigquery.reddit_comments", False),
    ("fh-bigquery.reddit-comments.2019_01", False),
    ("fh-bigquery.reddit_comments.2019_01`", False),
    ("fh-bigquery.reddit_comments.2019_01 --", False),
    ("fh-bigquery.reddit_comments.2019_01\n", False),
])
def test_table_pattern(name, ok):
    assert bool(extract.TABLE_PATTERN.fullmatch(name)) is ok


def test_emulator_port_in_use_is_one_line_error():
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "data.emulator", "--port", str(port)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == f"error: port {port} is in use; choose another\n"


def test_demo_refuses_the_repository_as_its_folder():
    from data.emulator import free_port
    result = subprocess.run([sys.executable, "scripts/demo.py", "--dir", ".", "--port", str(free_port())], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == "demo: --dir must not be the repository itself; the default is .demo\n"


def test_demo_end_to_end_then_ctrl_c(tmp_path):
    """scripts/demo.py (what `make demo` runs) with a short training: it serves the page and the API,
    and Ctrl-C to its process group, as a terminal sends it, stops every process it started."""
    import signal
    import time
    import urllib.request

    import psutil

    from data.emulator import free_port

    port = free_port()
    log = (tmp_path / "demo.log").open("w+")
    demo = subprocess.Popen([sys.executable, "scripts/demo.py", "--steps", "5", "--port", str(port),
                             "--dir", str(tmp_path / "demo")], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops the server." not in (tmp_path / "demo.log").read_text():
            assert demo.poll() is None and time.monotonic() < deadline, (tmp_path / "demo.log").read_text()
            time.sleep(0.5)
        output = (tmp_path / "demo.log").read_text()
        for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "Ready in"):
            assert stage in output
        assert (tmp_path / "demo" / "corpus.txt").read_text().startswith("<|startoftext|>")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui/", timeout=10) as r:
            assert r.status == 200 and "text/html" in r.headers["Content-Type"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/?length=5&seed=1", timeout=30) as r:
            assert isinstance(json.load(r)["text"], str)
        children = psutil.Process(demo.pid).children(recursive=True)
        assert children  # the server, at least
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(timeout=30) == 130
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        log.close()

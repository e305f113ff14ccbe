"""`python -m data.load` on dump files made here the way the archives are (make_sample.write_dump:
zstandard with a 2 GiB window, which a default decoder refuses), into a real BigQuery emulator (bqemulator): the exact rows, the
per-rule counts of bad lines, re-loading adds nothing, a corrupt, truncated or interrupted file leaves
the table as it was, and --staging through a real Cloud Storage emulator whose files bqemulator reads.
"""
import json
import os
import signal
import socket
import subprocess
import tempfile
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import zstandard

from data import load
from data.emulator import Emulator, free_port
from data.sample.make_sample import write_dump

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "load-project"
AITA = "AmItheAsshole"


def comment(i, body, subreddit=AITA, created=1546300800, **extra):
    return {"id": f"c{i}", "subreddit": subreddit, "author": f"user{i}", "body": body, "score": i,
            "created_utc": created, "link_id": "t3_p1", "parent_id": "t3_p1", **extra}


def ts(seconds):
    return datetime.fromtimestamp(seconds, timezone.utc)


GOOD_COMMENTS = [
    comment(1, "YTA, plain ASCII."),
    comment(2, "NTA caf\u00e9 \u20ac \U0001F600 \u4f60\u597d", created="1548979200"),  # created_utc as a string
    comment(3, "[deleted]", author="[deleted]"),                                           # kept: extract drops it
    comment(4, "[removed]", subreddit="AskReddit", created=1551398400.5),
    comment(5, "Unknown fields are ignored.", gildings={"gid_1": 1}, edited=False, all_awardings=[]),
]
BAD_LINES = [
    "{not json",
    b"\xff\xfe not UTF-8\n",
    "[1, 2, 3]",
    json.dumps({k: v for k, v in comment(6, "no author").items() if k != "author"}),
    json.dumps(comment(7, "score as text", score="12")),
    json.dumps(comment(8, "a date", created="yesterday")),
    json.dumps(comment(9, "a boolean score", score=True)),
]
EXPECTED_COMMENTS = [  # as stored: created_utc a TIMESTAMP, the subreddit_key added (lower case)
    ("c1", AITA, "user1", "YTA, plain ASCII.", 1, ts(1546300800), "t3_p1", "t3_p1", "amitheasshole"),
    ("c2", AITA, "user2", "NTA caf\u00e9 \u20ac \U0001F600 \u4f60\u597d", 2, ts(1548979200), "t3_p1", "t3_p1",
     "amitheasshole"),
    ("c3", AITA, "[deleted]", "[deleted]", 3, ts(1546300800), "t3_p1", "t3_p1", "amitheasshole"),
    ("c4", "AskReddit", "user4", "[removed]", 4, ts(1551398400.5), "t3_p1", "t3_p1", "askreddit"),
    ("c5", AITA, "user5", "Unknown fields are ignored.", 5, ts(1546300800), "t3_p1", "t3_p1", "amitheasshole"),
]


@pytest.fixture(scope="module")
def storage_dir(tmp_path_factory):
    """gcp-storage-emulator storing objects as files under storage_dir/gcs/BUCKET/OBJECT, the layout
    bqemulator reads gs:// URIs from (BQEMU_GCS_LOCAL_ROOT); yields (url, storage_dir / "gcs")."""
    base = tmp_path_factory.mktemp("gcs")
    port = free_port()
    log = (base / "storage.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=base, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "STORAGE_BASE": str(base), "STORAGE_DIR": "gcs"})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (base / "storage.log").read_text()
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", base / "gcs"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def bigquery(tmp_path_factory, storage_dir):
    root = storage_dir[1]
    root.mkdir(exist_ok=True)
    with Emulator(log_path=tmp_path_factory.mktemp("bqemulator") / "emulator.log", gcs_root=root) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def comments_file(tmp_path_factory):
    lines = [json.dumps(c, ensure_ascii=False) for c in GOOD_COMMENTS[:2]] + BAD_LINES \
        + [json.dumps(c, ensure_ascii=False) for c in GOOD_COMMENTS[2:]]
    # eight frames cut at byte positions: some cut inside a line, one inside a multi-byte character
    return write_dump(tmp_path_factory.mktemp("dumps") / "AmItheAsshole_comments.zst", lines, frames=8)


def run_load(*args, env=None, timeout=120):
    env = {**{k: v for k, v in os.environ.items() if k != "BIGQUERY_EMULATOR_HOST"}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "data.load", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def figures(stdout):
    return {label.strip(): int(number.replace(",", "")) for label, number in
            (line.rsplit(None, 1) for line in stdout.splitlines() if line.startswith("  "))}


def rows(bigquery, table, columns="*"):
    result = bigquery.client(PROJECT).query(f"SELECT {columns} FROM `{table}` ORDER BY id").result()
    return [tuple(row.values()) for row in result]


def tables(bigquery, dataset):
    return sorted(t.table_id for t in bigquery.client(PROJECT).list_tables(f"{PROJECT}.{dataset}"))


def test_test_files_need_the_long_window(comments_file):
    with pytest.raises(zstandard.ZstdError, match="too much memory"):
        zstandard.ZstdDecompressor().stream_reader(comments_file.open("rb")).read(100)
    frames = zstandard.get_frame_parameters(comments_file.read_bytes())
    assert frames.window_size == 2**31


def test_lines_survive_every_read_boundary(comments_file, monkeypatch):
    """Reading 5 compressed bytes at a time puts a read boundary inside every character and frame."""
    expected = list(load.dump_lines(comments_file))
    monkeypatch.setattr(load, "READ_SIZE", 5)
    assert list(load.dump_lines(comments_file)) == expected
    assert expected[1] == json.dumps(GOOD_COMMENTS[1], ensure_ascii=False).encode("utf-8")
    assert len(expected) == len(GOOD_COMMENTS) + len(BAD_LINES)


def test_load_comments_exact_rows_partitioned_table_and_reload(bigquery, comments_file):
    table = f"{PROJECT}.reddit.comments"
    result = run_load(comments_file, "--table", table, "--endpoint", bigquery.url)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.splitlines()[0] == f"{comments_file}: comments"
    assert f"{comments_file.name}: 100%" in result.stderr and "5 rows kept" in result.stderr  # the progress bar
    assert figures(result.stdout) == {
        "lines": 12, "bad: too long": 0, "bad: not JSON": 2, "bad: not an object": 1, "bad: missing field": 1,
        "bad: wrong type": 3, "repaired: lone surrogates": 0, "skipped: other subreddits": 0, "staged": 5,
        "added to the table": 5, "already there or repeated": 0}
    assert rows(bigquery, table) == EXPECTED_COMMENTS
    created = bigquery.client(PROJECT).get_table(table)
    assert (created.time_partitioning.type_, created.time_partitioning.field) == ("MONTH", "created_utc")
    assert created.clustering_fields == ["subreddit_key"]

    again = run_load(comments_file, "--table", table, "--endpoint", bigquery.url, "--quiet")
    assert again.returncode == 0, again.stderr
    assert figures(again.stdout)["added to the table"] == 0
    assert figures(again.stdout)["already there or repeated"] == 5
    assert rows(bigquery, table) == EXPECTED_COMMENTS
    assert tables(bigquery, "reddit") == ["comments"]  # no staging table left behind


POSTS = [
    {"id": "p1", "subreddit": "AmItheAsshole", "author": "op1", "title": "AITA for skipping the wedding?",
     "selftext": "It was my sister's.", "score": 120, "num_comments": 45, "over_18": False, "created_utc": 1546300800},
    {"id": "p2", "subreddit": "amitheasshole", "author": "op2", "title": "WIBTA if I sold the car?",
     "selftext": "", "score": 7, "created_utc": "1546387200"},                         # no num_comments, over_18
    {"id": "p3", "subreddit": "AskReddit", "author": "op3", "title": "What is your favourite soup?",
     "selftext": "", "score": 3000, "num_comments": 900, "over_18": False, "created_utc": 1546473600},
    {"id": "p1", "subreddit": "AmItheAsshole", "author": "op1", "title": "AITA for skipping the wedding?",
     "selftext": "It was my sister's.", "score": 120, "num_comments": 45, "over_18": False, "created_utc": 1546300800},
]


def test_load_posts_one_subreddit_repeated_line_staging_in_cloud_storage(bigquery, storage_dir, tmp_path,
                                                                          monkeypatch):
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", storage_dir[0])  # for us and for data.load
    storage.Client(project=PROJECT).create_bucket("staging-bucket")
    dump = write_dump(tmp_path / "RS_2019-01.zst", [json.dumps(p) for p in POSTS])
    table = f"{PROJECT}.reddit.posts"
    result = run_load(dump, "--table", table, "--endpoint", bigquery.url, "--subreddit", "AMITHEASSHOLE",
                      "--staging", "gs://staging-bucket/reddit/load", "--chunk-mb", "0.0002")
    assert result.returncode == 0, result.stderr
    assert figures(result.stdout)["skipped: other subreddits"] == 1
    assert figures(result.stdout)["staged"] == 3
    assert figures(result.stdout)["added to the table"] == 2  # p1 appears twice in the file
    assert rows(bigquery, table) == [
        ("p1", AITA, "op1", "AITA for skipping the wedding?", "It was my sister's.", 120, 45, False, ts(1546300800),
         "amitheasshole"),
        ("p2", "amitheasshole", "op2", "WIBTA if I sold the car?", "", 7, None, None, ts(1546387200),
         "amitheasshole"),  # missing num_comments, over_18: null
    ]
    # three chunks were uploaded, read by one load job, then deleted
    uploads = [line for line in result.stderr.splitlines() if "staged chunk" in line]
    assert len(uploads) == 3 and all(" MB): gs://staging-bucket/reddit/load/" in line for line in uploads), uploads
    assert list(storage.Client(project=PROJECT).list_blobs("staging-bucket")) == []


def test_detected_kind_must_fit_the_table(bigquery, comments_file, tmp_path):
    table = f"{PROJECT}.kinds.posts"
    dump = write_dump(tmp_path / "RS.zst", [json.dumps(POSTS[0])])
    host = bigquery.url.removeprefix("http://")  # the variable is usually host:port
    assert run_load(dump, "--table", table, "--quiet", env={"BIGQUERY_EMULATOR_HOST": host}).returncode == 0
    result = run_load(comments_file, "--table", table, "--endpoint", bigquery.url, "--quiet")
    assert result.returncode == 1
    assert result.stderr == (f"error: {table} exists without the comments columns body, link_id, parent_id; "
                             "load comments into another table\n")


def broken_files(tmp_path, comments_file):
    whole = comments_file.read_bytes()
    (tmp_path / "truncated.zst").write_bytes(whole[:len(whole) - 40])
    (tmp_path / "plain.jsonl").write_text(json.dumps(GOOD_COMMENTS[0]) + "\n")
    (tmp_path / "RC.zst.gz").write_bytes(b"\x1f\x8b\x08" + whole[3:])
    return len(whole) - 40


def test_not_zstd_or_truncated_one_line_table_unchanged(bigquery, comments_file, tmp_path):
    table = f"{PROJECT}.broken.comments"
    good = write_dump(tmp_path / "good.zst", [json.dumps(comment(100, "before"))])
    assert run_load(good, "--table", table, "--endpoint", bigquery.url, "--quiet").returncode == 0
    size = broken_files(tmp_path, comments_file)
    cases = {
        "truncated.zst": f"error: {tmp_path}/truncated.zst: truncated: the file ends at byte {size:,} inside a "
                         f"zstd frame (download it again); nothing from {tmp_path}/truncated.zst was loaded\n",
        "plain.jsonl": f"error: {tmp_path}/plain.jsonl: not a zstandard file (byte 0 is not a zstd frame; dump files "
                       f"end in .zst); nothing from {tmp_path}/plain.jsonl was loaded\n",
        "RC.zst.gz": f"error: {tmp_path}/RC.zst.gz: not a zstandard file (byte 0 is not a zstd frame; dump files "
                     f"end in .zst); nothing from {tmp_path}/RC.zst.gz was loaded\n",
    }
    for name, message in cases.items():
        result = run_load(tmp_path / name, "--table", table, "--endpoint", bigquery.url, "--quiet")
        assert (result.returncode, result.stderr) == (1, message)
        assert rows(bigquery, table, "id") == [("c100",)]
    assert tables(bigquery, "broken") == ["comments"]
    result = run_load(tmp_path / "truncated.zst", "--table", f"{PROJECT}.broken.new", "--endpoint", bigquery.url,
                      "--quiet")
    assert result.returncode == 1
    assert tables(bigquery, "broken") == ["comments"]  # no table made for a file that failed


def test_corrupt_frame_names_the_byte_range(tmp_path):
    data = bytearray(write_dump(tmp_path / "x.zst", [json.dumps(comment(i, "x" * i)) for i in range(200)]).read_bytes())
    data[40:60] = b"\x00" * 20
    (tmp_path / "corrupt.zst").write_bytes(bytes(data))
    with pytest.raises(load.UsageError, match=r"corrupt.zst: corrupt zstandard data between bytes 0 and 65,536"):
        list(load.dump_lines(tmp_path / "corrupt.zst"))


def test_ctrl_c_leaves_the_table_as_before(bigquery, tmp_path):
    table = f"{PROJECT}.interrupted.comments"
    first = write_dump(tmp_path / "first.zst", [json.dumps(comment(i, "first")) for i in range(3)])
    assert run_load(first, "--table", table, "--endpoint", bigquery.url, "--quiet").returncode == 0
    big = write_dump(tmp_path / "big.zst", [json.dumps(comment(1000 + i, f"comment {i} " * 5)) for i in range(20000)])
    env = {k: v for k, v in os.environ.items() if k != "BIGQUERY_EMULATOR_HOST"}
    log = tmp_path / "load.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "data.load", str(big), "--table", table, "--endpoint",
                                 bigquery.url, "--chunk-mb", "0.05"], cwd=ROOT, env=env, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 60
            while "staged chunk 3" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert text.rstrip().endswith(f"interrupted; {table} is as it was before the file being loaded"), text
    assert "Traceback" not in text
    assert rows(bigquery, table, "id") == [("c0",), ("c1",), ("c2",)]
    assert tables(bigquery, "interrupted") == ["comments"]  # the staging table was dropped


@pytest.mark.parametrize("args,message", [
    (["--table", f"{PROJECT}.reddit.comments_*"], "load into one table, not a wildcard"),
    (["--table", "reddit.comments"], "is not a table name"),
    (["--table", f"{PROJECT}.reddit.comments", "--subreddit", ""], "--subreddit: must not be empty"),
    (["--table", f"{PROJECT}.reddit.comments", "--kind", "videos"], "invalid choice: 'videos'"),
    (["--table", f"{PROJECT}.reddit.comments", "--staging", "s3://b/p"], "not a Cloud Storage object URL"),
])
def test_bad_arguments_one_line(args, message, comments_file):
    result = run_load(comments_file, *args)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


def test_unreachable_bigquery_one_line(comments_file):
    result = run_load(comments_file, "--table", f"{PROJECT}.reddit.comments", "--endpoint",
                      f"http://127.0.0.1:{free_port()}", "--timeout", "2")
    assert result.returncode == 1
    assert result.stderr.startswith("error: BigQuery: cannot reach http://127.0.0.1:") and "Connection refused" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_missing_file_one_line(tmp_path):
    result = run_load(tmp_path / "RC_2019-01.zst", "--table", f"{PROJECT}.reddit.comments")
    assert result.returncode == 2
    assert result.stderr == (f"python -m data.load: error: {tmp_path}/RC_2019-01.zst: no such file (see --help)\n")


# ---------------------------------------------------------------- hostile files


def write_runs(path, parts, window_log=20):
    """A dump file from parts: bytes, or (byte, count) for a run written in pieces (a 256 MB run of
    newlines compresses to a few KB). A small window keeps the decoder's own memory out of the peaks."""
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=window_log)
    with open(path, "wb") as f, zstandard.ZstdCompressor(compression_params=params).stream_writer(f) as out:
        for part in parts:
            if isinstance(part, tuple):
                byte, count = part
                for start in range(0, count, 1 << 20):
                    out.write(byte * min(1 << 20, count - start))
            else:
                out.write(part)
    return path


def line(record, **dump_options):
    return (json.dumps(record, **dump_options) + "\n").encode("utf-8")


def load_with_peak(*args):
    """Run data.load; return (exit status, stdout, stderr, peak resident MB). The peak is the child's
    VmHWM, read until it exits: its ru_maxrss would include this process's memory at the fork."""
    with open(os.devnull, "w") as null, tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        env = {k: v for k, v in os.environ.items() if k != "BIGQUERY_EMULATOR_HOST"}
        proc = subprocess.Popen([sys.executable, "-m", "data.load", *map(str, args), "--quiet"], cwd=ROOT, env=env,
                                stdin=null, stdout=out, stderr=err)
        peak, deadline = 0, time.monotonic() + 120
        while proc.poll() is None:
            assert time.monotonic() < deadline, "data.load did not finish in 2 minutes"
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = max(peak, int(status.split("VmHWM:")[1].split()[0]) / 1024)
            except (OSError, IndexError):  # exiting: its memory is gone already
                pass
            time.sleep(0.005)
        out.seek(0), err.seek(0)
        return proc.returncode, out.read(), err.read(), peak


def test_hostile_file_in_bounded_memory(bigquery, tmp_path):
    """256 MiB of empty lines and a 200 MB line (of letters, over the 10 MB limit) cost a few MB; a line
    just under the limit (UCS-4 text with a lone surrogate: the costliest to parse and write) loads
    within the stated bound of about 200 MB over a small file's peak."""
    table = f"{PROJECT}.hostile.comments"
    small = write_runs(tmp_path / "small.zst", [line(comment(1, "small"))])
    status, _, stderr, baseline = load_with_peak(small, "--table", table, "--endpoint", bigquery.url)
    assert status == 0, stderr

    hostile = write_runs(tmp_path / "hostile.zst", [
        line(comment(2, "before")), (b"\n", 256 << 20), (b"a", 200 * 10**6), b"\n",
        (b"b", load.MAX_LINE + 1), b"\n", (b"c", load.MAX_LINE), b"\n", line(comment(3, "after"))])
    assert hostile.stat().st_size < 40_000
    status, stdout, stderr, peak = load_with_peak(hostile, "--table", table, "--endpoint", bigquery.url)
    assert (status, stderr) == (0, "")
    counts = figures(stdout)
    assert (counts["lines"], counts["bad: too long"], counts["bad: not JSON"], counts["staged"]) == (5, 2, 1, 2)
    assert peak - baseline < 40, f"{peak:.0f} MB against {baseline:.0f} MB for a small file"  # measured: +21 MB

    body = "y" * (load.MAX_LINE - 200_000) + "\U0001F600\ud83d"
    longest = write_runs(tmp_path / "longest.zst", [line(comment(4, body))])
    status, stdout, stderr, peak = load_with_peak(longest, "--table", table, "--endpoint", bigquery.url)
    assert (status, stderr) == (0, "")
    assert figures(stdout)["repaired: lone surrogates"] == 1
    assert peak - baseline < 250, f"{peak:.0f} MB against {baseline:.0f} MB for a small file"  # measured: +176 MB
    assert rows(bigquery, table, "id, LENGTH(body)") == [("c1", 5), ("c2", 6), ("c3", 5), ("c4", len(body))]


def test_a_long_line_takes_linear_time(tmp_path):
    """Four times the line, about four times the time (it was quadratic: 50 MB 9.7 s, 200 MB 180 s)."""
    files = {size: write_runs(tmp_path / f"{size}.zst", [(b"a", size), b"\n", line(comment(1, "x"))])
             for size in (50 * 10**6, 200 * 10**6)}
    best = dict.fromkeys(files, float("inf"))
    for _ in range(3):  # interleaved, the best of three: the machine is shared
        for size, path in files.items():
            began = time.perf_counter()
            assert len(list(load.dump_lines(path))) == 2
            best[size] = min(best[size], time.perf_counter() - began)
    ratio = best[200 * 10**6] / best[50 * 10**6]
    assert ratio < 6, f"{best}: {ratio:.1f}x for a line 4x longer"


def test_odd_lines_are_bad_lines_or_repaired_never_a_traceback(bigquery, tmp_path):
    cut_emoji = json.dumps(comment(1, "a cut emoji \ud83d"))  # ensure_ascii: the escape "\ud83d", as dumps hold it
    assert "\\ud83d" in cut_emoji
    dump = write_dump(tmp_path / "odd.zst", [
        cut_emoji,
        json.dumps(comment(2, "a whole emoji \U0001F600 escaped")),
        '{"id": "c3", "nested": ' + "[" * 1000 + "]" * 1000 + "}",
        json.dumps(comment(4, "digits", created="1546300800")),
        json.dumps(comment(5, "underscores", created="1_546_300_800")),
        json.dumps(comment(6, "Arabic-Indic digits", created="".join(chr(0x660 + int(d)) for d in "1546300800"))),
        json.dumps(comment(7, "padded", created=" 1546300800")),
        json.dumps(comment(8, "a sign", created="+1546300800")),
        json.dumps(comment(9, "a fraction as text", created="1546300800.5")),
    ])
    table = f"{PROJECT}.odd.comments"
    result = run_load(dump, "--table", table, "--endpoint", bigquery.url, "--quiet")
    assert (result.returncode, result.stderr) == (0, "")
    counts = figures(result.stdout)
    assert (counts["lines"], counts["bad: not JSON"], counts["bad: wrong type"], counts["repaired: lone surrogates"],
            counts["staged"]) == (9, 1, 5, 1, 3)
    assert rows(bigquery, table, "id, body, created_utc") == [
        ("c1", "a cut emoji \ufffd", ts(1546300800)), ("c2", "a whole emoji \U0001F600 escaped", ts(1546300800)),
        ("c4", "digits", ts(1546300800))]


def test_duplicate_ids_across_files_the_first_loaded_wins(bigquery, tmp_path):
    """Edited or re-scraped records: the same id with another created_utc and body, the second file's
    months apart from the first's (the MERGE looked only at the new file's months)."""
    first = write_dump(tmp_path / "RC_2019-01.zst", [
        json.dumps(comment(1, "original")), json.dumps(comment(2, "original"))])
    second = write_dump(tmp_path / "RC_2019-03.zst", [
        json.dumps(comment(1, "edited", created=1551398400)),
        json.dumps(comment(3, "first line of c3", created=1551398400)),
        json.dumps(comment(2, "re-scraped", created=1554076800)),
        json.dumps(comment(3, "second line of c3", created=1551398401))])
    table = f"{PROJECT}.duplicates.comments"
    result = run_load(first, second, "--table", table, "--endpoint", bigquery.url, "--quiet")
    assert (result.returncode, result.stderr) == (0, "")
    expected = [("c1", "original", ts(1546300800)), ("c2", "original", ts(1546300800)),
                ("c3", "first line of c3", ts(1551398400))]
    assert rows(bigquery, table, "id, body, created_utc") == expected
    again = run_load(second, first, "--table", table, "--endpoint", bigquery.url, "--quiet")
    assert again.returncode == 0, again.stderr
    assert rows(bigquery, table, "id, body, created_utc") == expected


def test_a_file_that_yields_no_rows_is_an_error(bigquery, tmp_path):
    table = f"{PROJECT}.nothing.comments"
    empty = tmp_path / "RC_empty.zst"
    empty.write_bytes(b"")
    blank = write_dump(tmp_path / "RC_blank.zst", ["", "   ", ""])
    bad = write_dump(tmp_path / "RC_bad.zst", ["{not json", "[1]", json.dumps(comment(1, "x", created="soon"))])
    posts = write_dump(tmp_path / "RS.zst", [json.dumps(p) for p in POSTS])
    good = write_dump(tmp_path / "RC_good.zst", [json.dumps(comment(5, "loaded"))])
    result = run_load(empty, bad, good, blank, "--table", table, "--endpoint", bigquery.url, "--quiet")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {empty}: no rows: the file holds no lines",
        f"error: {bad}: no rows: all 3 lines are bad (most: not JSON)",
        f"error: {blank}: no rows: the file holds no lines"]
    assert rows(bigquery, table, "id") == [("c5",)]  # the good file was loaded all the same

    result = run_load(posts, "--kind", "comments", "--table", table, "--endpoint", bigquery.url, "--quiet")
    assert (result.returncode, result.stderr) == (
        1, f"error: {posts}: no rows: all 4 lines are bad (most: missing field); is it a file of posts, "
           "not comments?\n")
    result = run_load(good, "--subreddit", "AskReddit", "--table", table, "--endpoint", bigquery.url, "--quiet")
    assert (result.returncode, result.stderr) == (
        1, f"error: {good}: no rows: none of its 1 records is of the --subreddit given\n")

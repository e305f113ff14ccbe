"""`python -m data.extract` against a real BigQuery emulator (bqemulator, started here) and a real
Cloud Storage emulator (the storage_emulator fixture): the exact corpus for seeded rows (tables loaded
from dump files with `python -m data.load`, fh-bigquery's monthly layout, a Hacker News table of the
public one's shape), each bad input as a one-line error that leaves the previous corpus alone, and the
--gcs-out upload. Access Denied, which the emulator never answers, comes from a small server answering
what BigQuery answers for fh-bigquery's tables today.

bqemulator has no cost model (dry runs report 0 bytes, maximum_bytes_billed is not enforced), so the
cost guard's decision and the job settings are checked as functions (test_cost_guard, test_job_config).
"""
import calendar
import html
import json
import os
import re
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data import extract, load
from data.emulator import SAMPLE, SAMPLE_PROJECT, Emulator
from data.sample.make_sample import write_dump

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


def utc(day):
    return calendar.timegm(tuple(map(int, day.split("-"))) + (12, 0, 0))


# Dump files for PROJECT.reddit.comments and PROJECT.reddit.posts, loaded with data.load.
COMMENTS = [
    {"id": "c1", "subreddit": AITA, "author": "a1", "body": "YTA, first.", "score": 10, "created_utc": utc("2019-01-05")},
    {"id": "c2", "subreddit": AITA, "author": "a2", "body": "NTA, second.", "score": 50, "created_utc": utc("2019-01-20")},
    {"id": "c3", "subreddit": AITA, "author": "a3", "body": "YTA in February.", "score": 5, "created_utc": utc("2019-02-03")},
    {"id": "c4", "subreddit": "relationship_advice", "author": "a4", "body": "Talk to them.", "score": 30,
     "created_utc": str(utc("2019-01-10"))},
    {"id": "c5", "subreddit": "relationship_advice", "author": "a5", "body": "Give it time.", "score": 3,
     "created_utc": utc("2019-02-10")},
    {"id": "c6", "subreddit": "AskReddit", "author": "a6", "body": "Pizza.", "score": 100, "created_utc": utc("2019-03-01")},
    {"id": "c7", "subreddit": AITA, "author": "[deleted]", "body": "[deleted]", "score": 999, "created_utc": utc("2019-01-07")},
    {"id": "c8", "subreddit": AITA, "author": "a8", "body": "[removed]", "score": 998, "created_utc": utc("2019-01-08")},
]
POSTS = [
    {"id": "p1", "subreddit": AITA, "author": "o1", "title": "AITA for skipping the wedding?",
     "selftext": "It was my sister's.", "score": 120, "created_utc": utc("2019-01-02")},
    {"id": "p2", "subreddit": AITA, "author": "o2", "title": "WIBTA if I sold the car?", "selftext": "[removed]",
     "score": 7, "created_utc": utc("2019-01-03")},
    {"id": "p3", "subreddit": AITA, "author": "o3", "title": "AITA for eating the leftovers?", "selftext": "",
     "score": 300, "created_utc": utc("2019-02-04")},
    {"id": "p4", "subreddit": "AskReddit", "author": "o4", "title": "What is your favourite soup?", "selftext": "",
     "score": 3000, "created_utc": utc("2019-01-05")},
    {"id": "p5", "subreddit": "AskReddit", "author": "o5", "title": "Best &amp; worst advice?", "selftext": "Go.",
     "score": 10, "created_utc": utc("2019-01-06")},
]
# A table shaped like bigquery-public-data.hacker_news.full (its columns and types; HTML in `text`).
HN_TABLE = f"{PROJECT}.hacker_news.full"
HN_SCHEMA = [("id", "INTEGER"), ("type", "STRING"), ("by", "STRING"), ("title", "STRING"), ("text", "STRING"),
             ("url", "STRING"), ("score", "INTEGER"), ("time", "INTEGER"), ("timestamp", "TIMESTAMP"),
             ("dead", "BOOLEAN"), ("deleted", "BOOLEAN"), ("parent", "INTEGER"), ("descendants", "INTEGER"),
             ("ranking", "INTEGER")]


def hn(i, kind, day, title=None, text=None, score=None, by="pg", **flags):
    return {"id": i, "type": kind, "by": by, "title": title, "text": text, "url": None, "score": score,
            "time": utc(day), "timestamp": f"{day} 12:00:00", "dead": flags.get("dead"),
            "deleted": flags.get("deleted"), "parent": None, "descendants": None, "ranking": None}


HN_ROWS = [
    hn(1, "story", "2019-01-10", title="Show HN: A tiny GPT-2 server", score=250),
    hn(2, "story", "2019-02-01", title="Ask HN: What are you reading?", text="I mean books.<p>Or papers &amp; blogs.",
       score=40),
    hn(3, "comment", "2019-01-11", text='Nice work! <i>Really</i> fast.<p>See <a href="https://example.com" '
                                          'rel="nofollow">https://example.com</a>'),
    hn(4, "comment", "2019-01-12", text="A flagged comment.", dead=True),
    hn(5, "comment", "2019-01-13", by=None, deleted=True),
    hn(6, "comment", "2019-03-01", text="I&#x27;d use it."),
    hn(7, "story", "2019-01-14", title="A flagged story", score=500, dead=True),
    hn(8, "story", "2019-01-15", title="Launch HN: Something", score=90),
]


@pytest.fixture(scope="module")
def bigquery(tmp_path_factory):
    """The emulator with the seeded test tables (fh-bigquery's monthly layout, one month a table), the dump
    files above loaded with data.load, the Hacker News table, and the bundled sample (as the demo loads it)."""
    folder = tmp_path_factory.mktemp("bqemulator")
    with Emulator(log_path=folder / "emulator.log") as emulator:
        for name, rows in TABLES.items():
            middle = calendar.timegm((int(name[:4]), int(name[5:]), 15, 0, 0, 0))
            emulator.create_table(f"{PROJECT}.reddit_comments.{name}", [{**r, "created_utc": middle} for r in rows])
        for kind, rows in (("comments", COMMENTS), ("posts", POSTS)):
            dump = write_dump(folder / f"{kind}.zst", [json.dumps(r) for r in rows])
            result = subprocess.run([sys.executable, "-m", "data.load", dump, "--table", f"{PROJECT}.reddit.{kind}",
                                     "--endpoint", emulator.url, "--quiet"], cwd=ROOT, capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
        emulator.create_table(HN_TABLE, HN_ROWS, schema=HN_SCHEMA)
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
    # Beside it, the query that made it (CONTRACT.md), for the run's corpus.json and its model card
    meta_path = tmp_path / "corpus.txt.meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    assert meta == {"project": PROJECT, "source": "reddit", "kind": "comments", "table": WILDCARD,
                    "subreddit": [AITA], "tag_subreddit": False, "since": None, "until": None,
                    "match": r"(?i)\bYTA\b", "min_score": None, "top": None, "with_selftext": False,
                    "exclude_author": ["AutoModerator", "[deleted]"], "min_length": 5, "limit": None,
                    "format": "gpt2", "texts": len(EXPECTED_YTA), "written_at": meta["written_at"]}
    assert abs(datetime.fromisoformat(meta["written_at"]) - datetime.now(timezone.utc)) < timedelta(minutes=5)
    assert oct(meta_path.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "corpus.txt.meta.json"]


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
    """The demo's extraction over the bundled dump files equals the same rules applied here in Python."""
    expected, seen = [], set()
    since = calendar.timegm((2019, 1, 1, 0, 0, 0))
    comments = next(path for path in SAMPLE if "comments" in path.name)
    for line in load.dump_lines(comments):
        try:
            r = json.loads(line)
        except ValueError:
            continue  # the sample's corrupt line, which data.load counts and skips
        if (float(r["created_utc"]) >= since and r["subreddit"].lower() == "amitheasshole"
                and re.search(r"(?i)\bYTA\b", r["body"]) and r["author"] not in ("AutoModerator", "[deleted]")
                and r["body"] not in ("[deleted]", "[removed]")):
            text = html.unescape(r["body"]).replace("\ufffd", "").strip()
            if text and text not in seen:
                seen.add(text)
                expected.append(text)
    out = tmp_path / "corpus.txt"
    result = run_extract("--endpoint", bigquery.url, "--project", SAMPLE_PROJECT, "--subreddit", AITA,
                         "--since", "2019-01", "--match", r"(?i)\bYTA\b", "--out", out)
    assert result.returncode == 0, result.stderr
    assert len(expected) > 1000
    assert sorted(documents(out)) == sorted(expected)  # a loaded table has no row order


def documents(path):
    """The texts of a gpt-2-simple corpus file, in order."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<|startoftext|>") and text.endswith("<|endoftext|>\n")
    return text[len("<|startoftext|>"):-len("<|endoftext|>\n")].split("<|endoftext|>\n<|startoftext|>")


# (arguments, the exact texts; in order when the query orders them (--top), else as a set)
LOADED_CASES = {
    "default table, --since": (["--since", "2019-02"], {"YTA in February.", "Give it time.", "Pizza."}),
    "--until a day, included": (["--until", "2019-01-10"], {"YTA, first.", "Talk to them."}),
    "--since and --until a month": (["--since", "2019-01", "--until", "2019-01", "--subreddit", AITA],
                                    {"YTA, first.", "NTA, second."}),
    "two --subreddit, --min-score": (["--subreddit", "amitheasshole", "--subreddit", "RELATIONSHIP_advice",
                                      "--min-score", "10", "--exclude-author", "nobody"],
                                     {"YTA, first.", "NTA, second.", "Talk to them."}),
    "--top per subreddit, tagged": (["--top", "1", "--tag-subreddit"],
                                    ["r/AmItheAsshole\nNTA, second.", "r/AskReddit\nPizza.",
                                     "r/relationship_advice\nTalk to them."]),
    "posts: titles": (["--kind", "posts", "--subreddit", AITA],
                      {"AITA for skipping the wedding?", "WIBTA if I sold the car?", "AITA for eating the leftovers?"}),
    "posts: --with-selftext, --min-score": (["--kind", "posts", "--with-selftext", "--min-score", "100"],
                                            {"AITA for skipping the wedding?\n\nIt was my sister's.",
                                             "AITA for eating the leftovers?", "What is your favourite soup?"}),
    "posts: --match reads the selftext": (["--kind", "posts", "--with-selftext", "--match", "(?i)sister|removed"],
                                          {"AITA for skipping the wedding?\n\nIt was my sister's."}),
    "posts: --top 2, tagged": (["--kind", "posts", "--top", "2", "--tag-subreddit", "--since", "2019-01"],
                               ["r/AmItheAsshole\nAITA for eating the leftovers?",
                                "r/AmItheAsshole\nAITA for skipping the wedding?",
                                "r/AskReddit\nWhat is your favourite soup?", "r/AskReddit\nBest & worst advice?"]),
    "fh-bigquery layout: --since picks the months": (["--table", WILDCARD, "--since", "2019-02", "--match", "YTA, you"],
                                                     ["YTA, you should apologize."]),
    "fh-bigquery layout: --until picks the months": (["--table", WILDCARD, "--until", "2019-01", "--match", "apologize"],
                                                     ["YTA, you should apologize."]),
    "hacker news comments": (["--source", "hacker-news", "--table", HN_TABLE],
                             {"Nice work! Really fast.\n\nSee https://example.com", "I'd use it."}),
    "hacker news stories, --top": (["--source", "hacker-news", "--table", HN_TABLE, "--kind", "posts", "--top", "2"],
                                   ["Show HN: A tiny GPT-2 server", "Launch HN: Something"]),
    "hacker news stories with text, --min-score, --since": (
        ["--source", "hacker-news", "--table", HN_TABLE, "--kind", "posts", "--with-selftext", "--min-score", "30",
         "--since", "2019-02"], ["Ask HN: What are you reading?\n\nI mean books.\n\nOr papers & blogs."]),
}


@pytest.mark.parametrize("case", LOADED_CASES)
def test_loaded_tables_exact_corpus(case, bigquery, tmp_path):
    args, expected = LOADED_CASES[case]
    out = tmp_path / "corpus.txt"
    result = run_extract("--endpoint", bigquery.url, "--project", PROJECT, *args, "--out", out)
    assert result.returncode == 0, result.stderr
    texts = documents(out)
    assert (set(texts) if isinstance(expected, set) else texts) == expected
    assert len(texts) == len(expected)
    meta = json.loads((tmp_path / "corpus.txt.meta.json").read_text(encoding="utf-8"))
    assert meta["texts"] == len(expected) and meta["project"] == PROJECT
    assert meta["source"] == (args[args.index("--source") + 1] if "--source" in args else "reddit")
    given = lambda flag: args[args.index(flag) + 1] if flag in args else None  # YYYY-MM or YYYY-MM-DD
    first_day = lambda d: d if len(d) == 10 else f"{d}-01"
    last_day = lambda d: d if len(d) == 10 else f"{d}-{calendar.monthrange(int(d[:4]), int(d[5:]))[1]}"
    assert meta["since"] == (given("--since") and first_day(given("--since")))
    assert meta["until"] == (given("--until") and last_day(given("--until")))  # the last day included


PREVIOUS = "<|startoftext|>the previous corpus<|endoftext|>\n"


def closed_port():
    from data.emulator import free_port
    return free_port()  # bound and released: nothing listens there


BAD_INPUTS = {
    "no rows matched": (["--match", "zzz-no-such-text"], {}, 1, "no rows matched"),
    "invalid regex": (["--match", "(?i)(YTA"], {}, 1, "missing )"),
    "missing table": (["--table", f"{PROJECT}.reddit_comments.2030_01"], {}, 1,
                      f"error: table {PROJECT}.reddit_comments.2030_01 not found: load Reddit dump files into it with "
                      f"`python -m data.load FILE.zst --table {PROJECT}.reddit_comments.2030_01`, or name a table you "
                      "can read with --table"),
    "missing dataset": (["--table", f"{PROJECT}.no_such_dataset.2019_01"], {}, 1, "not found"),
    "no table matches": (["--table", f"{PROJECT}.reddit_comments.2030_*"], {}, 1,
                         f"error: no table matches {PROJECT}.reddit_comments.2030_*: load Reddit dump files into a table "
                         f"of your own with `python -m data.load FILE.zst --table {PROJECT}.reddit.comments`"),
    "default table missing": (["--project", "other-project"], {}, 1,
                              "error: table other-project.reddit.comments not found: load Reddit dump files into it "
                              "with `python -m data.load FILE.zst --table other-project.reddit.comments`"),
    "posts asked of a comments table": (["--kind", "posts"], {}, 1,
                                        f"{WILDCARD} has no column title, selftext, which --source reddit --kind posts reads"),
    "--limit beyond BigQuery's": (["--limit", str(2**63)], {}, 2,
                                  f"{2**63} is more than 4,294,967,295, the most rows BigQuery returns for one query"),
    "--limit in other digits": (["--limit", "\u0661\u0662"], {}, 2, "is not a whole number of at least 1 (digits 0-9)"),
    "--min-score in other digits": (["--min-score", "\u00b2"], {}, 2, "is not a whole number (digits 0-9)"),
    "empty --subreddit": (["--subreddit", ""], {}, 2, "--subreddit: must not be empty"),
    "--since after --until": (["--since", "2019-02", "--until", "2019-01"], {}, 2, "--since must come before --until"),
    "bad --since": (["--since", "2019-13"], {}, 2, "'2019-13' is not a date like 2019-01 or 2019-01-31"),
    "--with-selftext on comments": (["--with-selftext"], {}, 2, "--with-selftext goes with --kind posts"),
    "--subreddit on hacker news": (["--source", "hacker-news", "--subreddit", "x"], {}, 2,
                                   "--subreddit and --tag-subreddit are for --source reddit"),
    "--top on hacker news comments": (["--source", "hacker-news", "--top", "3"], {}, 2,
                                      "Hacker News comments have no score"),
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
    table = [] if "--table" in args or "--project" in args else ["--table", WILDCARD]  # --project: its default table
    result = run_extract("--endpoint", bigquery.url, *table, *args, "--out", out, env=env)
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
    result = run_extract("--endpoint", f"http://127.0.0.1:{closed_port()}", "--project", PROJECT, "--timeout", "2",
                         "--out", out)
    assert_refused(result, 1, "Connection refused", out)


class AccessDenied(BaseHTTPRequestHandler):
    """Answers every call as BigQuery answers one for a table or dataset the caller may not read."""

    def do_GET(self):
        name = self.path.split("?")[0].split("/projects/", 1)[1]
        body = json.dumps({"error": {
            "code": 403, "status": "PERMISSION_DENIED",
            "message": f"Access Denied: {name}: Permission bigquery.tables.get denied (or it may not exist).",
            "errors": [{"message": f"Access Denied: {name}: Permission bigquery.tables.get denied (or it may not "
                                   "exist).", "domain": "global", "reason": "accessDenied"}]}}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("table", ["fh-bigquery.reddit_comments.2019_*", "fh-bigquery.reddit_comments.2019_08"])
def test_access_denied_names_the_table_and_the_fix(table, tmp_path):
    """What a new user meets today with fh-bigquery's tables, through the real client over HTTP."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), AccessDenied)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "corpus.txt"
        out.write_text(PREVIOUS, encoding="utf-8")
        result = run_extract("--endpoint", f"http://127.0.0.1:{server.server_port}", "--project", "my-project",
                             "--table", table, "--out", out)
    finally:
        server.shutdown()
    assert_refused(result, 1, f"error: access denied to {table} (fh-bigquery's Reddit tables are no longer public): "
                              "load Reddit dump files into a table of your own with `python -m data.load FILE.zst "
                              "--table my-project.reddit.comments`, or name a table you can read with --table", out)


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

    assert json.loads((tmp_path / "corpus.txt.meta.json").read_text())["texts"] == 3
    out.write_text(PREVIOUS, encoding="utf-8")
    (tmp_path / "corpus.txt.meta.json").unlink()  # a corpus made otherwise, with no record
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
    args = extract.parse_args(["--table", "my-project.reddit.comments", "--subreddit", "AmItheAsshole",
                               "--subreddit", "AskReddit", "--match", r"(?i)\bYTA\b", "--max-gb", "2.5",
                               "--since", "2019-01", "--until", "2019-02-28", "--top", "5"])
    sql = extract.query_text(args)
    config = extract.job_config(args, sql)
    assert config.maximum_bytes_billed == 2_500_000_000
    params = {p.name: p.to_api_repr()["parameterValue"] for p in config.query_parameters}
    assert params == {
        "subreddits": {"arrayValues": [{"value": "amitheasshole"}, {"value": "askreddit"}]},
        "match": {"value": r"(?i)\bYTA\b"},
        "exclude_authors": {"arrayValues": [{"value": "AutoModerator"}, {"value": "[deleted]"}]},
        "min_score": {"value": None},
        "since": {"value": "2019-01-01 00:00:00+00:00"},
        "until": {"value": "2019-03-01 00:00:00+00:00"},  # the day named is included
        "top": {"value": "5"},
    }
    assert extract.job_config(args, sql, dry_run=True).dry_run
    # user values never reach the SQL text; only the checked table name and code-chosen parts do
    assert "`my-project.reddit.comments`" in sql and "AmItheAsshole" not in sql and "YTA" not in sql
    assert "QUALIFY" in sql and "_TABLE_SUFFIX" not in sql and "{" not in sql
    assert "subreddit_key IN UNNEST(@subreddits)" in sql  # the clustering column itself: BigQuery skips blocks


def test_wildcard_suffix_range():
    def suffixes(*args):
        parsed = extract.parse_args(["--table", "fh-bigquery.reddit_comments.2019_*", *args])
        return extract.suffix_range(parsed.table, parsed.since, parsed.until)
    assert suffixes() == ("", "~")  # every table
    assert suffixes("--since", "2019-02") == ("02", "~")
    assert suffixes("--until", "2019-03-15") == ("", "03")
    assert suffixes("--since", "2018-06", "--until", "2019-01") == ("", "01")
    assert suffixes("--since", "2020-01") == ("", "~")  # outside the prefix: the created_utc filter decides


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
        server = next(c for c in children if c.cmdline()[1:3] == ["-m", "app"])
        assert {c.laddr.ip for c in server.net_connections("inet") if c.status == "LISTEN"} == {"127.0.0.1"}
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(timeout=30) == 0  # Ctrl-C while serving is the demo's normal end
        assert "demo: stopped the server; done" in (tmp_path / "demo.log").read_text()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        log.close()

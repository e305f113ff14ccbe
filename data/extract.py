"""Build a fine-tuning corpus from Reddit comments or posts in BigQuery, or from Hacker News.

    python -m data.extract --project MY-PROJECT --subreddit AmItheAsshole --match '(?i)\\bYTA\\b'
    python -m data.extract --project MY-PROJECT --kind posts --top 1000 --subreddit A --subreddit B --tag-subreddit
    python -m data.extract --project MY-PROJECT --source hacker-news --kind posts --min-score 100

Reddit comes from a table loaded from dump files with `python -m data.load` (default
MY-PROJECT.reddit.comments, or .posts), Hacker News from bigquery-public-data.hacker_news.full.
Runs data/comments.sql, posts.sql or hacker_news.sql (user values as query parameters) after a dry run
that reports the bytes the query will scan and stops above --max-gb. Cleans the rows (HTML entities,
U+FFFD, [deleted]/[removed], too short, exact duplicates) and writes one
<|startoftext|>text<|endoftext|> per comment or post, gpt-2-simple's format (or --format plain).
The corpus is written to a temporary file beside --out and renamed only when everything,
the optional --gcs-out upload included, succeeded: a failed run leaves the previous corpus as it was.
With it comes OUT.meta.json, the query's parameters (corpus_record), which training carries into the run.

--endpoint URL or BIGQUERY_EMULATOR_HOST points the client at a local emulator (no credentials used).
"""
import argparse
import hashlib
import html
import json
import os
import re
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

SQL_FILES = {("reddit", "comments"): "comments.sql", ("reddit", "posts"): "posts.sql",
             ("hacker-news", "comments"): "hacker_news.sql", ("hacker-news", "posts"): "hacker_news.sql"}
HACKER_NEWS_TABLE = "bigquery-public-data.hacker_news.full"
# With --top: the N highest-scored rows per subreddit (Hacker News: overall), best first.
TOP = {"reddit": "QUALIFY ROW_NUMBER() OVER (PARTITION BY LOWER(subreddit) ORDER BY score DESC, id) <= @top\n"
                 "ORDER BY LOWER(subreddit), score DESC, id",
       "hacker-news": "QUALIFY ROW_NUMBER() OVER (ORDER BY score DESC, id) <= @top\nORDER BY score DESC, id"}
DEFAULT_EXCLUDED_AUTHORS = ["AutoModerator", "[deleted]"]
GB = 10**9  # BigQuery reports bytes; --max-gb counts decimal gigabytes
MAX_LIMIT = 2**32 - 1  # the largest maxResults BigQuery's API takes (a uint32)
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(9999, 12, 31, tzinfo=timezone.utc)

# project.dataset.table, each part as BigQuery allows it (project ids: 6-30 lowercase letters,
# digits and hyphens, starting with a letter), plus an optional trailing * for a wildcard table.
# Nothing else gets into the SQL text, so no quoting or comment can sneak in with the name.
TABLE_PATTERN = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]\.[A-Za-z0-9_]{1,1024}\.(?:[A-Za-z0-9_]{1,1024}\*?|\*)")
GCS_PATTERN = re.compile(r"gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])/(\S+[^/])")

DELETED_BODIES = {"[deleted]", "[removed]"}
START, END = "<|startoftext|>", "<|endoftext|>"
CHARS_PER_TOKEN = 4  # rough GPT-2 BPE average for English text; the summary says "approx."
META_SUFFIX = ".meta.json"  # data/corpus.txt -> data/corpus.txt.meta.json (corpus_record)


class UsageError(Exception):
    """A problem to report as one line, without a traceback."""


def table_name(value):
    if not TABLE_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a table name like project.dataset.table or project.dataset.prefix_* "
            "(letters, digits, _ and, in the project, -)")
    return value


def gcs_url(value):
    if not GCS_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Cloud Storage object URL like gs://bucket/path/corpus.txt")
    return value


def whole_number(value, minimum=None):
    """value as an int, written in ASCII digits (int() and str.isdigit also take '١٢' or '²')."""
    if not re.fullmatch(r"-?[0-9]+", value) or (minimum is not None and int(value) < minimum):
        at_least = f" of at least {minimum}" if minimum is not None else ""
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number{at_least} (digits 0-9)")
    return int(value)


def positive_int(value):
    return whole_number(value, minimum=1)


def non_negative_int(value):
    return whole_number(value, minimum=0)


def row_limit(value):
    if positive_int(value) > MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_LIMIT:,}, the most rows BigQuery returns for one query")
    return int(value)


def subreddit_name(value):
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty (leave --subreddit out for every subreddit)")
    return value


def date_bound(value):
    """YYYY-MM or YYYY-MM-DD as (first moment, first moment after), in UTC."""
    match = re.fullmatch(r"([0-9]{4})-([0-9]{2})(?:-([0-9]{2}))?", value)
    try:
        year, month, day = int(match[1]), int(match[2]), int(match[3] or 1)
        start = datetime(year, month, day, tzinfo=timezone.utc)
        if match[3]:
            end = start + timedelta(days=1)
        else:
            end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=timezone.utc)
    except (TypeError, ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a date like 2019-01 or 2019-01-31") from None
    return start, end


def positive_float(value):
    try:
        number = float(value)
    except ValueError:
        number = -1
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number above 0")
    return number


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = OneLineParser(
        prog="python -m data.extract",
        description="Build a gpt-2-simple corpus from Reddit comments or posts in BigQuery, or from Hacker News.")
    p.add_argument("--source", choices=["reddit", "hacker-news"], default="reddit",
                   help=f"reddit: a table loaded with `python -m data.load` (default); hacker-news: {HACKER_NEWS_TABLE}")
    p.add_argument("--kind", choices=["comments", "posts"], default="comments",
                   help="comments (default), or posts: each post's title (Hacker News: stories)")
    p.add_argument("--with-selftext", action="store_true", help="posts: the post's text under its title")
    p.add_argument("--table", type=table_name,
                   help="project.dataset.table; a trailing * queries every table with that prefix (default: "
                        f"PROJECT.reddit.comments or PROJECT.reddit.posts; {HACKER_NEWS_TABLE} "
                        "with --source hacker-news)")
    p.add_argument("--subreddit", action="append", type=subreddit_name, metavar="NAME",
                   help="keep this subreddit only (case-insensitive), e.g. AmItheAsshole; repeatable (default: all)")
    p.add_argument("--tag-subreddit", action="store_true",
                   help="start each text with r/NAME and a new line, so one model writes for several subreddits, "
                        "chosen at generation time by the prefix")
    p.add_argument("--match", help=r"keep texts that match this RE2 regex, e.g. '(?i)\bYTA\b'")
    p.add_argument("--min-score", type=whole_number, metavar="N", help="keep rows scored at least N")
    p.add_argument("--since", type=date_bound, metavar="YYYY-MM[-DD]", help="keep rows created from this month or day on")
    p.add_argument("--until", type=date_bound, metavar="YYYY-MM[-DD]", help="keep rows created up to this month or day, included")
    p.add_argument("--top", type=positive_int, metavar="N",
                   help="keep the N highest-scored rows per subreddit (Hacker News: overall)")
    p.add_argument("--exclude-author", action="append", metavar="AUTHOR",
                   help="drop rows by this author; repeatable (default: AutoModerator and [deleted]; "
                        "giving any replaces the defaults)")
    p.add_argument("--min-length", type=non_negative_int, default=1,
                   help="drop texts shorter than this many characters after cleaning (default 1)")
    p.add_argument("--limit", type=row_limit, help=f"read at most this many rows from the result (default: all; at most {MAX_LIMIT:,})")
    p.add_argument("--project", help="Google Cloud project that runs and pays for the query "
                                     "(default: your credentials' project; with an emulator, the table's)")
    p.add_argument("--out", type=Path, default=Path("data/corpus.txt"), help="corpus file (default data/corpus.txt)")
    p.add_argument("--format", choices=["gpt2", "plain"], default="gpt2",
                   help="gpt2: one <|startoftext|>text<|endoftext|> per row (default); plain: texts "
                        "separated by a blank line")
    p.add_argument("--max-gb", type=positive_float, default=10.0,
                   help="stop when the dry run says the query scans more than this many GB (default 10); "
                        "also sent as the job's maximum_bytes_billed")
    p.add_argument("--gcs-out", type=gcs_url, metavar="gs://BUCKET/PATH", help="also upload the corpus there")
    p.add_argument("--endpoint", help="BigQuery API URL of an emulator, e.g. http://127.0.0.1:9050 "
                                      "(default: $BIGQUERY_EMULATOR_HOST, else the real BigQuery)")
    p.add_argument("--timeout", type=positive_float, default=300.0,
                   help="give up on a BigQuery or Cloud Storage call, retries included, after this many seconds (default 300)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.exclude_author is None:
        args.exclude_author = list(DEFAULT_EXCLUDED_AUTHORS)
    if args.out.is_dir():
        p.error(f"--out {args.out} is a directory; give a file path")
    if args.with_selftext and args.kind != "posts":
        p.error("--with-selftext goes with --kind posts")
    if args.source == "hacker-news":
        if args.subreddit or args.tag_subreddit:
            p.error("--subreddit and --tag-subreddit are for --source reddit")
        if args.kind == "comments" and (args.min_score is not None or args.top):
            p.error("Hacker News comments have no score: --min-score and --top go with --kind posts")
        args.table = args.table or HACKER_NEWS_TABLE
    args.since = args.since[0] if args.since else EARLIEST  # from the start of the first month or day named
    args.until = args.until[1] if args.until else LATEST  # to the end of the last: the moment after it
    if args.since >= args.until:
        p.error("--since must come before --until")
    return args


def query_text(args, created="created_utc", subreddit_key="subreddit_key"):
    """The SQL for --source/--kind with the (already validated) table name and code-chosen parts in place.

    created, subreddit_key: the creation time as a TIMESTAMP and the lower-case subreddit (see table_layout)."""
    if not TABLE_PATTERN.fullmatch(args.table):
        raise UsageError(f"refusing table name {args.table!r}")
    suffix = "AND _TABLE_SUFFIX BETWEEN @suffix_first AND @suffix_last" if args.table.endswith("*") else ""
    text = Path(__file__).with_name(SQL_FILES[args.source, args.kind]).read_text(encoding="utf-8")
    sql = "\n".join(line for line in text.splitlines() if not line.startswith("--"))  # the comments name the placeholders
    subreddits = f"AND {subreddit_key} IN UNNEST(@subreddits)" if args.subreddit else ""
    return sql.format(table=args.table, created=created, suffix=suffix, subreddits=subreddits,
                      top=TOP[args.source] if args.top else "")


def suffix_range(table, since, until):
    """The _TABLE_SUFFIX range of a wildcard table of monthly tables named like 2019_01 (fh-bigquery's
    layout) that covers since..until; the whole range when the names do not follow it. The created_utc
    filter stays exact either way: this only spares reading other months' tables."""
    prefix = table.rsplit(".", 1)[1][:-1]
    first, last = f"{since:%Y_%m}", f"{until - timedelta(microseconds=1):%Y_%m}"  # until is exclusive
    return (first[len(prefix):] if first.startswith(prefix) else "",
            last[len(prefix):] if last.startswith(prefix) else "~")


def job_config(args, sql, dry_run=False):
    """The query job's settings: user values as parameters (those sql uses), and the bytes-billed cap."""
    from google.cloud import bigquery
    params = [
        bigquery.ArrayQueryParameter("subreddits", "STRING", sorted({s.lower() for s in args.subreddit or []})),
        bigquery.ScalarQueryParameter("match", "STRING", args.match),
        bigquery.ArrayQueryParameter("exclude_authors", "STRING", args.exclude_author),
        bigquery.ScalarQueryParameter("min_score", "INT64", args.min_score),
        bigquery.ScalarQueryParameter("since", "TIMESTAMP", args.since),
        bigquery.ScalarQueryParameter("until", "TIMESTAMP", args.until),
        bigquery.ScalarQueryParameter("with_selftext", "BOOL", args.with_selftext),
        bigquery.ScalarQueryParameter("top", "INT64", args.top),
        bigquery.ScalarQueryParameter("type", "STRING", "comment" if args.kind == "comments" else "story"),
    ]
    if args.table.endswith("*"):
        first, last = suffix_range(args.table, args.since, args.until)
        params += [bigquery.ScalarQueryParameter("suffix_first", "STRING", first),
                   bigquery.ScalarQueryParameter("suffix_last", "STRING", last)]
    params = [p for p in params if re.search(rf"@{p.name}\b", sql)]
    if dry_run:
        return bigquery.QueryJobConfig(dry_run=True, use_query_cache=False, query_parameters=params)
    return bigquery.QueryJobConfig(query_parameters=params, maximum_bytes_billed=int(args.max_gb * GB))


def emulator_endpoint(args):
    url = args.endpoint or os.environ.get("BIGQUERY_EMULATOR_HOST")
    if url and "://" not in url:
        url = "http://" + url  # BIGQUERY_EMULATOR_HOST is often host:port
    return url


def make_client(args):
    """A BigQuery client for the emulator (anonymous) or the real service (Application Default Credentials)."""
    import google.auth
    from google.auth import exceptions as auth_exceptions
    from google.cloud import bigquery

    endpoint = emulator_endpoint(args)
    if endpoint:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        project = args.project or (args.table.split(".")[0] if args.table else None)
        if not project:
            raise UsageError("with an emulator, name the project with --project (or the table with --table)")
        return bigquery.Client(project=project, credentials=AnonymousCredentials(),
                               client_options=ClientOptions(api_endpoint=endpoint)), endpoint
    try:
        credentials, default_project = google.auth.default(
            scopes=["https://www.googleapis.com/auth/bigquery"])
    except auth_exceptions.DefaultCredentialsError:
        raise UsageError("no Google Cloud credentials: run `gcloud auth application-default login` or set "
                         "GOOGLE_APPLICATION_CREDENTIALS (or point --endpoint at an emulator)") from None
    project = args.project or default_project
    if not project:
        raise UsageError("no Google Cloud project to run the query in: pass --project")
    return bigquery.Client(project=project, credentials=credentials), None


NEEDED_COLUMNS = {  # what the SQL files read; created_utc / timestamp checked apart
    ("reddit", "comments"): ("id", "subreddit", "author", "body", "score"),
    ("reddit", "posts"): ("id", "subreddit", "author", "title", "selftext", "score"),
    ("hacker-news", "comments"): ("id", "type", "by", "text", "title", "score", "dead", "deleted"),
    ("hacker-news", "posts"): ("id", "type", "by", "text", "title", "score", "dead", "deleted"),
}


def table_layout(client, args, retry):
    """Check that args.table can be read and has the columns the query needs; return query_text's created
    and subreddit_key for it. Access Denied and Not Found become one line naming the table and the fix."""
    from google.api_core import exceptions as api_exceptions

    def fix(table):
        if args.source == "hacker-news":
            return f"name a table you can read with --table (the public one is {HACKER_NEWS_TABLE})"
        return (f"load Reddit dump files into {'it' if table == args.table else 'a table of your own'} with "
                f"`python -m data.load FILE.zst --table {table}`, or name a table you can read with --table")

    own_table = f"{client.project}.reddit.{args.kind}"
    dataset, name = args.table.rsplit(".", 1)
    try:
        if name.endswith("*"):
            found = next((t for t in client.list_tables(dataset, retry=retry, timeout=args.timeout)
                          if t.table_id.startswith(name[:-1])), None)
            if found is None:
                raise UsageError(f"no table matches {args.table}: {fix(own_table)}")
            table = client.get_table(found.reference, retry=retry, timeout=args.timeout)
        else:
            table = client.get_table(args.table, retry=retry, timeout=args.timeout)
    except api_exceptions.Forbidden:
        gone = " (fh-bigquery's Reddit tables are no longer public)" if args.table.startswith("fh-bigquery.") else ""
        raise UsageError(f"access denied to {args.table}{gone}: {fix(own_table)}") from None
    except api_exceptions.NotFound:
        raise UsageError(f"table {args.table} not found: {fix(args.table)}") from None
    columns = {field.name: field.field_type for field in table.schema}
    created = "timestamp" if args.source == "hacker-news" else "created_utc"
    missing = [c for c in (*NEEDED_COLUMNS[args.source, args.kind], created) if c not in columns]
    if missing:
        raise UsageError(f"{args.table} has no column {', '.join(missing)}, which --source {args.source} "
                         f"--kind {args.kind} reads: {fix(own_table)}")
    if columns[created] not in ("TIMESTAMP", "DATETIME"):
        created = f"TIMESTAMP_SECONDS(CAST({created} AS INT64))"  # fh-bigquery's tables: seconds since 1970
    elif created == "timestamp":
        created = "`timestamp`"  # Hacker News' column is named like a type
    return created, "subreddit_key" if "subreddit_key" in columns else "LOWER(subreddit)"


def html_text(text):
    """Hacker News text is HTML: <p> between paragraphs, <i>, <a>, <pre><code>; keep the words."""
    return re.sub(r"<[^>]*>", "", text.replace("<p>", "\n\n"))


def document(row, args):
    """One corpus text from a result row: a comment, a post's title (and its text), tagged if asked."""
    body = row["body"]
    if body and args.source == "hacker-news":
        body = html_text(body)
    text = body or ""
    if row["title"] is not None:
        text = row["title"]
        if body and body.strip() not in DELETED_BODIES:
            text += "\n\n" + body
    return text


def cloud_error_line(error, timeout):
    """The one sentence worth showing from a Google API, auth or connection error."""
    from google.api_core import exceptions as api_exceptions
    from requests.exceptions import ConnectionError as RequestsConnectionError, Timeout

    if isinstance(error, api_exceptions.RetryError) and error.cause is not None:
        while isinstance(error, api_exceptions.RetryError) and error.cause is not None:
            error = error.cause  # retries nest: the job retry wraps the API call retry
        return f"{cloud_error_line(error, timeout)} (gave up after --timeout {timeout:g}s of retries)"
    if isinstance(error, (RequestsConnectionError, Timeout)):
        url = getattr(error.request, "url", None) or ""
        reason = re.search(r"\[Errno -?\d+\] ([^'\")]+)|(Read timed out|timed out)", str(error))
        reason = next((g for g in reason.groups() if g), None) if reason else type(error).__name__
        host = re.match(r"\w+://[^/]+", url)
        return f"cannot reach {host.group(0) if host else 'the server'}: {reason}"
    errors = getattr(error, "errors", None) or []
    message = (errors[0].get("message") if errors and isinstance(errors[0], dict) else None) \
        or getattr(error, "message", None) or str(error) or type(error).__name__
    return str(message).splitlines()[0].strip()[:300]


def check_cost(bytes_scanned, max_gb):
    """Stop before a query that scans more than max_gb; return the line that reports the dry run."""
    if bytes_scanned > max_gb * GB:
        raise UsageError(f"the query would scan {bytes_scanned / GB:,.2f} GB, more than --max-gb {max_gb:g}; "
                         "narrow --table (fewer months) or raise --max-gb")
    return f"dry run: the query will scan {bytes_scanned / GB:,.3f} GB ({bytes_scanned:,} bytes; --max-gb {max_gb:g})"


class Cleaner:
    """Applies the cleaning rules to one body at a time and counts what each rule did."""

    def __init__(self, min_length):
        self.min_length = max(min_length, 1)
        self.seen = set()
        self.counts = {"read": 0, "kept": 0, "deleted/removed": 0, "too short": 0, "duplicate": 0,
                       "entities unescaped": 0, "U+FFFD removed": 0, "characters": 0}

    def clean(self, body, tag=""):
        """tag + the cleaned text, or None when a rule drops it (duplicates: the same tag and text)."""
        self.counts["read"] += 1
        body = body or ""
        if body.strip() in DELETED_BODIES:
            self.counts["deleted/removed"] += 1
            return None
        text = html.unescape(body)  # every named and numeric entity, not just &amp; &lt; &gt;
        if text != body:
            self.counts["entities unescaped"] += 1
        if "\ufffd" in text:
            text = text.replace("\ufffd", "")
            self.counts["U+FFFD removed"] += 1
        text = text.strip()
        if len(text) < self.min_length:
            self.counts["too short"] += 1
            return None
        text = tag + text
        digest = hashlib.sha1(text.encode("utf-8")).digest()
        if digest in self.seen:
            self.counts["duplicate"] += 1
            return None
        self.seen.add(digest)
        self.counts["kept"] += 1
        self.counts["characters"] += len(text)
        return text


def formatted(text, fmt):
    if fmt == "gpt2":
        return f"{START}{text}{END}\n"  # what gpt-2-simple's encode_csv writes per row
    return f"{text}\n\n"


def summary_lines(counts, out, fmt, gcs_out):
    width = 24
    lines = [f"{'rows read':<{width}}{counts['read']:>12,}"]
    for rule in ("deleted/removed", "too short", "duplicate"):
        lines.append(f"{'dropped: ' + rule:<{width}}{counts[rule]:>12,}")
    lines += [
        f"{'kept':<{width}}{counts['kept']:>12,}",
        f"{'cleaned: entities':<{width}}{counts['entities unescaped']:>12,}  (rows with HTML entities unescaped)",
        f"{'cleaned: U+FFFD':<{width}}{counts['U+FFFD removed']:>12,}  (rows with the replacement character removed)",
        f"{'characters':<{width}}{counts['characters']:>12,}",
        f"{'approx. tokens':<{width}}{counts['characters'] // CHARS_PER_TOKEN:>12,}  (characters / {CHARS_PER_TOKEN})",
        f"wrote {out} ({'gpt-2-simple format' if fmt == 'gpt2' else 'plain text'})"
        + (f" and uploaded it to {gcs_out}" if gcs_out else ""),
    ]
    return lines


def gcs_bucket(url, timeout):
    """The Cloud Storage bucket of url, checked before the query runs so a bad --gcs-out fails early."""
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    from google.cloud import storage

    bucket_name = GCS_PATTERN.fullmatch(url).group(1)
    try:
        client = storage.Client()  # STORAGE_EMULATOR_HOST, when set, points it at an emulator
        bucket = client.lookup_bucket(bucket_name, timeout=timeout,
                                      retry=storage.retry.DEFAULT_RETRY.with_timeout(timeout))
    except auth_exceptions.DefaultCredentialsError:
        raise UsageError("cannot upload to Cloud Storage: no Google Cloud credentials (run `gcloud auth "
                         "application-default login`, or set STORAGE_EMULATOR_HOST)") from None
    except (api_exceptions.GoogleAPIError, OSError) as e:
        raise UsageError(f"cannot reach gs://{bucket_name}: {cloud_error_line(e, timeout)}") from None
    if bucket is None:
        raise UsageError(f"cannot upload: bucket gs://{bucket_name} does not exist")
    return bucket


def upload(bucket, path, url, timeout):
    from google.api_core import exceptions as api_exceptions
    from google.cloud import storage

    object_name = GCS_PATTERN.fullmatch(url).group(2)
    try:
        # one object, finalised only when complete: readers never see half a corpus
        bucket.blob(object_name).upload_from_filename(
            str(path), content_type="text/plain; charset=utf-8", timeout=timeout,
            retry=storage.retry.DEFAULT_RETRY.with_timeout(timeout))
    except (api_exceptions.GoogleAPIError, OSError) as e:
        raise UsageError(f"cannot upload to {url}: {cloud_error_line(e, timeout)}") from None


def filters_text(args):
    shown = {"subreddit": args.subreddit, "match": args.match, "min-score": args.min_score,
             "since": args.since if args.since != EARLIEST else None,
             "until (before)": args.until if args.until != LATEST else None, "top": args.top}
    return ", ".join([f"{k}={v!r}" if not isinstance(v, datetime) else f"{k}={v:%Y-%m-%d}"
                      for k, v in shown.items() if v is not None] + [f"excluded authors={args.exclude_author}"])


def corpus_record(args, project, texts):
    """CORPUS.meta.json, written beside the corpus with it: the query that made it, every filter of the
    command line (dates as the first and last day included, UTC), for the run that trains on it
    (RUN/corpus.json) and its model card."""
    return {
        "project": project, "source": args.source, "kind": args.kind, "table": args.table,
        "subreddit": args.subreddit, "tag_subreddit": args.tag_subreddit,
        "since": f"{args.since:%Y-%m-%d}" if args.since != EARLIEST else None,
        "until": f"{args.until - timedelta(microseconds=1):%Y-%m-%d}" if args.until != LATEST else None,
        "match": args.match, "min_score": args.min_score, "top": args.top, "with_selftext": args.with_selftext,
        "exclude_author": args.exclude_author, "min_length": args.min_length, "limit": args.limit,
        "format": args.format, "texts": texts, "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def extract(args):
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    from google.cloud import bigquery
    from google.cloud.bigquery import retry as bigquery_retry
    from tqdm import tqdm

    client, endpoint = make_client(args)
    args.table = args.table or f"{client.project}.reddit.{args.kind}"
    bucket = gcs_bucket(args.gcs_out, args.timeout) if args.gcs_out else None
    retry = bigquery.DEFAULT_RETRY.with_timeout(args.timeout)
    job_retry = bigquery_retry.DEFAULT_JOB_RETRY.with_timeout(args.timeout)
    where = f"the BigQuery emulator at {endpoint}" if endpoint else f"BigQuery (project {client.project})"
    print(f"querying {args.table} on {where}", file=sys.stderr)
    try:
        sql = query_text(args, *table_layout(client, args, retry))
        # job_retry=None on insert: the client would otherwise wrap jobs.insert in its own 10-minute
        # retry, ignoring --timeout; result() below still restarts a query that failed transiently
        dry = client.query(sql, job_config=job_config(args, sql, dry_run=True), retry=retry, job_retry=None,
                           timeout=args.timeout)
        print(check_cost(dry.total_bytes_processed or 0, args.max_gb), file=sys.stderr)
        if endpoint:
            print("  (an emulator has no cost model and reports 0; real BigQuery reports the true figure)",
                  file=sys.stderr)
        job = client.query(sql, job_config=job_config(args, sql), retry=retry, job_retry=None, timeout=args.timeout)
        rows = job.result(max_results=args.limit, retry=retry, job_retry=job_retry, timeout=args.timeout)
        total = rows.total_rows if args.limit is None else min(rows.total_rows or 0, args.limit)
        if not total:
            raise UsageError(f"no rows matched in {args.table} ({filters_text(args)})")

        cleaner = Cleaner(args.min_length)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.", suffix=".partial")
        meta_tmp = None
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                for row in tqdm(rows, total=total, unit=" rows", desc=f"reading {args.kind}",
                                disable=args.quiet, file=sys.stderr):
                    text = cleaner.clean(document(row, args), f"r/{row['subreddit']}\n" if args.tag_subreddit else "")
                    if text is not None:
                        f.write(formatted(text, args.format))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the corpus is an ordinary file
            if cleaner.counts["kept"] == 0:
                raise UsageError(f"all {cleaner.counts['read']:,} rows were dropped by the cleaning rules; "
                                 "nothing to write")
            if args.gcs_out:
                upload(bucket, tmp, args.gcs_out, args.timeout)
            record = json.dumps(corpus_record(args, client.project, cleaner.counts["kept"]), indent=1) + "\n"
            meta_path = args.out.with_name(args.out.name + META_SUFFIX)
            fd, meta_tmp = tempfile.mkstemp(dir=args.out.parent, prefix=f".{meta_path.name}.", suffix=".partial")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record)
            os.chmod(meta_tmp, 0o644)
            os.replace(tmp, args.out)
            os.replace(meta_tmp, meta_path)  # the corpus's record follows it at once
        except BaseException:
            for path in (tmp, meta_tmp):
                if path and os.path.exists(path):
                    os.unlink(path)
            raise
    except (api_exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError) as e:
        raise UsageError(f"BigQuery: {cloud_error_line(e, args.timeout)}") from None
    except OSError as e:  # requests' connection errors are OSErrors too, and so are local disk errors
        raise UsageError(cloud_error_line(e, args.timeout)) from None
    return cleaner.counts


def main(argv=None):
    args = parse_args(argv)
    try:
        counts = extract(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the previous corpus is unchanged", file=sys.stderr)
        return 130
    print("\n".join(summary_lines(counts, args.out, args.format, args.gcs_out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

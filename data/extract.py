"""Build a fine-tuning corpus from Reddit comments in BigQuery.

    python -m data.extract --subreddit AmItheAsshole --match '(?i)\\bYTA\\b' --project MY-PROJECT

Runs data/comments.sql (user values as query parameters) against --table, after a dry run that
reports the bytes the query will scan and stops above --max-gb. Cleans the rows (HTML entities,
U+FFFD, [deleted]/[removed], too short, exact duplicates) and writes one
<|startoftext|>body<|endoftext|> per comment, gpt-2-simple's format (or --format plain).
The corpus is written to a temporary file beside --out and renamed only when everything,
the optional --gcs-out upload included, succeeded: a failed run leaves the previous corpus as it was.

--endpoint URL or BIGQUERY_EMULATOR_HOST points the client at a local emulator (no credentials used).
"""
import argparse
import hashlib
import html
import os
import re
import sys
import tempfile
from pathlib import Path

SQL_FILE = Path(__file__).with_name("comments.sql")
DEFAULT_TABLE = "fh-bigquery.reddit_comments.2019_*"
DEFAULT_EXCLUDED_AUTHORS = ["AutoModerator", "[deleted]"]
GB = 10**9  # BigQuery reports bytes; --max-gb counts decimal gigabytes

# project.dataset.table, each part as BigQuery allows it (project ids: 6-30 lowercase letters,
# digits and hyphens, starting with a letter), plus an optional trailing * for a wildcard table.
# Nothing else gets into the SQL text, so no quoting or comment can sneak in with the name.
TABLE_PATTERN = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]\.[A-Za-z0-9_]{1,1024}\.(?:[A-Za-z0-9_]{1,1024}\*?|\*)")
GCS_PATTERN = re.compile(r"gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])/(\S+[^/])")

DELETED_BODIES = {"[deleted]", "[removed]"}
START, END = "<|startoftext|>", "<|endoftext|>"
CHARS_PER_TOKEN = 4  # rough GPT-2 BPE average for English text; the summary says "approx."


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


def positive_int(value):
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def non_negative_int(value):
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 0")
    return int(value)


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
        description="Build a gpt-2-simple corpus from Reddit comments in BigQuery.")
    p.add_argument("--table", type=table_name, default=DEFAULT_TABLE,
                   help=f"project.dataset.table; a trailing * queries every table with that prefix (default {DEFAULT_TABLE})")
    p.add_argument("--subreddit", help="keep comments from this subreddit only (case-insensitive), e.g. AmItheAsshole")
    p.add_argument("--match", help=r"keep comments whose body matches this RE2 regex, e.g. '(?i)\bYTA\b'")
    p.add_argument("--exclude-author", action="append", metavar="AUTHOR",
                   help="drop comments by this author; repeatable (default: AutoModerator and [deleted]; "
                        "giving any replaces the defaults)")
    p.add_argument("--min-length", type=non_negative_int, default=1,
                   help="drop comments shorter than this many characters after cleaning (default 1)")
    p.add_argument("--limit", type=positive_int, help="read at most this many rows from the result (default: all)")
    p.add_argument("--project", help="Google Cloud project that runs and pays for the query "
                                     "(default: your credentials' project; with an emulator, the table's)")
    p.add_argument("--out", type=Path, default=Path("data/corpus.txt"), help="corpus file (default data/corpus.txt)")
    p.add_argument("--format", choices=["gpt2", "plain"], default="gpt2",
                   help="gpt2: one <|startoftext|>body<|endoftext|> per comment (default); plain: comments "
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
    return args


def query_text(table):
    """The SQL of comments.sql with the (already validated) table name in place."""
    if not TABLE_PATTERN.fullmatch(table):
        raise UsageError(f"refusing table name {table!r}")
    return SQL_FILE.read_text(encoding="utf-8").replace("{table}", table)


def job_config(args, dry_run=False):
    """The query job's settings: user values as parameters, and the bytes-billed cap on the real run."""
    from google.cloud import bigquery
    params = [
        bigquery.ScalarQueryParameter("subreddit", "STRING", args.subreddit),
        bigquery.ScalarQueryParameter("match", "STRING", args.match),
        bigquery.ArrayQueryParameter("exclude_authors", "STRING", args.exclude_author),
    ]
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
        project = args.project or args.table.split(".")[0]
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

    def clean(self, body):
        """The cleaned text, or None when a rule drops the comment."""
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


def extract(args):
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    from google.cloud import bigquery
    from google.cloud.bigquery import retry as bigquery_retry
    from tqdm import tqdm

    client, endpoint = make_client(args)
    bucket = gcs_bucket(args.gcs_out, args.timeout) if args.gcs_out else None
    sql = query_text(args.table)
    retry = bigquery.DEFAULT_RETRY.with_timeout(args.timeout)
    job_retry = bigquery_retry.DEFAULT_JOB_RETRY.with_timeout(args.timeout)
    where = f"the BigQuery emulator at {endpoint}" if endpoint else f"BigQuery (project {client.project})"
    print(f"querying {args.table} on {where}", file=sys.stderr)
    try:
        # job_retry=None on insert: the client would otherwise wrap jobs.insert in its own 10-minute
        # retry, ignoring --timeout; result() below still restarts a query that failed transiently
        dry = client.query(sql, job_config=job_config(args, dry_run=True), retry=retry, job_retry=None,
                           timeout=args.timeout)
        print(check_cost(dry.total_bytes_processed or 0, args.max_gb), file=sys.stderr)
        if endpoint:
            print("  (an emulator has no cost model and reports 0; real BigQuery reports the true figure)",
                  file=sys.stderr)
        job = client.query(sql, job_config=job_config(args), retry=retry, job_retry=None, timeout=args.timeout)
        rows = job.result(max_results=args.limit, retry=retry, job_retry=job_retry, timeout=args.timeout)
        total = rows.total_rows if args.limit is None else min(rows.total_rows or 0, args.limit)
        if not total:
            raise UsageError(f"no rows matched in {args.table} (subreddit={args.subreddit!r}, "
                             f"match={args.match!r}, excluded authors={args.exclude_author})")

        cleaner = Cleaner(args.min_length)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                for row in tqdm(rows, total=total, unit=" rows", desc="reading comments",
                                disable=args.quiet, file=sys.stderr):
                    text = cleaner.clean(row["body"])
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
            os.replace(tmp, args.out)
        except BaseException:
            os.unlink(tmp)
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

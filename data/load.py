"""Load Reddit dump files (Pushshift / Arctic Shift .zst) into a BigQuery table of your own.

    python -m data.load AmItheAsshole_comments.zst --table MY-PROJECT.reddit.comments
    python -m data.load RS_2023-01.zst --table MY-PROJECT.reddit.posts --subreddit AmItheAsshole

A dump file is zstandard-compressed newline-delimited JSON, one comment or submission per line, written
with a 2 GiB window (`zstd --long=31`). It is streamed in bounded memory whatever the file holds: the
decoder holds up to that window, as zstd itself does; it is fed 128 compressed bytes at a time, which
expand to at most 4 MiB; a line is held only up to MAX_LINE bytes (a longer one is a bad line, dropped as
it comes); runs of empty lines are skipped without being held. Lines are split on bytes (so a chunk
boundary inside a UTF-8 character does no harm), checked, cut down to the fields data.extract uses, and
written as NDJSON chunks that load jobs (free, unlike streaming inserts) put into a staging table, sent
with load_table_from_file or, with --staging gs://..., from Cloud Storage.

Re-loading is idempotent: when a file is read completely, one MERGE on id inserts only the staged rows
whose id the table does not hold yet, and BigQuery applies a MERGE entirely or not at all. So the table
holds each id once, in the version loaded first (within a file, the first line with that id); loading a
file twice adds nothing; and a failed or interrupted file (Ctrl-C, a corrupt or truncated file) leaves the
table as it was before that file; the staging table is dropped either way (it also expires on its own
after a day). A file that yields no rows is an error (exit status 1), after the others are loaded.

The table is created when missing, partitioned by month on created_utc and clustered by subreddit_key
(the subreddit's name in lower case: BigQuery skips blocks only for a filter on the column itself, and
data.extract's --subreddit is case-insensitive), so a query for one subreddit and a few months reads only
their blocks. So is its dataset.
"""
import argparse
import json
import re
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from data.extract import (OneLineParser, UsageError, cloud_error_line, gcs_bucket, gcs_url, make_client,
                          positive_float, subreddit_name, table_name)

MAX_WINDOW = 2**31  # the archives are written with zstd --long=31; zstd's default limit is 2**27
READ_SIZE = 1 << 16  # compressed bytes per read from the file
# Compressed bytes per decompress call. zstd expands a byte to at most 32 KiB (a 4-byte RLE block
# of 128 KiB), so one call yields at most 4 MiB, however the file was made.
FEED_SIZE = 128
MAX_LINE = 10 * 10**6  # bytes; the longest Reddit body is 40,000 characters
EMPTY_LINES = re.compile(rb"\n*")  # matched, a run of newlines is skipped in C
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# The fields kept, with their BigQuery type. Required ones must be present and of the right type;
# optional ones may be missing or null. created_utc is seconds since 1970, as a number or a string of
# ASCII digits.
FIELDS = {
    "comments": {"id": "STRING", "subreddit": "STRING", "author": "STRING", "body": "STRING",
                 "score": "INTEGER", "created_utc": "TIMESTAMP", "link_id": "STRING", "parent_id": "STRING"},
    "posts": {"id": "STRING", "subreddit": "STRING", "author": "STRING", "title": "STRING", "selftext": "STRING",
              "score": "INTEGER", "num_comments": "INTEGER", "over_18": "BOOLEAN", "created_utc": "TIMESTAMP"},
}
KEY = "subreddit_key"  # added to every row: LOWER(subreddit), the clustering column
ORDER = "line_number"  # added to staged rows only: which of an id's lines came first
REQUIRED = {"comments": ("id", "subreddit", "author", "body", "score", "created_utc"),
            "posts": ("id", "subreddit", "author", "title", "score", "created_utc")}
PYTHON_TYPES = {"STRING": str, "INTEGER": int, "BOOLEAN": bool}
BAD_RULES = ("too long", "not JSON", "not an object", "missing field", "wrong type")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads has paired the others already
LAST_SECOND = 253402300800  # 10000-01-01: BigQuery's TIMESTAMP ends with year 9999


class BadLine(Exception):
    """A line that cannot be loaded; its argument is the rule it broke (one of BAD_RULES)."""


def seconds(value):
    """created_utc (1546300800, 1546300800.5 or "1546300800") as a float, or BadLine."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):  # not "1_546_300_800", " 1546300800", "١٥٤٦"
            raise BadLine("wrong type")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < LAST_SECOND:
        raise BadLine("wrong type")
    return float(value)


def timestamp_text(value):
    """Seconds since 1970 as TIMESTAMP text that BigQuery's JSON loader reads."""
    return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")


def parsed(line):
    """A dump line's JSON object, or BadLine."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError included; RecursionError: nested too deep
        raise BadLine("not JSON") from None
    if not isinstance(record, dict):
        raise BadLine("not an object")
    return record


def ndjson(row):
    """A row as one NDJSON line (bytes) and whether a lone surrogate ("\\ud83d", half an emoji, which
    real dumps contain) had to be replaced with U+FFFD to make it UTF-8."""
    text = json.dumps(row, ensure_ascii=False)
    try:
        return text.encode("utf-8") + b"\n", False
    except UnicodeEncodeError:
        return LONE_SURROGATE.sub("\ufffd", text).encode("utf-8") + b"\n", True


def convert(line, kind):
    """One dump line (bytes) as the row to load (a dict of the kind's fields), or BadLine."""
    record = parsed(line)
    row = {}
    for name, bq_type in FIELDS[kind].items():
        value = record.get(name)
        if value is None:
            if name in REQUIRED[kind]:
                raise BadLine("missing field")
        elif bq_type == "TIMESTAMP":
            value = seconds(value)
        elif type(value) is not PYTHON_TYPES[bq_type]:  # not isinstance: True is not a score
            raise BadLine("wrong type")
        row[name] = value
    row[KEY] = row["subreddit"].lower()
    return row


def dump_lines(path, progress=None):
    """Yield the lines of a zstandard dump file, reading it in small pieces: bytes without the newline,
    or None for a line longer than MAX_LINE (dropped as it comes, never held whole). Empty lines are
    skipped.

    Frames follow one another (a file may hold several). A file that is not zstandard, or that ends
    inside a frame, raises UsageError naming the file and the byte offset. progress(n) is called with the
    compressed bytes read.
    """
    import zstandard

    def new_frame():
        return zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompressobj()

    lines, offset, frame, frame_started = Lines(), 0, new_frame(), False
    with open(path, "rb") as f:
        while chunk := f.read(READ_SIZE):
            if offset == 0 and not chunk.startswith(ZSTD_MAGIC):
                raise UsageError(f"{path}: not a zstandard file (byte 0 is not a zstd frame; "
                                 "dump files end in .zst)")
            view = memoryview(chunk)
            for start in range(0, len(chunk), FEED_SIZE):
                piece = view[start:start + FEED_SIZE]
                while piece:
                    frame_started = True
                    try:
                        data = frame.decompress(piece)
                    except zstandard.ZstdError as e:
                        raise UsageError(f"{path}: corrupt zstandard data between bytes {offset:,} and "
                                         f"{offset + READ_SIZE:,}: {e}") from None
                    piece = b""
                    if frame.eof:  # the next frame starts in what this one left over
                        piece, frame, frame_started = frame.unused_data, new_frame(), False
                    yield from lines.cut(data)
            offset = f.tell()
            if progress:
                progress(offset)
    if frame_started:
        raise UsageError(f"{path}: truncated: the file ends at byte {offset:,} inside a zstd frame "
                         "(download it again)")
    yield from lines.end()  # a last line without a newline


class Lines:
    """Cuts decompressed pieces into lines, in time linear in their size: the unfinished line's pieces
    are joined once, when its newline comes, and kept only up to MAX_LINE bytes."""

    def __init__(self):
        self.pieces, self.size = [], 0  # the unfinished line; size counts what was dropped too

    def cut(self, data):
        first = data.find(b"\n")
        if first < 0:
            self.add(data)
            return
        self.add(data[:first])
        yield from self.end()
        start, last = first + 1, data.rfind(b"\n")
        while start < last:
            start = EMPTY_LINES.match(data, start, last).end()
            if start < last:
                end = data.find(b"\n", start, last + 1)
                yield data[start:end] if end - start <= MAX_LINE else None
                start = end + 1
        self.add(data[last + 1:])

    def add(self, data):
        self.size += len(data)
        if self.size > MAX_LINE:
            self.pieces = []
        elif data:
            self.pieces.append(data)

    def end(self):
        line = None if self.size > MAX_LINE else b"".join(self.pieces)
        self.pieces, self.size = [], 0  # let go of the pieces before the line is used
        if line != b"":
            yield line


def table_id(value):
    """PROJECT.DATASET.TABLE, as data.extract checks it, without a wildcard."""
    if value.endswith("*"):
        raise argparse.ArgumentTypeError(f"{value!r}: load into one table, not a wildcard")
    return table_name(value)


def parse_args(argv=None):
    p = OneLineParser(prog="python -m data.load",
                      description="Load Reddit dump files (.zst) into a BigQuery table.")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE",
                   help="Pushshift-format dump files: RC_YYYY-MM.zst, RS_YYYY-MM.zst, <subreddit>_comments.zst, ...")
    p.add_argument("--table", type=table_id, required=True, help="PROJECT.DATASET.TABLE; created when missing")
    p.add_argument("--kind", choices=sorted(FIELDS), help="what the files hold (default: detected from the records)")
    p.add_argument("--subreddit", action="append", type=subreddit_name, metavar="NAME",
                   help="keep only this subreddit (case-insensitive); repeatable (default: all)")
    p.add_argument("--staging", type=gcs_url, metavar="gs://BUCKET/PREFIX",
                   help="upload the NDJSON chunks there and load from Cloud Storage "
                        "(default: send them with the load job); the objects are deleted afterwards")
    p.add_argument("--chunk-mb", type=positive_float, default=1000,
                   help="NDJSON megabytes per chunk written to disk and loaded (default 1000)")
    p.add_argument("--project", help="project that runs the jobs (default: your credentials'; with an emulator, the table's)")
    p.add_argument("--endpoint", help="BigQuery API URL of an emulator (default: $BIGQUERY_EMULATOR_HOST, else BigQuery)")
    p.add_argument("--timeout", type=positive_float, default=300.0,
                   help="give up on one BigQuery or Cloud Storage call, retries included, after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for path in args.files:
        if not path.is_file():
            p.error(f"{path}: no such file")
    return args


def schema(kind):
    from google.cloud import bigquery
    return [bigquery.SchemaField(name, bq_type) for name, bq_type in [*FIELDS[kind].items(), (KEY, "STRING")]]


def staging_schema(kind):
    """The table's columns and the line number the row came from."""
    from google.cloud import bigquery
    return [*schema(kind), bigquery.SchemaField(ORDER, "INTEGER")]


def ensure_table(client, table, kind, calls, create=True):
    """Check that a table there has the kind's columns; else create it (with create), partitioned by month
    and clustered by subreddit_key."""
    from google.api_core.exceptions import NotFound
    from google.cloud import bigquery

    try:
        existing = client.get_table(table, **calls)
    except NotFound:
        if not create:
            return
        new = bigquery.Table(table, schema=schema(kind))
        new.time_partitioning = bigquery.TimePartitioning(type_=bigquery.TimePartitioningType.MONTH,
                                                          field="created_utc")
        new.clustering_fields = [KEY]
        client.create_table(new, **calls)
        return
    missing = {*FIELDS[kind], KEY} - {field.name for field in existing.schema}
    if missing:
        raise UsageError(f"{table} exists without the {kind} columns {', '.join(sorted(missing))}; "
                         f"load {kind} into another table")


def merge_sql(table, staging, kind):
    """Insert the staged rows whose id the table lacks; of an id repeated in the file, its first line.

    The match is on id alone, over the whole table: an edited or re-scraped record may carry another
    created_utc, so limiting the scan to the file's months (partitions) would let its id in twice."""
    columns = [*FIELDS[kind], KEY]
    return (f"MERGE `{table}` T\n"
            f"USING (SELECT * FROM `{staging}` WHERE TRUE "
            f"QUALIFY ROW_NUMBER() OVER (PARTITION BY id ORDER BY {ORDER}) = 1) S\n"
            "ON T.id = S.id\n"
            f"WHEN NOT MATCHED THEN INSERT ({', '.join(columns)}) VALUES ({', '.join('S.' + c for c in columns)})")


class Loader:
    """Loads dump files into one table through a staging table; see the module's docstring."""

    def __init__(self, args):
        from google.cloud import bigquery

        self.args = args
        self.client, _ = make_client(args)
        self.subreddits = {s.lower() for s in args.subreddit or []}
        self.bucket = gcs_bucket(args.staging, args.timeout) if args.staging else None
        self.prefix = args.staging.split("/", 3)[3].strip("/") if args.staging else None
        self.job = None  # the load job in progress, cancelled on Ctrl-C
        self.merged_anyway = False  # Ctrl-C came while a MERGE was finishing
        self.calls = {"retry": bigquery.DEFAULT_RETRY.with_timeout(args.timeout), "timeout": args.timeout}
        self.client.create_dataset(args.table.rsplit(".", 1)[0], exists_ok=True, **self.calls)

    def load_file(self, path):
        """Stage one file, then merge it into the table; return (kind, counts)."""
        counts = {"lines": 0, **dict.fromkeys(BAD_RULES, 0), "lone surrogates": 0, "other subreddits": 0,
                  "staged": 0, "added": 0}
        kind = self.args.kind
        staging = f"{self.args.table}__staging_{uuid.uuid4().hex[:12]}"
        chunk, chunk_bytes, staged = tempfile.TemporaryFile(), 0, []
        bar = self.progress_bar(path, counts)
        try:
            for line in dump_lines(path, bar.update_to if bar else None):
                if line is not None and not line.strip():
                    continue
                counts["lines"] += 1
                try:
                    if line is None:
                        raise BadLine("too long")
                    if kind is None:
                        kind = detected_kind(line)
                    row = convert(line, kind)
                except BadLine as e:
                    counts[e.args[0]] += 1
                    continue
                if self.subreddits and row[KEY] not in self.subreddits:
                    counts["other subreddits"] += 1
                    continue
                if counts["staged"] == 0:  # the first row: the kind is known, check the table now
                    ensure_table(self.client, self.args.table, kind, self.calls, create=False)
                    self.create_staging(staging, kind)
                row["created_utc"] = timestamp_text(row["created_utc"])
                row[ORDER] = counts["lines"]  # the MERGE keeps an id's first line
                data, repaired = ndjson(row)
                counts["lone surrogates"] += repaired
                chunk.write(data)
                chunk_bytes += len(data)
                counts["staged"] += 1
                if chunk_bytes >= self.args.chunk_mb * 10**6:
                    staged.append(self.stage(chunk, staging, kind, len(staged)))
                    chunk, chunk_bytes = tempfile.TemporaryFile(), 0
            if counts["staged"]:
                if chunk_bytes:
                    staged.append(self.stage(chunk, staging, kind, len(staged)))
                if self.bucket:  # every chunk in Cloud Storage: one load job
                    self.run_job(self.client.load_table_from_uri(staged, staging, job_config=load_config(kind),
                                                                 **self.calls))
                ensure_table(self.client, self.args.table, kind, self.calls)  # only now: a failed file leaves none
                counts["added"] = self.merge(staging, kind)
            return kind, counts
        finally:
            chunk.close()
            if bar is not None:
                bar.update_to(bar.n)  # the rows of the last read
                bar.close()
            self.clean_up(staging, staged if self.bucket else [])

    def run_job(self, job):
        self.job = job
        job.result(**self.calls)
        self.job = None
        return job

    def create_staging(self, staging, kind):
        from google.cloud import bigquery

        table = bigquery.Table(staging, schema=staging_schema(kind))
        table.expires = datetime.now(timezone.utc) + timedelta(days=1)  # gone a day later even if we are killed
        self.client.create_table(table, **self.calls)

    def stage(self, chunk, staging, kind, number):
        """One NDJSON chunk: loaded into the staging table now, or uploaded for one load job later (its URI)."""
        size = chunk.tell()
        chunk.seek(0)
        uri = None
        with chunk:
            if self.bucket:
                name = f"{self.prefix}/{staging.rsplit('.', 1)[1]}-{number:05d}.json"
                self.bucket.blob(name).upload_from_file(chunk, content_type="application/json",
                                                        timeout=self.args.timeout)
                uri = f"gs://{self.bucket.name}/{name}"
            else:
                self.run_job(self.client.load_table_from_file(chunk, staging, job_config=load_config(kind),
                                                              timeout=self.args.timeout))
        if not self.args.quiet:
            from tqdm import tqdm
            tqdm.write(f"  staged chunk {number + 1} ({size / 10**6:,.1f} MB){': ' + uri if uri else ''}",
                       file=sys.stderr)
        return uri

    def merge(self, staging, kind):
        """Insert the staged rows the table lacks; return how many. One statement: all or nothing."""
        job = self.client.query(merge_sql(self.args.table, staging, kind), job_retry=None, **self.calls)
        try:
            job.result(**self.calls)
        except KeyboardInterrupt:
            job.cancel(timeout=10)
            try:  # cancelling comes too late if the MERGE has finished: then its rows are in, all of them
                job.result(timeout=30)
                self.merged_anyway = True
            except Exception:  # noqa: BLE001 - cancelled (or unknown): the table is as it was
                pass
            raise
        return job.num_dml_affected_rows or 0

    def clean_up(self, staging, uris):
        if self.job is not None:  # interrupted: stop the load job
            try:
                self.job.cancel(timeout=10)
            except Exception:  # noqa: BLE001 - finished or unreachable: nothing to stop
                pass
            self.job = None
        self.client.delete_table(staging, not_found_ok=True, **self.calls)
        for uri in uris:
            self.bucket.blob(uri.split("/", 3)[3]).delete(timeout=self.args.timeout)

    def progress_bar(self, path, counts):
        """A bar over the compressed bytes read, with the time left and rows kept; None with --quiet."""
        if self.args.quiet:
            return None
        from tqdm import tqdm

        bar, began = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=path.name, file=sys.stderr), time.monotonic()

        def update_to(n):
            rate = counts["staged"] / max(time.monotonic() - began, 1e-9)
            bar.set_postfix_str(f"{counts['staged']:,} rows kept, {rate:,.0f} rows/s", refresh=False)
            bar.update(n - bar.n)
        bar.update_to = update_to
        return bar


def detected_kind(line):
    """comments or posts, from the first record of a file (BadLine when it is neither)."""
    record = parsed(line)
    if "body" in record:
        return "comments"
    if "title" in record:
        return "posts"
    raise BadLine("missing field")


def load_config(kind):
    from google.cloud import bigquery
    return bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON,
                                  schema=staging_schema(kind),
                                  write_disposition=bigquery.WriteDisposition.WRITE_APPEND)


def summary_lines(path, kind, counts):
    width = 28
    lines = [f"{path}: {kind or 'nothing loadable'}",
             f"  {'lines':<{width}}{counts['lines']:>12,}"]
    lines += [f"  {'bad: ' + rule:<{width}}{counts[rule]:>12,}" for rule in BAD_RULES]
    lines += [f"  {'repaired: lone surrogates':<{width}}{counts['lone surrogates']:>12,}",
              f"  {'skipped: other subreddits':<{width}}{counts['other subreddits']:>12,}",
              f"  {'staged':<{width}}{counts['staged']:>12,}",
              f"  {'added to the table':<{width}}{counts['added']:>12,}",
              f"  {'already there or repeated':<{width}}{counts['staged'] - counts['added']:>12,}"]
    return lines


def no_rows(path, kind, counts):
    """Why a file yielded no rows, as the error line's text; None when it did. kind: --kind, if given."""
    if counts["staged"]:
        return None
    if not counts["lines"]:
        return f"{path}: no rows: the file holds no lines"
    if counts["other subreddits"]:
        return f"{path}: no rows: none of its {counts['other subreddits']:,} records is of the --subreddit given"
    worst = max(BAD_RULES, key=counts.get)
    hint = ""
    if kind and counts["missing field"] == counts["lines"]:
        hint = f"; is it a file of {'posts' if kind == 'comments' else 'comments'}, not {kind}?"
    return f"{path}: no rows: all {counts['lines']:,} lines are bad (most: {worst}){hint}"


def main(argv=None):
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions

    args = parse_args(argv)
    path, loader, empty = None, None, []
    try:
        loader = Loader(args)
        for path in args.files:
            kind, counts = loader.load_file(path)
            print("\n".join(summary_lines(path, kind, counts)), flush=True)
            reason = no_rows(path, args.kind, counts)
            if reason:
                empty.append(reason)
    except UsageError as e:
        unchanged = f"; nothing from {path} was loaded" if path and str(path) in str(e) else ""
        print(f"error: {e}{unchanged}", file=sys.stderr)
        return 1
    except (api_exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError, OSError) as e:
        print(f"error: BigQuery: {cloud_error_line(e, args.timeout)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if loader is not None and loader.merged_anyway:
            print(f"interrupted; {args.table} had already taken in all of {path}", file=sys.stderr)
        else:
            print(f"interrupted; {args.table} is as it was before the file being loaded", file=sys.stderr)
        return 130
    for reason in empty:  # after the other files are in
        print(f"error: {reason}", file=sys.stderr)
    return 1 if empty else 0


if __name__ == "__main__":
    sys.exit(main())

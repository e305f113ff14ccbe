"""A local BigQuery emulator (bqemulator) with Reddit tables, for the tests and the demo.

    python -m data.emulator [--port 9050]

starts it, loads the bundled sample dump files (data/sample/reddit_comments.zst and
reddit_submissions.zst) with data.load into demo-project.reddit.comments and demo-project.reddit.posts,
prints how to point `python -m data.extract` at it, and runs until Ctrl-C.

bqemulator loads DuckDB's spatial extension at start-up and would download it; PyPI's
duckdb-extension-spatial package carries the file, which install_spatial() installs first, so
nothing is fetched from the network.

What the emulator does not model (see the notes in extract.py's output): a dry run reports
0 bytes (no cost model) and maximum_bytes_billed is accepted but never enforced.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SAMPLE_DIR = Path(__file__).with_name("sample")
SAMPLE_PROJECT = "demo-project"
SAMPLE = {SAMPLE_DIR / "reddit_comments.zst": "reddit.comments", SAMPLE_DIR / "reddit_submissions.zst": "reddit.posts"}
# The columns of fh-bigquery.reddit_comments (the layout before dump files) that create_table's callers fill.
SCHEMA = [("id", "STRING"), ("author", "STRING"), ("subreddit", "STRING"), ("body", "STRING"),
          ("score", "INTEGER"), ("created_utc", "INTEGER")]


def install_spatial():
    """INSTALL the spatial extension from the duckdb-extension-spatial wheel (no download)."""
    import duckdb
    import duckdb_extension_spatial

    package = Path(duckdb_extension_spatial.__file__).parent
    files = sorted(package.rglob("spatial.duckdb_extension"))
    if not files:
        raise EmulatorError(f"no spatial.duckdb_extension under {package}; reinstall duckdb-extension-spatial")
    with duckdb.connect() as con:
        con.execute(f"INSTALL '{files[-1]}'")
        con.execute("LOAD spatial")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class EmulatorError(Exception):
    """bqemulator could not be started; the message is one line, naming its log."""


class Emulator:
    """bqemulator in a subprocess on 127.0.0.1:port, in memory; use as a context manager."""

    def __init__(self, port=None, log_path=None, gcs_root=None):
        self.port = port or free_port()
        self.gcs_root = gcs_root  # load jobs read gs://BUCKET/PATH from GCS_ROOT/BUCKET/PATH
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="bqemulator-")) / "emulator.log"
        self.process = None

    def start(self, timeout=60):
        # something else answering on the port would pass the readiness check below
        if port_in_use(self.port):
            raise EmulatorError(f"port {self.port} is in use; choose another")
        install_spatial()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bqemulator", "start", "--rest-host", "127.0.0.1",
                 "--rest-port", str(self.port), "--grpc-host", "127.0.0.1", "--grpc-port", "0",
                 "--ephemeral", "--log-level", "warning", "--log-format", "console"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **({"BQEMU_GCS_LOCAL_ROOT": str(self.gcs_root)} if self.gcs_root else {})})
        try:
            self._wait_until_ready(timeout)
        except BaseException:  # Ctrl-C while starting, too: leave no emulator behind
            self.stop()
            raise
        return self

    def _wait_until_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/bigquery/v2/projects/probe/datasets", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise EmulatorError(f"bqemulator exited with status {self.process.returncode} while starting "
                                        f"on port {self.port}; see its log {self.log_path}")
                if time.monotonic() > deadline:
                    raise EmulatorError(f"bqemulator did not answer on port {self.port} within {timeout} s; "
                                        f"see its log {self.log_path}")
                time.sleep(0.2)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def client(self, project):
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery
        return bigquery.Client(project=project, credentials=AnonymousCredentials(),
                               client_options=ClientOptions(api_endpoint=self.url))

    def create_table(self, table_id, rows, schema=SCHEMA):
        """Create project.dataset.table (and its dataset) holding rows (dicts)."""
        from google.cloud import bigquery
        project, dataset, _ = table_id.split(".")
        client = self.client(project)
        client.create_dataset(f"{project}.{dataset}", exists_ok=True)
        table = client.create_table(
            bigquery.Table(table_id, schema=[bigquery.SchemaField(n, t) for n, t in schema]), exists_ok=True)
        # streaming inserts: a few hand-made rows for tests (dump files go through data.load and load jobs)
        for i in range(0, len(rows), 500):
            errors = client.insert_rows_json(table, rows[i:i + 500])
            if errors:
                raise RuntimeError(f"inserting into {table_id} failed: {errors[:3]}")
        return table_id

    def load_sample(self, project=SAMPLE_PROJECT):
        """Load the bundled dump files with data.load, as a user loads theirs; return {table_id: rows added}."""
        from data import load

        added = {}
        for path, table in SAMPLE.items():
            args = load.parse_args([str(path), "--table", f"{project}.{table}", "--endpoint", self.url, "--quiet"])
            added[args.table] = load.Loader(args).load_file(path)[1]["added"]
        return added


def interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM too leaves through the `with` block, which stops bqemulator


def main():
    from data.extract import whole_number

    p = argparse.ArgumentParser(prog="python -m data.emulator", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=whole_number, default=9050)
    args = p.parse_args()
    if not 0 < args.port < 65536:
        p.error("--port must be from 1 to 65535")
    signal.signal(signal.SIGTERM, interrupted)
    try:
        with Emulator(args.port) as emulator:
            for table, count in emulator.load_sample().items():
                print(f"{table}: {count:,} rows")
            print(f"BigQuery emulator on {emulator.url} (log {emulator.log_path}). Try:\n"
                  f"  BIGQUERY_EMULATOR_HOST={emulator.url} {os.path.basename(sys.executable)} -m data.extract "
                  f"--project {SAMPLE_PROJECT} --subreddit AmItheAsshole --match '(?i)\\bYTA\\b' --out /tmp/corpus.txt\n"
                  "Ctrl-C stops it.", flush=True)
            emulator.process.wait()
    except EmulatorError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

"""Base-model download against a local HTTP server that serves a tiny GPT-2 release in OpenAI's layout."""
import filecmp
import http.server
import os
import shutil
import threading
from collections import Counter

import pytest

from conftest import find_free_port, openai_layout, run_finetune, write_corpus

DATA = "model.ckpt.data-00000-of-00001"
FILES = ["checkpoint", "encoder.json", "hparams.json", DATA, "model.ckpt.index", "model.ckpt.meta",
         "vocab.bpe"]


class ModelServer(http.server.ThreadingHTTPServer):
    """Serves root/<model>/<file>; files named in break_once are cut off halfway the first time
    (full Content-Length promised, half the bytes sent, connection closed)."""

    def __init__(self, root, break_once=()):
        self.root = root
        self.break_once = set(break_once)
        self.requests = Counter()
        super().__init__(("127.0.0.1", 0), ModelHandler)


class ModelHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        rel = self.path.lstrip("/")
        server.requests[rel] += 1
        path = os.path.join(server.root, rel)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        body = open(path, "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        name = os.path.basename(rel)
        if name in server.break_once:
            server.break_once.discard(name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(root, break_once=()):
        server = ModelServer(str(root), break_once)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def release(tiny_run, tmp_path_factory):
    """A tiny GPT-2 release at <root>/124M/ (the name is what the CLI asks for; the shape is tiny)."""
    root = tmp_path_factory.mktemp("release")
    openai_layout(tiny_run, root / "124M")
    return root


def finetune_args(tmp_path, url=None):
    corpus = write_corpus(tmp_path / "corpus.txt")
    return ["--model", "124M", "--model-dir", tmp_path / "models", *(["--model-url", url] if url else []),
            "--dataset", corpus, "--steps", "2", "--accumulate-gradients", "1", "--sample-every", "0",
            "--run-name", "run1", "--checkpoint-dir", tmp_path / "checkpoint"]


def leftovers(*folders):
    return [p for f in folders if f.exists() for p in f.iterdir() if p.name.startswith(".")]


def test_broken_transfer_is_retried_and_incomplete_model_replaced(tmp_path, serve, release):
    # A models/124M left by an interrupted download (what gpt_2_simple.download_gpt2 can leave).
    (tmp_path / "models" / "124M").mkdir(parents=True)
    for name in FILES:
        data = (release / "124M" / name).read_bytes()
        (tmp_path / "models" / "124M" / name).write_bytes(data[: len(data) // 3] if name == DATA else data)

    server, url = serve(release, break_once=[DATA, "encoder.json"])
    # The mirror is named by the environment variable here, by --model-url elsewhere.
    result = run_finetune(*finetune_args(tmp_path), env=dict(os.environ, GPT2_MODEL_URL=url))
    assert result.returncode == 0, result.stderr
    assert "incomplete" in result.stdout and "downloading it again" in result.stdout
    assert "retrying" in result.stderr
    assert server.requests[f"124M/{DATA}"] == 2
    assert server.requests["124M/encoder.json"] == 2
    assert server.requests["124M/hparams.json"] == 1
    for name in FILES:
        assert filecmp.cmp(release / "124M" / name, tmp_path / "models" / "124M" / name, shallow=False)
    run = tmp_path / "checkpoint" / "run1"
    assert (run / "counter").read_text() == "2\n"
    assert (run / "weights" / "manifest.json").is_file()
    assert filecmp.cmp(release / "124M" / "encoder.json", run / "encoder.json", shallow=False)
    assert not leftovers(tmp_path / "models", tmp_path / "checkpoint")


def test_a_model_already_there_is_not_downloaded_again(tmp_path, serve, release):
    shutil.copytree(release / "124M", tmp_path / "models" / "124M")
    server, url = serve(release)
    result = run_finetune(*finetune_args(tmp_path, url))
    assert result.returncode == 0, result.stderr
    assert sum(server.requests.values()) == 0


def test_truncated_file_on_the_server_is_refused(tmp_path, serve, release):
    # The server itself holds a short data file (its Content-Length agrees): only the index can tell.
    bad = tmp_path / "bad_release"
    shutil.copytree(release, bad)
    data = (bad / "124M" / DATA).read_bytes()
    (bad / "124M" / DATA).write_bytes(data[:-4096])
    server, url = serve(bad)
    result = run_finetune(*finetune_args(tmp_path, url))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: model 124M downloaded from") and "broken" in lines[-1]
    assert DATA in lines[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "124M").exists()
    assert not (tmp_path / "checkpoint" / "run1").exists()
    assert not leftovers(tmp_path / "models", tmp_path / "checkpoint")


@pytest.mark.parametrize("where", ["closed port", "wrong path"])
def test_unreachable_model_url(tmp_path, serve, release, where):
    if where == "closed port":
        url = f"http://127.0.0.1:{find_free_port()}"
    else:
        _, url = serve(release)
        url += "/no/such/mirror"
    result = run_finetune(*finetune_args(tmp_path, url))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot download {url}/124M/checkpoint")
    assert ("404" in last) if where == "wrong path" else ("tried 3 times" in last)
    assert not (tmp_path / "models" / "124M").exists()
    assert not (tmp_path / "checkpoint" / "run1").exists()
    assert not leftovers(tmp_path / "models", tmp_path / "checkpoint")

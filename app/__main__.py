"""python -m app: load the model (or exit 1 saying what is wrong), then serve it on $PORT.

Logs are JSON lines. On SIGTERM (Cloud Run scaling in) the server stops accepting connections,
refuses the queued requests (503, Retry-After), lets the generation in flight run for up to
DRAIN_SECONDS, then stops it between tokens (503, or an `error` event for a stream), and the
process exits with status 0 well within Cloud Run's 10 s (app/server.py).

Exit statuses: 0 stopped by SIGTERM or Ctrl-C (while starting too: one log line, no traceback); 1 it
cannot start (a bad setting, model, HOST or PORT: one log line). The address is bound before anything
else, so that a PORT in use fails at once, before the model loads and before the "serving" line.

The model loads in a thread while the web stack is imported: llama.cpp reads the model without
holding the GIL, so with more than one CPU (the deploy's --cpu-boost gives an instance more while it
starts) the two overlap (docs/benchmarks-llama-server.md).
"""
import os
import signal
import socket
import sys
import threading
import time


class Loading(threading.Thread):
    """load(run_dir) in a thread of its own; result() waits for it, and raises what it raised."""

    def __init__(self, load, run_dir):
        super().__init__(name="load", daemon=True)
        self.load, self.run_dir, self.model, self.error = load, run_dir, None, None
        self.start()

    def run(self):
        try:
            self.model = self.load(self.run_dir)
        except Exception as e:
            self.error = e

    def result(self):
        self.join()
        if self.error:
            raise self.error
        return self.model


def stop_starting(sig, frame):
    """SIGTERM or Ctrl-C before the server runs (importing, loading the model): one log line and exit 0 at
    once, rather than a KeyboardInterrupt traceback from whatever import or load was in progress. The line
    is written by hand, as app.logs would write it: a signal handler must not import (nor wait for
    logging's locks, which the interrupted code may hold)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    os.write(2, f'{{"severity":"INFO","message":"stopped while starting ({signal.Signals(sig).name})",'
                f'"time":"{stamp}","logger":"app"}}\n'.encode())
    os._exit(0)


def bind(host, port):
    """Sockets bound to HOST and PORT for uvicorn to listen on, one per address HOST names (as asyncio's
    create_server binds them). Raises OSError, or UnicodeError for a HOST that IDNA cannot encode."""
    sockets = []
    for family, kind, proto, _, address in dict.fromkeys(
            socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)):
        sockets.append(sock := socket.socket(family, kind, proto))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    return sockets


def main():
    # First of all: the imports below take a quarter of a second on a busy machine, and Ctrl-C during
    # them is one line too. (Hence they are here, and only cheap ones at the top.)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_starting)
    import logging
    import logging.config

    from app import logs

    logging.config.dictConfig(logs.LOG_CONFIG)
    port, host = os.environ.get("PORT", "8080"), os.environ.get("HOST", "0.0.0.0")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):  # uvicorn would take 99999 as 34463
        logs.log(logging.ERROR, f"PORT must be a number from 1 to 65535, got {port!r}")
        sys.exit(1)
    try:
        sockets = bind(host, int(port))
    except (OSError, UnicodeError) as e:
        logs.log(logging.ERROR, f"cannot listen on HOST {host!r} PORT {port}: {getattr(e, 'strerror', None) or e}")
        sys.exit(1)
    from app.engine import GPT2, MODEL_DIR, ModelError

    loading = Loading(GPT2, MODEL_DIR)
    import uvicorn

    from app.main import app  # after the logging set-up: a bad setting there is logged
    from app.server import Server

    try:
        app.state.model = loading.result()
    except ModelError as e:
        logs.log(logging.ERROR, f"cannot serve {MODEL_DIR}: {e}")
        sys.exit(1)
    # uvicorn re-raises the signal that stopped it once it has shut down; exit 0 on it instead
    # (of dying by SIGTERM, or a KeyboardInterrupt traceback for Ctrl+C).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    # timeout_graceful_shutdown is a backstop: the drain ends the requests in flight before it. The
    # loop and HTTP parser are named rather than "auto", which takes uvloop and httptools wherever
    # they happen to be installed: the image has neither, and what is measured here is what it runs.
    config = uvicorn.Config(app, host=host, port=int(port), log_config=logs.LOG_CONFIG, access_log=False,
                            server_header=False, timeout_graceful_shutdown=8, loop="asyncio", http="h11")
    Server(config, app).run(sockets=sockets)


if __name__ == "__main__":
    main()

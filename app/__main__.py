"""python -m app: load the model (or exit 1 saying what is wrong), then serve it on $PORT.

Logs are JSON lines. On SIGTERM (Cloud Run scaling in) the server stops accepting connections,
refuses the queued requests (503, Retry-After), lets the generation in flight run for up to
DRAIN_SECONDS, then stops it between tokens (503, or an `error` event for a stream), and the
process exits with status 0 well within Cloud Run's 10 s (app/server.py).

The model loads in a thread while the web stack is imported: llama.cpp reads the model without
holding the GIL, so with more than one CPU (the deploy's --cpu-boost gives an instance more while it
starts) the two overlap (docs/benchmarks-llama-server.md).
"""
import logging
import logging.config
import os
import signal
import sys
import threading

from app import logs
from app.engine import GPT2, MODEL_DIR, ModelError


class Loading(threading.Thread):
    """GPT2(run_dir) in a thread of its own; result() waits for it, and raises what it raised."""

    def __init__(self, run_dir):
        super().__init__(name="load", daemon=True)
        self.run_dir, self.model, self.error = run_dir, None, None
        self.start()

    def run(self):
        try:
            self.model = GPT2(self.run_dir)
        except Exception as e:
            self.error = e

    def result(self):
        self.join()
        if self.error:
            raise self.error
        return self.model


def main():
    logging.config.dictConfig(logs.LOG_CONFIG)
    port = os.environ.get("PORT", "8080")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):  # uvicorn would take 99999 as 34463
        logs.log(logging.ERROR, f"PORT must be a number from 1 to 65535, got {port!r}")
        sys.exit(1)
    loading = Loading(MODEL_DIR)
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
    config = uvicorn.Config(app, host=os.environ.get("HOST", "0.0.0.0"), port=int(port), log_config=logs.LOG_CONFIG,
                            access_log=False, server_header=False, timeout_graceful_shutdown=8, loop="asyncio",
                            http="h11")
    Server(config, app).run()


if __name__ == "__main__":
    main()

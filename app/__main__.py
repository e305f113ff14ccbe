"""python -m app: load the model (or exit 1 saying what is wrong), then serve it on $PORT.

Logs are JSON lines. On SIGTERM (Cloud Run scaling in) the server stops accepting connections,
refuses the queued requests (503, Retry-After), lets the generation in flight run for up to
DRAIN_SECONDS, then stops it between tokens (503, or an `error` event for a stream), and the
process exits with status 0 well within Cloud Run's 10 s.
"""
import asyncio
import logging
import logging.config
import os
import signal
import sys

import uvicorn

from app import logs


class Server(uvicorn.Server):
    """uvicorn's server, which on the first SIGTERM or Ctrl+C drains the gate (see app.gate.Gate) before
    shutting down as uvicorn does: it stops accepting connections at once, but keeps answering the ones
    it has (503 to a generation and to /v2/health/ready, e.g. a keep-alive probe) until the generation
    in flight has ended. A second signal shuts down without waiting."""

    def __init__(self, config, app):
        super().__init__(config)
        self.app, self.draining = app, None

    def handle_exit(self, sig, frame):
        gate = getattr(self.app.state, "gate", None)
        if gate is None or self.draining:
            return super().handle_exit(sig, frame)
        self.draining = True  # a signal handler: the drain runs on the event loop
        gate.loop.call_soon_threadsafe(self.start_drain, gate, sig)

    def start_drain(self, gate, sig):
        self.draining = asyncio.ensure_future(self.drain(gate, sig))  # held: a task nobody holds may vanish

    async def drain(self, gate, sig):
        gate.drain()
        for server in self.servers:
            server.close()
        while gate.running:
            await asyncio.sleep(0.05)
        super().handle_exit(sig, None)


def main():
    logging.config.dictConfig(logs.LOG_CONFIG)
    port = os.environ.get("PORT", "8080")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):  # uvicorn would take 99999 as 34463
        logs.log(logging.ERROR, f"PORT must be a number from 1 to 65535, got {port!r}")
        sys.exit(1)
    from app.main import MODEL_DIR, app  # after the logging set-up: a bad setting there is logged
    from app.engine import GPT2, ModelError

    try:
        app.state.model = GPT2(MODEL_DIR)
    except ModelError as e:
        logs.log(logging.ERROR, f"cannot serve {MODEL_DIR}: {e}")
        sys.exit(1)
    # uvicorn re-raises the signal that stopped it once it has shut down; exit 0 on it instead
    # (of dying by SIGTERM, or a KeyboardInterrupt traceback for Ctrl+C).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    # timeout_graceful_shutdown is a backstop: the drain ends the requests in flight before it.
    config = uvicorn.Config(app, host=os.environ.get("HOST", "0.0.0.0"), port=int(port), log_config=logs.LOG_CONFIG,
                            access_log=False, server_header=False, timeout_graceful_shutdown=8)
    Server(config, app).run()


if __name__ == "__main__":
    main()

"""python -m app: load the model (or exit 1 saying what is wrong), then serve it on $PORT.

Logs are JSON lines. On SIGTERM (Cloud Run scaling in) uvicorn stops accepting connections, lets
the requests in flight finish (up to 9 s of Cloud Run's 10), and the process exits with status 0.
"""
import logging
import logging.config
import os
import signal
import sys

import uvicorn

from app import logs
from app.engine import GPT2, ModelError
from app.main import MODEL_DIR, app


def main():
    logging.config.dictConfig(logs.LOG_CONFIG)
    port = os.environ.get("PORT", "8080")
    if not (port.isdigit() and 0 < int(port) < 65536):  # uvicorn would quietly take 99999 as 34463
        logs.log(logging.ERROR, f"PORT must be a number from 1 to 65535, got {port!r}")
        sys.exit(1)
    try:
        app.state.model = GPT2(MODEL_DIR)
    except ModelError as e:
        logs.log(logging.ERROR, f"cannot serve {MODEL_DIR}: {e}")
        sys.exit(1)
    # uvicorn re-raises the signal that stopped it once it has shut down; exit 0 on it instead
    # (of dying by SIGTERM, or a KeyboardInterrupt traceback for Ctrl+C).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    config = uvicorn.Config(app, host=os.environ.get("HOST", "0.0.0.0"), port=int(port), log_config=logs.LOG_CONFIG,
                            access_log=False, server_header=False, timeout_graceful_shutdown=9)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()

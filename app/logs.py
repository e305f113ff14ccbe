"""JSON-lines logs, one object per line with a `severity` field (Cloud Logging's structured format)."""
import logging
import sys
import time

import ujson

logger = logging.getLogger("app")


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {
            "severity": record.levelname,  # DEBUG, INFO, WARNING, ERROR, CRITICAL: Cloud Logging's names
            "message": record.getMessage(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "logger": record.name,
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return ujson.dumps(entry, ensure_ascii=False, escape_forward_slashes=False)


def log(level, message, **fields):
    logger.log(level, message, extra={"fields": fields})


# For uvicorn.Config(log_config=...): uvicorn's own messages in the same format, no access log
# (the app writes one line per request itself).
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": JsonFormatter}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "loggers": {
        "app": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn.error": {"level": "INFO"},
        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        "py.warnings": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
    },
}


def setup():
    """Give the app's logger a JSON handler when nothing configured it (e.g. `uvicorn app.main:app`)."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

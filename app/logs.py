"""JSON-lines logs, one object per line with a `severity` field (Cloud Logging's structured format).
A request's own fields (its trace, see app/tracing.py) go into every line logged while serving it."""
import contextvars
import json
import logging
import os
import re
import sys
import time

import ujson

logger = logging.getLogger("app")
LOG_PROMPTS = os.environ.get("LOG_PROMPTS") == "1"  # else a request's log line has its texts' lengths only
TEXTS = ("prefix", "truncate", "stop", "user", "bad_words")  # what the user wrote: prompt, stop strings, OpenAI's
# user, banned words
# Characters that end a line for some line-based readers (Python's splitlines, JavaScript) but that JSON
# may leave raw: escaped, so that one log entry stays one line.
LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}
# Fields added to every line logged in this context: set per request (a contextvar follows the request's tasks).
context = contextvars.ContextVar("log_context", default={})


def private(params):
    """Generation parameters as logged: the user's texts (TEXTS) only as their lengths (`prefix_chars`;
    a list of lengths for `stop`), unless LOG_PROMPTS=1; a logit_bias as its number of entries (it may
    have thousands)."""
    if bias := params.get("logit_bias"):
        params = {k: v for k, v in params.items() if k != "logit_bias"} | {"logit_bias_entries": len(bias)}
    if LOG_PROMPTS:
        return params
    logged = {}
    for name, value in params.items():
        if name not in TEXTS:
            logged[name] = value
        elif value is not None:
            logged[f"{name}_chars"] = [len(v) for v in value] if isinstance(value, list) else len(value)
    return logged


def dumps(value):
    """JSON text that always encodes to UTF-8: a lone surrogate (e.g. a JSON key "\\ud800") becomes U+FFFD."""
    try:
        text = ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False)
    except UnicodeEncodeError:  # ujson refuses some (in keys), passes others through (in values)
        text = json.dumps(value, ensure_ascii=False)
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {
            "severity": record.levelname,  # DEBUG, INFO, WARNING, ERROR, CRITICAL: Cloud Logging's names
            "message": record.getMessage(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "logger": record.name,
        }
        entry.update(context.get())
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return dumps(entry).translate(LINE_BREAKS)


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
    """JSON lines for the app's logger and for warnings (a library's), when nothing configured
    them (e.g. `uvicorn app.main:app`; `python -m app` uses LOG_CONFIG)."""
    logging.captureWarnings(True)
    for name in ("app", "py.warnings"):
        target = logging.getLogger(name)
        if not target.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(JsonFormatter())
            target.addHandler(handler)
            target.setLevel(logging.INFO)
            target.propagate = False

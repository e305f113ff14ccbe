"""Logs that group by request in Cloud Logging: a request's trace (W3C `traceparent`, else Google's
`X-Cloud-Trace-Context`, which Cloud Run's front end adds) goes into every line logged while serving it,
as logging.googleapis.com/trace (projects/PROJECT/traces/TRACE_ID), logging.googleapis.com/spanId and
logging.googleapis.com/trace_sampled. PROJECT is GOOGLE_CLOUD_PROJECT, else, on Cloud Run only (K_SERVICE
set), the metadata server's answer, asked once at start and given up after METADATA_SECONDS in all; without
one, no trace fields are written (Cloud Logging needs the project in them).

A header that is malformed, or that a request carries twice (HTTP reads the two as one value joined by a
comma, which is no trace), is ignored, as W3C Trace Context's own test suite expects: then the other header
is used if it is valid. W3C: lower-case hex; version ff, an all-zero trace or parent id, and a version 00
header longer than its 55 characters are invalid; a later version may add fields after a "-". Google's
X-Cloud-Trace-Context: TRACE_ID[/SPAN_ID][;o=0|1], the trace id 32 hex digits (not all zero), the span id
a decimal number (ASCII digits) below 2**64, 0 meaning none."""
import logging
import os
import re
import threading
import urllib.request

from app import logs

TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
CLOUD_TRACE = re.compile(r"([0-9a-fA-F]{32})(?:/([0-9]{1,20}))?(?:;o=([01]))?")
METADATA_SECONDS = 1  # in all: a server that answers a byte at a time must not hold up the start


def project(environ=os.environ):
    """The Google Cloud project the logs belong to, or None."""
    if name := environ.get("GOOGLE_CLOUD_PROJECT"):
        return name
    if not environ.get("K_SERVICE"):
        return None  # not on Cloud Run: no metadata server to ask
    host = environ.get("GCE_METADATA_HOST", "metadata.google.internal")  # the variable google-auth reads too
    url = f"http://{host}/computeMetadata/v1/project/project-id"
    # urlopen's timeout bounds each read, not the whole answer: ask in a thread, wait for it that long in all.
    answer = []
    asking = threading.Thread(target=lambda: answer.append(ask(url)), name="metadata", daemon=True)
    asking.start()
    asking.join(METADATA_SECONDS)
    if not answer or answer[0] is None:
        why = "the question failed" if answer else f"no answer within {METADATA_SECONDS} s"
        logs.log(logging.WARNING, f"no project from the metadata server ({url}: {why}): the logs get no trace "
                 "fields (set GOOGLE_CLOUD_PROJECT)")
        return None
    return answer[0]


def ask(url):
    """The metadata server's answer (stripped), or None."""
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=METADATA_SECONDS) as answer:
            return answer.read(256).decode("ascii").strip() or None
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def trace_fields(headers, project_id):
    """Cloud Logging's trace fields for a request's headers (a dict of lower-case names), or {}."""
    if match := TRACEPARENT.fullmatch(headers.get("traceparent", "")):
        version, trace, span, flags, more = match.groups()
        if version != "ff" and not (version == "00" and more) and trace != "0" * 32 and span != "0" * 16:
            return fields(project_id, trace, span, int(flags, 16) & 1 == 1)
    if match := CLOUD_TRACE.fullmatch(headers.get("x-cloud-trace-context", "")):
        trace, span, sampled = match.groups()
        if int(trace, 16):
            span = f"{int(span):016x}" if span and 0 < int(span) < 2**64 else None  # decimal there, hex in the logs
            return fields(project_id, trace.lower(), span, sampled == "1")
    return {}


def fields(project_id, trace, span, sampled):
    result = {"logging.googleapis.com/trace": f"projects/{project_id}/traces/{trace}",
              "logging.googleapis.com/trace_sampled": sampled}
    if span:
        result["logging.googleapis.com/spanId"] = span
    return result


class Trace:
    """ASGI middleware: the request's trace fields in every log line made while serving it. It must be
    outside the request log (app.middleware.RequestLog), whose line it also marks."""

    def __init__(self, app, project_id):
        self.app, self.project_id = app, project_id

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.project_id:
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope["headers"]:
            if name in (b"traceparent", b"x-cloud-trace-context"):
                name, value = name.decode("latin-1"), value.decode("latin-1")
                headers[name] = f"{headers[name]},{value}" if name in headers else value  # twice: no trace
        token = logs.context.set(trace_fields(headers, self.project_id))
        try:
            await self.app(scope, receive, send)
        finally:
            logs.context.reset(token)

"""Logs that group by request in Cloud Logging: a request's trace (W3C `traceparent`, else Google's
`X-Cloud-Trace-Context`, which Cloud Run's front end adds) goes into every line logged while serving it,
as logging.googleapis.com/trace (projects/PROJECT/traces/TRACE_ID), logging.googleapis.com/spanId and
logging.googleapis.com/trace_sampled. PROJECT is GOOGLE_CLOUD_PROJECT, else, on Cloud Run only (K_SERVICE
set), the metadata server's answer, asked once at start with a short timeout; without one, no trace
fields are written (Cloud Logging needs the project in them)."""
import os
import re
import urllib.request

from app import logs

TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
CLOUD_TRACE = re.compile(r"([0-9a-fA-F]{32})(?:/(\d{1,20}))?(?:;o=([01]))?")
METADATA_SECONDS = 1


def project(environ=os.environ):
    """The Google Cloud project the logs belong to, or None."""
    if name := environ.get("GOOGLE_CLOUD_PROJECT"):
        return name
    if not environ.get("K_SERVICE"):
        return None  # not on Cloud Run: no metadata server to ask
    host = environ.get("GCE_METADATA_HOST", "metadata.google.internal")  # the variable google-auth reads too
    ask = urllib.request.Request(f"http://{host}/computeMetadata/v1/project/project-id",
                                 headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(ask, timeout=METADATA_SECONDS) as answer:
            return answer.read().decode("ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def trace_fields(headers, project_id):
    """Cloud Logging's trace fields for a request's headers (a dict of lower-case names), or {}."""
    if match := TRACEPARENT.fullmatch(headers.get("traceparent", "").strip()):
        trace, span, flags = match.groups()
        if trace != "0" * 32 and span != "0" * 16:  # all zeros is invalid in W3C trace context
            return fields(project_id, trace, span, int(flags, 16) & 1 == 1)
    if match := CLOUD_TRACE.fullmatch(headers.get("x-cloud-trace-context", "").strip()):
        trace, span, sampled = match.groups()
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
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
                   if name in (b"traceparent", b"x-cloud-trace-context")}
        token = logs.context.set(trace_fields(headers, self.project_id))
        try:
            await self.app(scope, receive, send)
        finally:
            logs.context.reset(token)

"""Prometheus metrics at GET /metrics (the text exposition format; METRICS=0 turns them off). They never
carry text, so /metrics stays open when API keys are set.

    gpt2_requests_total{route, method, status}   route is the route's template (/v2/models/{name}/infer),
                                                 so the label has as few values as there are routes; method
                                                 one of METHODS or `other`; status 499 for a client that
                                                 left (a stream's too, as in the log)
    gpt2_generation_seconds                      one generation, from its start to its last token
    gpt2_time_to_first_token_seconds             from the request's arrival (queueing included)
    gpt2_tokens_generated_total                  every sample's tokens
    gpt2_queue_length, gpt2_generations_in_flight
    gpt2_refused_total{reason}                   busy (429) and shutting_down (503)
    gpt2_client_disconnects_total
    gpt2_model_info{name, checkpoint, quant, n_ctx}
"""
import contextvars
import time

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics,
                               generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response

disable_created_metrics()  # no *_created series beside each counter and histogram: half the lines, no loss
REGISTRY = CollectorRegistry()
REQUESTS = Counter("gpt2_requests", "HTTP requests by route template, method and status",
                   ["route", "method", "status"], registry=REGISTRY)
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
GENERATION = Histogram("gpt2_generation_seconds", "Seconds one generation ran, first step to last token",
                       buckets=SECONDS, registry=REGISTRY)
FIRST_TOKEN = Histogram("gpt2_time_to_first_token_seconds", "Seconds from a request's arrival to its first token",
                        buckets=(0.01, 0.025, *SECONDS), registry=REGISTRY)
TOKENS = Counter("gpt2_tokens_generated", "Tokens generated, every sample counted", registry=REGISTRY)
QUEUE = Gauge("gpt2_queue_length", "Requests waiting for the generation in flight", registry=REGISTRY)
IN_FLIGHT = Gauge("gpt2_generations_in_flight", "Generations running (one at a time)", registry=REGISTRY)
REFUSED = Counter("gpt2_refused", "Generation requests refused: busy (429) or shutting down (503)", ["reason"],
                  registry=REGISTRY)
DISCONNECTS = Counter("gpt2_client_disconnects", "Clients that hung up before their answer was complete",
                      registry=REGISTRY)
MODEL = Info("gpt2_model", "The served model", registry=REGISTRY)

# HTTP's methods (RFC 9110 and PATCH): any other is counted as "other", so that made-up methods (each
# answered 405) cannot add series without bound. Every label takes its values from a fixed set.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})

# The request being served, for Timing: its arrival time, and whether its first token came.
_request = contextvars.ContextVar("metrics_request", default=None)


class Timing:
    """One generation's clock (app.gate.steps makes one as it starts, calls token() per token and done()
    at the end): the generation's seconds and, once per request, its time to first token."""

    def __init__(self):
        self.started = time.perf_counter()

    def token(self):
        timing = _request.get()
        if timing is not None and not timing["first_token"]:
            timing["first_token"] = True
            FIRST_TOKEN.observe(time.perf_counter() - timing["arrived"])

    def done(self):
        if _request.get() is not None:
            GENERATION.observe(time.perf_counter() - self.started)


def templates(routes):
    """Each route's endpoint (what Starlette puts in scope["endpoint"]) -> its path template."""
    return {getattr(route, "endpoint", getattr(route, "app", None)): route.path or "/" for route in routes}


class Metrics:
    """ASGI middleware counting each request by route template and status, and what the protocols
    logged of it (request.state.log: tokens, busy, shutting down, disconnected)."""

    def __init__(self, app, routes):
        self.app, self.templates = app, templates(routes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        token = _request.set({"arrived": time.perf_counter(), "first_token": False})
        try:
            await self.app(scope, receive, send_status)
        finally:
            _request.reset(token)
            route = self.templates.get(scope.get("endpoint"), "other")  # "other": no route (404)
            method = scope["method"] if scope["method"] in METHODS else "other"
            fields = scope.get("state", {}).get("log", {})
            if fields.get("disconnected"):  # a stream's 200 went out before its client left (as RequestLog)
                status[0] = 499
            REQUESTS.labels(route, method, str(status[0])).inc()
            TOKENS.inc(fields.get("tokens", 0))
            if fields.get("error") in ("busy", "shutting down"):
                REFUSED.labels(fields["error"].replace(" ", "_")).inc()
            if fields.get("disconnected"):
                DISCONNECTS.inc()


async def route(request):
    state = request.app.state
    QUEUE.set(len(state.gate.waiting))
    IN_FLIGHT.set(1 if state.gate.running else 0)
    model = state.model
    MODEL.info({"name": state.name, "checkpoint": model.manifest["checkpoint"],
                "quant": str(model.manifest.get("quant", "")), "n_ctx": str(model.n_ctx)})
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def paths(state):
    """The OpenAPI description of /metrics."""
    return {"/metrics": {"get": {"summary": "Prometheus metrics (text exposition format)", "operationId": "metrics",
                                 "responses": {"200": {"description": "OK",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}}}

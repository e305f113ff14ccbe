"""The HTTP API: GET / and POST / generate text, HEAD / answers without generating, GET /limits,
and the HTML page at /ui/. One generation at a time per process; a few requests wait, more get 429.

    uvicorn app.main:app      (or `python -m app`, which also sets up JSON logs and clean shutdown)

Settings come from the environment: MODEL_DIR (default checkpoint/run1), ALLOWED_ORIGINS (comma
separated, default *), QUEUE_SIZE (requests that may wait, default 4), PREFIX_MAX_CHARS (default 500).
"""
import asyncio
import contextlib
import logging
import math
import os
import time
from pathlib import Path
from urllib.parse import parse_qsl

import ujson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from app import logs
from app.engine import GPT2, MAX_NSAMPLES, Generation
from app.logs import log
from app.params import ParamError, limits, parameters, parse


def env_int(name, default):
    value = os.environ.get(name, str(default))
    if not value.isdigit():
        raise SystemExit(f"{name} must be a whole number, got {value!r}")
    return int(value)


MODEL_DIR = os.environ.get("MODEL_DIR", "checkpoint/run1")
ALLOWED_ORIGINS = [o.strip() for o in os.environ.get("ALLOWED_ORIGINS", "*").split(",") if o.strip()]
QUEUE_SIZE = env_int("QUEUE_SIZE", 4)
PREFIX_MAX_CHARS = env_int("PREFIX_MAX_CHARS", 500)
BODY_MAX_BYTES = 16 * 1024
STATIC_DIR = Path(__file__).parent / "static"


class UJSONResponse(JSONResponse):
    def render(self, content):
        return ujson.dumps(content, ensure_ascii=False, escape_forward_slashes=False).encode("utf-8")


def error(status, message, parameter=None, headers=None):
    return UJSONResponse({"error": message, "parameter": parameter}, status, headers=headers)


# ---------------------------------------------------------------- one generation at a time


class Busy(Exception):
    pass


class Gate:
    """One generation at a time; up to `size` requests wait their turn (in order), more are refused."""

    def __init__(self, size):
        self.size = size
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.typical_seconds = 2.0  # a running average, for Retry-After

    async def enter(self):
        if self.lock.locked() and self.waiting >= self.size:
            raise Busy()
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1

    def leave(self, seconds=None):
        if seconds:
            self.typical_seconds = 0.7 * self.typical_seconds + 0.3 * seconds
        self.lock.release()

    def retry_after(self):
        return max(1, math.ceil(self.typical_seconds * (self.waiting + 1)))


# ---------------------------------------------------------------- reading parameters


def query_params(raw):
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict", max_num_fields=20)
    except UnicodeDecodeError:
        raise ParamError("the query string is not valid UTF-8 (percent-encode UTF-8 text)") from None
    except ValueError:
        raise ParamError("the query string has too many fields (at most 20)") from None
    given = {}
    for name, value in pairs:
        if name in given:
            raise ParamError(f"{name} is given more than once", name)
        given[name] = value
    return given


async def json_params(request):
    if request.scope["query_string"]:
        first = next(iter(query_params(request.scope["query_string"])), None)
        raise ParamError("POST takes its parameters in the JSON body, not in the query string", first)
    size = request.headers.get("content-length", "0")
    if size.isdigit() and int(size) > BODY_MAX_BYTES:
        raise ParamError(f"the body is {size} bytes; at most {BODY_MAX_BYTES} are allowed", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > BODY_MAX_BYTES:
            raise ParamError(f"the body is over {BODY_MAX_BYTES} bytes; at most {BODY_MAX_BYTES} are allowed",
                             status=413)
    if not body.strip():
        return {}  # a bare POST: every parameter at its default
    if not is_utf8_json(request.headers.get("content-type", "")):
        raise ParamError("POST / takes a JSON object with Content-Type: application/json (UTF-8)", status=415)
    try:
        data = ujson.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError:
        raise ParamError("the body is not valid UTF-8") from None
    except ValueError as e:
        raise ParamError(f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ParamError('the body must be a JSON object, e.g. {"length": 50, "temperature": 0.7}')
    return data


def is_utf8_json(content_type):
    """application/json, with no charset or a UTF-8 one (other parameters allowed)."""
    media_type, *options = content_type.lower().split(";")
    charsets = [value.strip().strip('"') for name, _, value in (o.partition("=") for o in options)
                if name.strip() == "charset"]
    return media_type.strip() == "application/json" and all(c in ("utf-8", "utf8") for c in charsets)


def prompt_for(model, values):
    """The prefix as token ids (gpt-2-simple starts from <|endoftext|> without one), checked against n_ctx."""
    prefix = values["prefix"]
    if not prefix:
        prompt = [model.tokenizer.end_token]
    else:
        prompt = model.tokenizer.encode(prefix)
        if model.tokenizer.decode(prompt) != prefix:
            raise ParamError("prefix has characters the model's vocabulary cannot encode", "prefix")
    room = model.n_ctx - len(prompt)
    if room < 1:
        raise ParamError(f"prefix is {len(prompt)} tokens; prefix and length together can be at most "
                         f"{model.n_ctx} tokens (the model's context)", "prefix")
    if values["length"] > room:
        raise ParamError(f"length must be at most {room} with this prefix ({len(prompt)} tokens): prefix and "
                         f"length together can be at most {model.n_ctx} tokens (the model's context)", "length")
    return prompt


async def client_left(request):
    try:
        if request.method == "GET":
            await request.body()  # take the empty body, so that the next receive reports a disconnect
        return await request.is_disconnected()
    except ClientDisconnect:
        return True


# ---------------------------------------------------------------- routes


async def generate(request):
    if request.method == "HEAD":  # uptime checks: alive and loaded, nothing generated
        return Response(status_code=200, media_type="application/json")
    state = request.app.state
    try:
        given = query_params(request.scope["query_string"]) if request.method == "GET" else await json_params(request)
        values = parse(state.table, given)
        prompt = prompt_for(state.model, values)
    except ParamError as e:
        request.state.log = {"error": e.message, "parameter": e.parameter}
        return error(e.status, e.message, e.parameter)
    except ClientDisconnect:
        return Response(status_code=499)  # the client left while sending; nobody is listening

    request.state.log = fields = {"params": values, "prompt_tokens": len(prompt)}
    try:
        await state.gate.enter()
    except Busy:
        retry = state.gate.retry_after()
        fields["error"] = "busy"
        return UJSONResponse({"error": f"busy: one generation runs at a time and {state.gate.size} are waiting; "
                                       f"retry in {retry} s", "retry_after": retry},
                             429, headers={"Retry-After": str(retry)})
    generation = Generation(state.model, prompt, **{k: v for k, v in values.items() if k != "stream"})
    if values["stream"]:
        return GenerationStream(generation, state.gate, fields)
    try:
        if await client_left(request):  # gave up while waiting in the queue
            fields["disconnected"] = True
            return Response(status_code=499)
        result = await run_in_threadpool(generation.run)
    finally:
        state.gate.leave(generation.result and generation.result["seconds"])
    fields.update({k: result[k] for k in ("tokens", "stop_reason", "seconds")})
    return UJSONResponse(result)


def sse(data, event=None):
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {ujson.dumps(data, ensure_ascii=False, escape_forward_slashes=False)}\n\n"


class GenerationStream(StreamingResponse):
    """Server-Sent Events for one generation: a `data: {"text": piece}` event per new piece, then
    `event: done` with the full answer. However it ends (done, error, client gone), the model and
    the gate are freed: a step in a worker thread always completes before anything is closed."""

    def __init__(self, generation, gate, fields):
        self.generation, self.steps, self.gate, self.fields = generation, iter(generation), gate, fields
        super().__init__(self.events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(self):
        try:
            while (piece := await run_in_threadpool(next, self.steps, None)) is not None:
                if piece:
                    yield sse({"text": piece})
        except Exception:
            logs.logger.exception("generation failed")
            self.fields["error"] = "generation failed"
            yield sse({"error": "the generation failed (an internal error, logged on the server)"}, "error")
            return
        yield sse(self.generation.result, "done")

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.steps.close()  # releases the model if the client left mid-way
            result = self.generation.result
            self.gate.leave(result and result["seconds"])
            if result:
                self.fields.update({k: result[k] for k in ("tokens", "stop_reason", "seconds")})
            elif "error" not in self.fields:  # the client left: say how far it got
                self.fields.update(disconnected=True, tokens=len(self.generation.samples[0].ids))


async def limits_route(request):
    state = request.app.state
    model = state.model
    return UJSONResponse(limits(state.table, prefix_max_chars=PREFIX_MAX_CHARS, n_ctx=model.n_ctx,
                                n_vocab=model.n_vocab, queue_size=QUEUE_SIZE, body_max_bytes=BODY_MAX_BYTES,
                                checkpoint=model.manifest["checkpoint"]))


async def http_error(request, exc):
    if exc.status_code == 404:
        message = f"no such path {request.url.path}; the API is / (GET, POST, HEAD), /limits and /ui/"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {(exc.headers or {}).get('Allow', 'GET')}"
    else:
        message = exc.detail
    return error(exc.status_code, message, headers=exc.headers)


async def server_error(request, exc):
    return error(500, "internal error (logged on the server)")


# ---------------------------------------------------------------- the app


class RequestLog:
    """One JSON log line per request: method, path, status, latency, plus what the route added."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            fields = scope.get("state", {}).get("log", {})
            level = logging.INFO if status[0] < 400 else logging.WARNING if status[0] < 500 else logging.ERROR
            latency = time.perf_counter() - started
            path = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope["query_string"] else "")
            log(level, f"{scope['method']} {scope['path']} {status[0]}",
                httpRequest={"requestMethod": scope["method"], "requestUrl": path[:500], "status": status[0],
                             "latency": f"{latency:.3f}s"}, **fields)


@contextlib.asynccontextmanager
async def lifespan(app):
    logs.setup()
    if getattr(app.state, "model", None) is None:  # `python -m app` loads it before binding the port
        app.state.model = GPT2(MODEL_DIR)
    model = app.state.model
    app.state.table = parameters(model.n_ctx, model.n_vocab, PREFIX_MAX_CHARS, MAX_NSAMPLES)
    app.state.gate = Gate(QUEUE_SIZE)
    log(logging.INFO, f"serving {model.run_dir} ({model.manifest['checkpoint']})", n_layer=model.n_layer,
        n_embd=model.n_embd, n_ctx=model.n_ctx, n_vocab=model.n_vocab, allowed_origins=ALLOWED_ORIGINS)
    yield
    log(logging.INFO, "shut down")


routes = [
    Route("/", generate, methods=["GET", "HEAD", "POST"]),
    Route("/limits", limits_route, methods=["GET"]),
    Mount("/ui", StaticFiles(directory=STATIC_DIR, html=True, check_dir=False), name="ui"),
]

middleware = [
    Middleware(RequestLog),
    Middleware(CORSMiddleware, allow_origins=ALLOWED_ORIGINS, allow_methods=["GET", "HEAD", "POST"],
               allow_headers=["Content-Type"], expose_headers=["Retry-After"], max_age=600),
]

app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                exception_handlers={HTTPException: http_error, Exception: server_error})

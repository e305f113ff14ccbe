"""The HTTP API: GET / and POST / generate text, HEAD / answers without generating, GET /limits,
and the HTML page at /ui/. One generation at a time per process; a few requests wait, more get 429.

    uvicorn app.main:app      (or `python -m app`, which also sets up JSON logs and clean shutdown)

Settings come from the environment: MODEL_DIR (default checkpoint/run1), ALLOWED_ORIGINS (comma
separated, default *), QUEUE_SIZE (requests that may wait, default 4), PREFIX_MAX_CHARS (default 500),
LOG_PROMPTS (1: log prompts; see app/logs.py).

Every generating route does the same: read_body (before the gate), gate.enter() (Busy -> busy(),
ShuttingDown -> shutting_down()), then `run` or `steps` (ClientLeft, ShuttingDown), then gate.leave().
"""
import asyncio
import base64
import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.datastructures import MutableHeaders
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
    if not (value.isascii() and value.isdigit()):  # isdigit() alone takes "²" and "١٢"
        logs.setup()
        log(logging.ERROR, f"{name} must be a whole number, got {value!r}")
        raise SystemExit(1)
    return int(value)


MODEL_DIR = os.environ.get("MODEL_DIR", "checkpoint/run1")
ALLOWED_ORIGINS = [o.strip() for o in os.environ.get("ALLOWED_ORIGINS", "*").split(",") if o.strip()]
QUEUE_SIZE = env_int("QUEUE_SIZE", 4)
PREFIX_MAX_CHARS = env_int("PREFIX_MAX_CHARS", 500)
BODY_MAX_BYTES = 16 * 1024
BODY_SECONDS = 10  # the whole body must arrive within this, or 408
DRAIN_SECONDS = 5  # after SIGTERM, a generation in flight may go on this long; Cloud Run kills at 10 s
CHECK_SECONDS = 0.25  # how often a long token is interrupted to check for a departed client or SIGTERM
STATIC_DIR = Path(__file__).parent / "static"


class UJSONResponse(JSONResponse):
    def render(self, content):
        return logs.dumps(content).encode("utf-8")


def error(status, message, parameter=None, headers=None):
    return UJSONResponse({"error": message, "parameter": parameter}, status, headers=headers)


# ---------------------------------------------------------------- one generation at a time


class Busy(Exception):
    """Refused: a generation is running and the queue is full."""


class ShuttingDown(Exception):
    """Refused or stopped: the server got SIGTERM (see Gate.drain)."""


class ClientLeft(Exception):
    """The client hung up before its answer was ready."""


class Gate:
    """One generation at a time; up to `size` requests wait their turn (in order), more are refused.

    drain() (on SIGTERM) refuses the waiting at once and anyone new, and sets the deadline at which
    the generation running stops between tokens (see `steps`), so that the process exits within
    Cloud Run's 10 s."""

    def __init__(self, size):
        self.size = size
        self.running = False
        self.waiting = collections.deque()  # one future per waiting request, first come first served
        self.typical_seconds = 2.0  # a running average, for Retry-After
        self.deadline = None  # time.monotonic() at which a generation in flight stops; set by drain()
        self.loop = asyncio.get_running_loop()

    async def enter(self):
        if self.deadline is not None:
            raise ShuttingDown()
        if not self.running:
            self.running = True
            return
        if len(self.waiting) >= self.size:
            raise Busy()
        turn = self.loop.create_future()
        self.waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.leave()  # the turn came as this request was cancelled: pass it on
            elif turn in self.waiting:
                self.waiting.remove(turn)
            raise

    def leave(self, seconds=None):
        if seconds:
            self.typical_seconds = 0.7 * self.typical_seconds + 0.3 * seconds
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.running = False

    def drain(self, seconds=DRAIN_SECONDS):
        self.deadline = time.monotonic() + seconds
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_exception(ShuttingDown())

    def stopping(self):
        return self.deadline is not None and time.monotonic() >= self.deadline

    def retry_after(self):
        return max(1, math.ceil(self.typical_seconds * (len(self.waiting) + 1)))


_DONE = object()


async def steps(request, generation, gate):
    """Run `generation` in a worker thread and yield its new text piece by piece. The caller holds the gate.

    It stops with ClientLeft when the client hung up, or ShuttingDown once the drain deadline passed
    (checked between tokens, and every CHECK_SECONDS during a long one); the thread then ends after
    the token it is on. Use it with contextlib.aclosing, so that the thread is told to stop however
    the caller ends."""
    if await request.is_disconnected():
        raise ClientLeft()  # gave up while waiting in the queue
    loop = asyncio.get_running_loop()
    pieces = asyncio.Queue()
    stop = threading.Event()

    def put(item):
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the process is exiting
            loop.call_soon_threadsafe(pieces.put_nowait, item)

    def work():
        try:
            for piece in generation:
                if stop.is_set():
                    return
                put(piece)
        except Exception as e:
            put(e)
        else:
            put(_DONE)

    threading.Thread(target=work, name="generation", daemon=True).start()
    try:
        while True:
            try:
                piece = await asyncio.wait_for(pieces.get(), CHECK_SECONDS)
            except TimeoutError:
                piece = None
            if gate.stopping():
                raise ShuttingDown()
            if await request.is_disconnected():
                raise ClientLeft()
            if piece is _DONE:
                return
            if isinstance(piece, Exception):
                raise piece
            if piece is not None:
                yield piece
    finally:
        stop.set()


async def run(request, generation, gate):
    """The whole answer, generated between the same checks as a stream (see `steps`)."""
    async with contextlib.aclosing(steps(request, generation, gate)) as pieces:
        async for _ in pieces:
            pass
    return generation.result


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


async def read_body(request):
    """The body, read before the gate so that a slow or silent sender never holds it: at most
    BODY_MAX_BYTES, within BODY_SECONDS. GET and HEAD take none (refused unread)."""
    size = request.headers.get("content-length", "0")
    if request.method in ("GET", "HEAD") and (size != "0" or "transfer-encoding" in request.headers):
        raise ParamError(f"{request.method} takes no body: put the parameters in the query string, "
                         "or POST them as JSON")
    if size.isascii() and size.isdigit() and int(size) > BODY_MAX_BYTES:
        raise ParamError(f"the body is {size} bytes; at most {BODY_MAX_BYTES} are allowed", status=413)
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_SECONDS):
            async for chunk in request.stream():
                body += chunk
                if len(body) > BODY_MAX_BYTES:
                    raise ParamError(f"the body is over {BODY_MAX_BYTES} bytes; at most {BODY_MAX_BYTES} are "
                                     "allowed", status=413)
    except TimeoutError:
        raise ParamError(f"the body did not arrive within {BODY_SECONDS} s", status=408) from None
    return bytes(body)


def json_params(request, body):
    if request.scope["query_string"]:
        first = next(iter(query_params(request.scope["query_string"])), None)
        raise ParamError("POST takes its parameters in the JSON body, not in the query string", first)
    if not body.strip():
        return {}  # a bare POST: every parameter at its default
    if not is_utf8_json(request.headers.get("content-type", "")):
        raise ParamError(f"POST {request.url.path} takes a JSON object with Content-Type: application/json (UTF-8)",
                         status=415)
    try:
        data = json.loads(body.decode("utf-8"), object_pairs_hook=unique_keys)
    except UnicodeDecodeError:
        raise ParamError("the body is not valid UTF-8") from None
    except ValueError as e:
        raise ParamError(f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise ParamError("the body is not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ParamError('the body must be a JSON object, e.g. {"length": 50, "temperature": 0.7}')
    return data


def unique_keys(pairs):
    """A JSON object's pairs as a dict; a repeated key is refused, as a repeated query parameter is."""
    given = {}
    for name, value in pairs:
        if name in given:
            raise ParamError(f"{name} is given more than once", name)
        given[name] = value
    return given


def is_utf8_json(content_type):
    """application/json, with no charset or a UTF-8 one (other parameters allowed)."""
    media_type, *options = content_type.lower().split(";")
    charsets = [value.strip().strip('"') for name, _, value in (o.partition("=") for o in options)
                if name.strip() == "charset"]
    return media_type.strip() == "application/json" and all(c in ("utf-8", "utf8") for c in charsets)


def prompt_for(model, values):
    """The prefix as token ids (gpt-2-simple starts from <|endoftext|> without one), checked against n_ctx:
    all samples together hold at most n_ctx tokens, prefix included, which bounds a request's memory
    (its share of the key/value cache) and its time."""
    prefix, nsamples = values["prefix"], values["nsamples"]
    if not prefix:
        prompt = [model.tokenizer.end_token]
    else:
        prompt = model.tokenizer.encode(prefix)
        if model.tokenizer.decode(prompt) != prefix:
            raise ParamError("prefix has characters the model's vocabulary cannot encode", "prefix")
    context = model.n_ctx // nsamples
    budget = f"{model.n_ctx} tokens (the model's context)" if nsamples == 1 else \
        f"{context} tokens with nsamples={nsamples} (the model's context, {model.n_ctx}, shared by the samples)"
    room = context - len(prompt)
    if room < 1:
        raise ParamError(f"prefix is {len(prompt)} tokens; prefix and length together can be at most {budget}",
                         "prefix")
    if values["length"] > room:
        raise ParamError(f"length must be at most {room} with this prefix ({len(prompt)} tokens): prefix and "
                         f"length together can be at most {budget}", "length")
    return prompt


# ---------------------------------------------------------------- routes


async def generate(request):
    state = request.app.state
    try:
        body = await read_body(request)
        if request.method == "HEAD":  # uptime checks: alive and loaded, nothing generated
            return Response(status_code=200, media_type="application/json")
        given = query_params(request.scope["query_string"]) if request.method == "GET" else json_params(request, body)
        values = parse(state.table, given)
        prompt = prompt_for(state.model, values)
    except ParamError as e:
        request.state.log = {"error": e.message, "parameter": e.parameter}
        return error(e.status, e.message, e.parameter)
    except ClientDisconnect:
        return Response(status_code=499)  # the client left while sending; nobody is listening

    request.state.log = fields = {"params": logs.private(values), "prompt_tokens": len(prompt)}
    generation = Generation(state.model, prompt, **{k: v for k, v in values.items() if k != "stream"})
    try:
        await state.gate.enter()
    except Busy:
        return busy(state.gate, fields)
    except ShuttingDown:
        return shutting_down(fields)
    if values["stream"]:
        return GenerationStream(request, generation, state.gate, fields)
    try:
        result = await run(request, generation, state.gate)
    except ClientLeft:
        fields.update(disconnected=True, tokens=tokens_so_far(generation))
        return Response(status_code=499)
    except ShuttingDown:
        fields["tokens"] = tokens_so_far(generation)
        return shutting_down(fields)
    finally:
        state.gate.leave(generation.result and generation.result["seconds"])
    fields.update({k: result[k] for k in ("tokens", "stop_reason", "seconds")})
    return UJSONResponse(result)


def busy(gate, fields):
    retry = gate.retry_after()
    fields["error"] = "busy"
    return UJSONResponse({"error": f"busy: one generation runs at a time and {gate.size} are waiting; "
                                   f"retry in {retry} s", "retry_after": retry},
                         429, headers={"Retry-After": str(retry)})


SHUTDOWN_ERROR = {"error": "the server is shutting down; retry in 1 s", "retry_after": 1}


def shutting_down(fields):
    fields["error"] = "shutting down"
    return UJSONResponse(SHUTDOWN_ERROR, 503, headers={"Retry-After": "1"})


def tokens_so_far(generation):
    return len(generation.samples[0].ids)


def sse(data, event=None):
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {logs.dumps(data)}\n\n"


class GenerationStream(StreamingResponse):
    """Server-Sent Events for one generation: a `data: {"text": piece}` event per new piece, then
    `event: done` with the full answer, or `event: error` when it failed or the server is shutting
    down. It holds the gate until it ends, however it ends (done, error, client gone, cancelled)."""

    def __init__(self, request, generation, gate, fields):
        self.generation, self.gate, self.fields = generation, gate, fields
        super().__init__(self.events(request), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(self, request):
        try:
            async with contextlib.aclosing(steps(request, self.generation, self.gate)) as pieces:
                async for piece in pieces:
                    if piece:
                        yield sse({"text": piece})
        except ClientLeft:
            return
        except ShuttingDown:
            self.fields["error"] = "shutting down"
            yield sse(SHUTDOWN_ERROR, "error")
            return
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
            result = self.generation.result
            self.gate.leave(result and result["seconds"])
            if result:
                self.fields.update({k: result[k] for k in ("tokens", "stop_reason", "seconds")})
            else:
                self.fields["tokens"] = tokens_so_far(self.generation)
                if "error" not in self.fields:  # the client left
                    self.fields["disconnected"] = True
            await self.body_iterator.aclose()  # tells the worker thread to stop, if it still runs


async def limits_route(request):
    state = request.app.state
    model = state.model
    return UJSONResponse(limits(state.table, prefix_max_chars=PREFIX_MAX_CHARS, n_ctx=model.n_ctx,
                                n_vocab=model.n_vocab, queue_size=QUEUE_SIZE, body_max_bytes=BODY_MAX_BYTES,
                                checkpoint=model.manifest["checkpoint"]))


async def http_error(request, exc):
    if exc.status_code == 404:
        message = (f"no such path {request.url.path}; the API is / (GET, POST, HEAD), /limits, /ui/, "
                   f"/openapi.json, /v1/completions, /v1/models and /v2")
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {(exc.headers or {}).get('Allow', 'GET')}"
    else:
        message = exc.detail
    if request.url.path.startswith("/v1/"):  # each protocol's clients read errors in its own shape
        return openai_api.error(exc.status_code, message, headers=exc.headers)
    if request.url.path.startswith("/v2"):
        return v2.error(exc.status_code, message, headers=exc.headers)
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
            path = scope["path"]
            if scope["query_string"] and logs.LOG_PROMPTS:  # else the prompt is left out; params has the rest
                path += "?" + scope["query_string"].decode("latin-1")
            log(level, f"{scope['method']} {scope['path']} {status[0]}",
                httpRequest={"requestMethod": scope["method"], "requestUrl": path[:500], "status": status[0],
                             "latency": f"{latency:.3f}s"}, **fields)


def page_policy(page):
    """The page's Content-Security-Policy: its own inline script and style (by hash), nothing from
    elsewhere, no framing; it may call any server, since its Server setting can name another one."""
    html = page.read_text(encoding="utf-8") if page.is_file() else ""

    def hashes(tag):
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S))

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src data:; "
            "connect-src *; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class SecurityHeaders:
    """X-Content-Type-Options: nosniff on every answer, and the page's Content-Security-Policy on /ui/."""

    def __init__(self, app):
        self.app, self.policy = app, page_policy(STATIC_DIR / "index.html")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if scope["path"].startswith("/ui"):
                    headers["Content-Security-Policy"] = self.policy
            await send(message)

        await self.app(scope, receive, send_with_headers)


@contextlib.asynccontextmanager
async def lifespan(app):
    logs.setup()
    if getattr(app.state, "model", None) is None:  # `python -m app` loads it before binding the port
        app.state.model = GPT2(MODEL_DIR)
    model = app.state.model
    app.state.table = parameters(model.n_ctx, model.n_vocab, PREFIX_MAX_CHARS, MAX_NSAMPLES)
    app.state.openai_table = openai_api.parameters(app.state.table)
    app.state.gate = Gate(QUEUE_SIZE)  # `python -m app` drains it on SIGTERM
    log(logging.INFO, f"serving {model.run_dir} ({model.manifest['checkpoint']})", n_layer=model.n_layer,
        n_embd=model.n_embd, n_ctx=model.n_ctx, n_vocab=model.n_vocab, allowed_origins=ALLOWED_ORIGINS)
    yield
    log(logging.INFO, "shut down")


# The other protocols' modules use the helpers above, so they are imported once those exist.
from app import openai_api, openapi, v2  # noqa: E402

routes = [
    Route("/", generate, methods=["GET", "HEAD", "POST"]),
    Route("/limits", limits_route, methods=["GET"]),
    Route("/openapi.json", openapi.route, methods=["GET"]),
    Route("/v1/completions", openai_api.completions, methods=["POST"]),
    Route("/v1/models", openai_api.models, methods=["GET"]),
    Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
    Route("/v2", v2.server_metadata, methods=["GET"]),
    Route("/v2/health/live", v2.live, methods=["GET"]),
    Route("/v2/health/ready", v2.ready, methods=["GET"]),
    Route("/v2/models/{name}", v2.model_metadata, methods=["GET"]),
    Route("/v2/models/{name}/ready", v2.model_ready, methods=["GET"]),
    Route("/v2/models/{name}/infer", v2.infer, methods=["POST"]),
    Mount("/ui", StaticFiles(directory=STATIC_DIR, html=True, check_dir=False), name="ui"),
]

middleware = [
    Middleware(RequestLog),
    Middleware(SecurityHeaders),
    Middleware(CORSMiddleware, allow_origins=ALLOWED_ORIGINS, allow_methods=["GET", "HEAD", "POST"],
               allow_headers=["Content-Type"], expose_headers=["Retry-After"], max_age=600),
]

app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                exception_handlers={HTTPException: http_error, Exception: server_error})

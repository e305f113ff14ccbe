"""The server, put together: settings (read once, here), routes, middleware and lifespan. The work is
below, in layers that import only downward:

    main            this file: composition only
    native, openai_api, v2, generate, tokenizer_api, openapi    the protocols, side by side (none imports another)
    answers         what a generation request gets back: one place for busy, shutting down, gone, failed
    auth, tracing                      API keys; trace-correlated logs
    gate, http, middleware, schema     one generation at a time; HTTP plumbing; request log and headers;
                                       OpenAPI building blocks
    metrics                            Prometheus metrics (the gate times generations with it)
    params, engine, logs               parameters and their checks; the model; JSON logs

    uvicorn app.main:app      (or `python -m app`, which also sets up JSON logs, loads the model while it
                               imports this file, and drains on SIGTERM: app/__main__.py, app/server.py)

Settings come from the environment: MODEL_DIR (default checkpoint/run1; read in app/engine.py, so that
`python -m app` can start loading the model before it imports this file), ALLOWED_ORIGINS (comma
separated, default *), QUEUE_SIZE (requests that may wait, default 4), PREFIX_MAX_CHARS (default 500),
LOG_PROMPTS (1: log prompts; see app/logs.py), API_KEYS or API_KEYS_FILE (see app/auth.py), METRICS
(0: no /metrics), GOOGLE_CLOUD_PROJECT (for trace-correlated logs; see app/tracing.py), BLOCKLIST_FILE
(words and phrases no answer may hold, one a line; see app/steering.py).
"""
import contextlib
import logging
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from app import auth, generate, logs, metrics, native, openai_api, openapi, steering, tokenizer_api, tracing, v2
from app.engine import GPT2, MAX_NSAMPLES, MODEL_DIR
from app.gate import Gate
from app.http import error_handlers
from app.logs import log
from app.middleware import RequestLog, SecurityHeaders
from app.params import parameters


def fail(message):
    logs.setup()
    log(logging.ERROR, message)
    raise SystemExit(1)


def env_int(name, default):
    value = os.environ.get(name, str(default))
    if not (value.isascii() and value.isdigit()):  # isdigit() alone takes "²" and "١٢"
        fail(f"{name} must be a whole number, got {value!r}")
    return int(value)


def api_keys():
    try:
        return auth.keys()
    except auth.KeysError as e:
        fail(str(e))


def blocklist():
    try:
        return steering.blocklist(os.environ)
    except steering.BlocklistError as e:
        fail(str(e))


ALLOWED_ORIGINS = [o.strip() for o in os.environ.get("ALLOWED_ORIGINS", "*").split(",") if o.strip()]
QUEUE_SIZE = env_int("QUEUE_SIZE", 4)
PREFIX_MAX_CHARS = env_int("PREFIX_MAX_CHARS", 500)
STATIC_DIR = Path(__file__).parent / "static"
API_KEYS = api_keys()
BLOCKLIST = blocklist()
METRICS = os.environ.get("METRICS", "1") != "0"
TRACE_PROJECT = tracing.project()  # on Cloud Run without GOOGLE_CLOUD_PROJECT: asks the metadata server


@contextlib.asynccontextmanager
async def lifespan(app):
    logs.setup()
    if getattr(app.state, "model", None) is None:  # `python -m app` loads it before binding the port
        app.state.model = GPT2(MODEL_DIR)
    model = app.state.model
    model.blocklist = steering.Banned(BLOCKLIST, model.tokenizer)  # every request's bad_words include these
    app.state.name = model.run_dir.resolve().name  # the model's name in /v1 and /v2: its run folder's
    app.state.table = parameters(model.n_ctx, model.n_vocab, PREFIX_MAX_CHARS, MAX_NSAMPLES, model.text_format)
    app.state.openai_table = openai_api.parameters(app.state.table)
    app.state.gate = Gate(QUEUE_SIZE)  # `python -m app` drains it on SIGTERM
    log(logging.INFO, f"serving {model.run_dir} ({model.manifest['checkpoint']})", n_layer=model.n_layer,
        n_embd=model.n_embd, n_ctx=model.n_ctx, n_vocab=model.n_vocab, text_format=model.text_format,
        allowed_origins=ALLOWED_ORIGINS, api_keys=len(API_KEYS), blocklist=len(BLOCKLIST), metrics=METRICS,
        trace_project=TRACE_PROJECT)
    yield
    log(logging.INFO, "shut down")


def keyed(endpoint, shape):
    """The endpoint, behind the API keys when they are set (a 401 in the protocol's shape)."""
    return auth.required(endpoint, shape, API_KEYS)


routes = [
    Route("/", keyed(native.generate, native.shape), methods=["GET", "HEAD", "POST"]),
    Route("/limits", native.limits_route, methods=["GET"]),
    Route("/openapi.json", openapi.route(native.paths, openai_api.paths, v2.paths, generate.paths, tokenizer_api.paths,
                                         *([metrics.paths] if METRICS else [])), methods=["GET"]),
    Route("/v1/completions", keyed(openai_api.completions, openai_api.shape), methods=["POST"]),
    Route("/v1/models", openai_api.models, methods=["GET"]),
    Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
    Route("/tokenizer_info", keyed(tokenizer_api.tokenizer_info, tokenizer_api.shape), methods=["GET"]),
    Route("/tokenize", keyed(tokenizer_api.tokenize, tokenizer_api.shape), methods=["POST"]),
    Route("/detokenize", keyed(tokenizer_api.detokenize, tokenizer_api.shape), methods=["POST"]),
    Route("/v2", v2.server_metadata, methods=["GET"]),
    Route("/v2/health/live", v2.live, methods=["GET"]),
    Route("/v2/health/ready", v2.ready, methods=["GET"]),
    Route("/v2/models/{name}", v2.model_metadata, methods=["GET"]),
    Route("/v2/models/{name}/ready", v2.model_ready, methods=["GET"]),
    Route("/v2/models/{name}/infer", keyed(v2.infer, v2.shape), methods=["POST"]),
    Route("/v2/models/{name}/generate", keyed(generate.generate, generate.shape), methods=["POST"]),
    Route("/v2/models/{name}/generate_stream", keyed(generate.generate_stream, generate.shape), methods=["POST"]),
    Mount("/ui", StaticFiles(directory=STATIC_DIR, html=True, check_dir=False), name="ui"),
]
if METRICS:
    routes.append(Route("/metrics", metrics.route, methods=["GET"]))

middleware = [
    Middleware(tracing.Trace, project_id=TRACE_PROJECT),  # outermost: its fields mark every line below
    *([Middleware(metrics.Metrics, routes=routes)] if METRICS else []),
    Middleware(RequestLog),
    Middleware(SecurityHeaders, page=STATIC_DIR / "index.html"),
    # Authorization: the OpenAI SDK sends its (unchecked) key; Inference-Header-Content-Length: Triton's
    # binary tensor data, which browser code can only split with the header exposed.
    Middleware(CORSMiddleware, allow_origins=ALLOWED_ORIGINS, allow_methods=["GET", "HEAD", "POST"],
               allow_headers=["Content-Type", "Authorization", "Inference-Header-Content-Length"],
               expose_headers=["Retry-After", "Inference-Header-Content-Length"], max_age=600),
]

# 404, 405 and 500 answer in the shape of the protocol whose path was asked.
exception_handlers = error_handlers(
    [("/v1/", openai_api.shape), ("/v2", v2.shape), ("", native.shape)],
    api="/ (GET, POST, HEAD), /limits, /ui/, /openapi.json, /metrics, /v1/completions, /v1/models, /tokenize, "
        "/detokenize, /tokenizer_info and /v2")

app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers=exception_handlers)

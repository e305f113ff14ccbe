"""gpt-2-cloud-run's API: GET / and POST / generate text (GET with the parameters in the query string,
POST as JSON), HEAD / answers without generating, GET /limits shows every parameter's range.
Errors are {"error": message, "parameter": name or null}; busy and shutting down carry retry_after."""
from starlette.responses import Response

from app import answers, logs
from app.engine import Generation
from app.gate import run
from app.http import BODY_MAX_BYTES, UJSONResponse, json_params, query_params, read_body, sse
from app.params import ParamError, limits, parse, prompt_for
from app.schema import (GENERATES, INTEGER, NUMBER, STRING, STRINGS, budget, get, json_body, obj, query_schema,
                        responses, schema, sse_content)


def shape(status, message, retry_after=None):
    if retry_after:
        return {"error": message, "retry_after": retry_after}
    return {"error": message, "parameter": None}


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
        return UJSONResponse({"error": e.message, "parameter": e.parameter}, e.status)

    request.state.log = fields = {"params": logs.private(values), "prompt_tokens": len(prompt)}
    generation = Generation(state.model, prompt, **{k: v for k, v in values.items() if k != "stream"})
    if values["stream"]:
        return await answers.stream(request, generation, shape, frame(generation), lambda body: sse(body, "error"))

    async def work():
        result = await run(request, generation, state.gate)
        fields.update({k: result[k] for k in ("tokens", "stop_reason", "seconds")})
        return UJSONResponse(result)

    return await answers.answer(request, [generation], shape, work)


def frame(generation):
    """Server-Sent Events: a `data: {"text": piece}` event per new piece, then `event: done` with the
    full answer (an error is `event: error`)."""

    async def events(pieces):
        async for piece in pieces:
            if piece:
                yield sse({"text": piece})
        yield sse(generation.result, "done")

    return events


async def limits_route(request):
    state = request.app.state
    model = state.model
    return UJSONResponse(limits(state.table, prefix_max_chars=state.table["prefix"].max_chars, n_ctx=model.n_ctx,
                                n_vocab=model.n_vocab, queue_size=state.gate.size, body_max_bytes=BODY_MAX_BYTES,
                                **model.served()))


def paths(state):
    """The OpenAPI description of /, /limits and the page."""
    table = state.table
    error = obj({"error": STRING, "parameter": {"type": ["string", "null"]}, "retry_after": INTEGER}, ["error"])
    generated = obj({"text": STRING, "tokens": INTEGER, "seconds": NUMBER,
                     "stop_reason": {"enum": ["length", "end_token", "truncate"]},
                     "texts": STRINGS, "stop_reasons": STRINGS}, ["text", "tokens", "stop_reason", "seconds"])
    piece = obj({"text": STRING}, ["text"])
    work = budget(state.model.n_ctx, "nsamples")
    generate = responses(generated, error, GENERATES, {
        **json_body(generated), **sse_content(["message", "done", "error"], {"anyOf": [piece, generated, error]})})
    return {
        "/": {
            "get": {"summary": "Generate text (parameters in the query string)", "operationId": "generate_get",
                    "description": work,
                    "parameters": [{"name": n, "in": "query", "required": False, "schema": query_schema(spec)}
                                   for n, spec in table.items()],
                    "responses": generate},
            "post": {"summary": "Generate text (parameters in a JSON body)", "operationId": "generate_post",
                     "description": work,
                     "requestBody": {"required": False, "content": json_body(obj(
                         {n: schema(spec) for n, spec in table.items()}, additionalProperties=False))},
                     "responses": generate},
            "head": {"summary": "Up and loaded (generates nothing)", "operationId": "generate_head",
                     "responses": {"200": {"description": "OK"}}},
        },
        "/limits": get("Every parameter's default and range, and the model's facts", "limits", {"type": "object"}),
        "/ui/": {"get": {"summary": "The web page", "operationId": "page",
                         "responses": {"200": {"description": "OK", "content": {"text/html": {"schema": STRING}}}}}},
    }

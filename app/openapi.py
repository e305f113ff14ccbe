"""GET /openapi.json: every route of the three APIs (gpt-2-cloud-run's /, OpenAI's /v1, V2's /v2),
built from the parameter tables the validation uses, so the description cannot drift from the checks."""
from app import openai_api, v2
from app.main import BODY_MAX_BYTES, BODY_SECONDS, UJSONResponse

LIMIT_KEYWORDS = {"min": "minimum", "max": "maximum", "min_exclusive": "exclusiveMinimum", "max_chars": "maxLength"}


def schema(spec):
    """JSON Schema for one parameter, from the same limits GET /limits shows (null means the default)."""
    limits = spec.limits()
    if isinstance(spec, openai_api.Stop):
        text = {"type": "string", "maxLength": limits["max_chars"]}
        return {"anyOf": [text, {"type": "array", "items": text, "maxItems": limits["max_items"]}, {"type": "null"}]}
    result = {"type": [limits["type"], "null"]}
    result.update({LIMIT_KEYWORDS[k]: v for k, v in limits.items() if k in LIMIT_KEYWORDS})
    if limits["default"] is not None:
        result["default"] = limits["default"]
    return result


def obj(properties, required=(), **extra):
    return {"type": "object", "properties": properties, "required": list(required), **extra}


STRING, INTEGER, NUMBER, BOOLEAN = ({"type": t} for t in ("string", "integer", "number", "boolean"))
STRINGS = {"type": "array", "items": STRING}


def sse(events, data, last=None):
    """Server-Sent Events (before OpenAPI 3.2 the schema describes one event): `data` is JSON text
    matching `data`, or the literal `last`."""
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    if last:
        data = {"anyOf": [{"const": last}, data]}
    return {"text/event-stream": {"schema": obj({"event": {"enum": events}, "data": data}, ["data"])}}


def json_body(schema):
    return {"application/json": {"schema": schema}}


def responses(ok, error, codes=(), ok_content=None):
    """ok: the 200 answer's schema (or ok_content, its media types); error: the schema of `codes`' answers."""
    answers = {"200": {"description": "OK", "content": ok_content or json_body(ok)}}
    for code in codes:
        answers[str(code)] = {"description": DESCRIPTIONS[code], "content": json_body(error)}
    for code in {429, 503} & set(codes):
        answers[str(code)]["headers"] = {"Retry-After": {"required": True,
                                                         "schema": {"type": "integer", "minimum": 1}}}
    return answers


DESCRIPTIONS = {400: "a parameter is wrong; the message says which and what it accepts",
                404: "no such model", 408: f"the body did not arrive within {BODY_SECONDS} s",
                413: f"the body is over {BODY_MAX_BYTES} bytes", 415: "the body is not UTF-8 JSON",
                429: "busy: retry after Retry-After seconds",
                503: "shutting down (SIGTERM): retry after Retry-After seconds, another instance answers"}
GENERATES = (400, 408, 413, 415, 429, 503)  # the statuses of a route that generates




def get(summary, operation, answer, error=None, codes=(), parameters=()):
    return {"get": {"summary": summary, "operationId": operation, "parameters": list(parameters),
                    "responses": responses(answer, error, codes)}}


def api_paths(table):
    """gpt-2-cloud-run's API: /, /limits, the page, and this description."""
    error = obj({"error": STRING, "parameter": {"type": ["string", "null"]}, "retry_after": INTEGER}, ["error"])
    generated = obj({"text": STRING, "tokens": INTEGER, "seconds": NUMBER,
                     "stop_reason": {"enum": ["length", "end_token", "truncate"]},
                     "texts": STRINGS, "stop_reasons": STRINGS}, ["text", "tokens", "stop_reason", "seconds"])
    piece = obj({"text": STRING}, ["text"])
    generate = responses(generated, error, GENERATES, {
        **json_body(generated), **sse(["message", "done", "error"], {"anyOf": [piece, generated, error]})})
    return {
        "/": {
            "get": {"summary": "Generate text (parameters in the query string)", "operationId": "generate_get",
                    "parameters": [{"name": n, "in": "query", "required": False, "schema": schema(spec)}
                                   for n, spec in table.items()],
                    "responses": generate},
            "post": {"summary": "Generate text (parameters in a JSON body)", "operationId": "generate_post",
                     "requestBody": {"required": False, "content": json_body(obj(
                         {n: schema(spec) for n, spec in table.items()}, additionalProperties=False))},
                     "responses": generate},
            "head": {"summary": "Up and loaded (generates nothing)", "operationId": "generate_head",
                     "responses": {"200": {"description": "OK"}}},
        },
        "/limits": get("Every parameter's default and range, and the model's facts", "limits", {"type": "object"}),
        "/ui/": {"get": {"summary": "The web page", "operationId": "page",
                         "responses": {"200": {"description": "OK", "content": {"text/html": {"schema": STRING}}}}}},
        "/openapi.json": get("This description", "openapi", {"type": "object"}),
    }


def openai_paths(openai_table, name):
    """OpenAI's completions: /v1/completions, /v1/models, /v1/chat/completions."""
    error = obj({"error": obj({"message": STRING, "type": STRING, "param": {"type": ["string", "null"]},
                               "code": {"type": ["string", "null"]}}, ["message", "type", "param", "code"])},
                ["error"])
    properties = {n: schema(spec) for n, spec in openai_table.items()}
    properties["model"] = {"enum": [name]}
    prompt = properties["prompt"]
    properties["prompt"] = {"anyOf": [prompt, {"type": "array", "items": prompt, "minItems": 1, "maxItems": 1}]}
    properties.update({n: {"enum": list(neutral)} for n, neutral in openai_api.UNSUPPORTED.items()})
    properties["stream_options"] = {"anyOf": [obj({"include_usage": BOOLEAN}, additionalProperties=False),
                                              {"type": "null"}]}
    choice = obj({"text": STRING, "index": INTEGER, "logprobs": {"type": "null"},
                  "finish_reason": {"enum": ["stop", "length", None]}}, ["text", "index", "finish_reason"])
    usage = obj({k: INTEGER for k in ("prompt_tokens", "completion_tokens", "total_tokens")})
    completion = obj({"id": STRING, "object": {"const": "text_completion"}, "created": INTEGER, "model": STRING,
                      "choices": {"type": "array", "items": choice}, "usage": usage},
                     ["id", "object", "created", "model", "choices"])
    model = obj({"id": STRING, "object": {"const": "model"}, "created": INTEGER, "owned_by": STRING}, ["id", "object"])
    return {
        "/v1/completions": {"post": {
            "summary": "OpenAI-compatible completion", "operationId": "openai_completions",
            "requestBody": {"required": True,
                            "content": json_body(obj(properties, ["model"], additionalProperties=False))},
            "responses": responses(completion, error, (*GENERATES, 404), {
                **json_body(completion), **sse(["message"], {"anyOf": [completion, error]}, "[DONE]")})}},
        "/v1/models": get("The served model, OpenAI's way", "openai_models",
                          obj({"object": {"const": "list"}, "data": {"type": "array", "items": model}},
                              ["object", "data"])),
        "/v1/chat/completions": {"post": {
            "summary": "Not offered: this is a completion model (always 404)", "operationId": "openai_chat",
            "responses": {"404": {"description": "use /v1/completions", "content": json_body(error)}}}},
    }


def v2_paths(table, name):
    """The V2 inference protocol: /v2, its health, the model's metadata and readiness, inference."""
    error = obj({"error": STRING}, ["error"])
    texts = {"type": "array", "items": STRING, "minItems": 1, "maxItems": v2.MAX_TEXTS}
    shape = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": v2.MAX_TEXTS},
             "minItems": 1, "maxItems": 1}
    tensor = {"datatype": {"const": "BYTES"}, "shape": {"const": [-1]}}
    parameters = {n: schema(spec) for n, spec in v2.generation_parameters(table).items()}
    parameters["binary_data_output"] = BOOLEAN
    request = obj({
        "id": STRING,
        "parameters": obj(parameters, additionalProperties=False),
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": obj(
            {"name": {"const": v2.INPUT}, "datatype": {"const": "BYTES"}, "shape": shape, "data": texts},
            ["name", "datatype", "shape", "data"])},
        "outputs": {"type": "array", "items": obj({"name": {"const": v2.OUTPUT},
                                                   "parameters": obj({"binary_data": BOOLEAN})}, ["name"])},
    }, ["inputs"])
    answer = obj({"model_name": STRING, "model_version": STRING, "id": STRING, "outputs": {
        "type": "array", "items": obj({"name": STRING, "datatype": STRING, "shape": {"type": "array", "items": INTEGER},
                                       "data": STRINGS, "parameters": {"type": "object"}},
                                      ["name", "datatype", "shape"])}}, ["model_name", "outputs"])
    model = [{"name": "name", "in": "path", "required": True, "schema": {"enum": [name]}}]
    return {
        "/v2": get("V2 server metadata", "v2_server",
                   obj({"name": STRING, "version": STRING, "extensions": STRINGS}, ["name", "version", "extensions"])),
        "/v2/health/live": get("V2 liveness", "v2_live", obj({"live": BOOLEAN}, ["live"])),
        "/v2/health/ready": get("V2 readiness (usable as Cloud Run's health check)", "v2_ready",
                                obj({"ready": BOOLEAN}, ["ready"]), error, (503,)),
        "/v2/models/{name}": get("V2 model metadata", "v2_model", obj(
            {"name": STRING, "versions": STRINGS, "platform": STRING,
             "inputs": {"type": "array", "items": obj({"name": {"const": v2.INPUT}, **tensor})},
             "outputs": {"type": "array", "items": obj({"name": {"const": v2.OUTPUT}, **tensor})}},
            ["name", "platform", "inputs", "outputs"]), error, (400,), model),
        "/v2/models/{name}/ready": get("V2 model readiness", "v2_model_ready",
                                       obj({"name": STRING, "ready": BOOLEAN}, ["name", "ready"]),
                                       error, (400,), model),
        "/v2/models/{name}/infer": {"post": {
            "summary": "V2 inference: texts in text_input, generated texts in text_output",
            "operationId": "v2_infer", "parameters": model,
            "requestBody": {"required": True, "content": json_body(request)},
            "responses": responses(answer, error, [c for c in GENERATES if c != 415], {
                **json_body(answer), "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}})}},
    }


def description(state):
    name = openai_api.model_name(state.model)
    return {"openapi": "3.1.0",
            "info": {"title": "gpt2-run", "version": "1",
                     "description": f"GPT-2 text generation from {name} ({state.model.manifest['checkpoint']})"},
            "paths": {**api_paths(state.table), **openai_paths(state.openai_table, name),
                      **v2_paths(state.table, name)}}


async def route(request):
    return UJSONResponse(description(request.app.state))

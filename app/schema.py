"""Building blocks of the OpenAPI description: JSON Schema for a parameter, built from the same table
the checks use (so the description cannot drift from them), and the shapes of answers. Each protocol
describes its own paths with these; app/openapi.py puts them together."""
from app.http import BODY_MAX_BYTES, BODY_SECONDS
from app.params import LogitBias, Phrases, Stop

LIMIT_KEYWORDS = {"min": "minimum", "max": "maximum", "min_exclusive": "exclusiveMinimum", "max_chars": "maxLength"}


JSON_TEXT = {"type": "string", "contentMediaType": "application/json"}  # a list or object as JSON text


def schema(spec):
    """JSON Schema for one parameter, from the same limits GET /limits shows (null means the default)."""
    limits = spec.limits()
    if isinstance(spec, Stop):
        text = {"type": "string", "maxLength": limits["max_chars"]}
        return {"anyOf": [text, {"type": "array", "items": text, "maxItems": limits["max_items"]}, {"type": "null"}]}
    if isinstance(spec, (LogitBias, Phrases)):  # or as JSON text: a query string's, a V2 parameter's
        return {"anyOf": [structured(spec), {**JSON_TEXT, "contentSchema": structured(spec)}, {"type": "null"}]}
    result = {"type": [limits["type"], "null"]}
    result.update({LIMIT_KEYWORDS[k]: v for k, v in limits.items() if k in LIMIT_KEYWORDS})
    if limits["default"] is not None:
        result["default"] = limits["default"]
    return result


def structured(spec):
    """The JSON Schema of a list or object parameter's value."""
    limits = spec.limits()
    if isinstance(spec, LogitBias):
        return {"type": "object", "propertyNames": {"pattern": "^[0-9]{1,9}$"}, "maxProperties": limits["max_items"],
                "additionalProperties": {"type": "number", "minimum": limits["min"], "maximum": limits["max"]}}
    return {"type": "array", "items": {"type": "string", "maxLength": limits["max_chars"]},
            "maxItems": limits["max_items"]}


def query_schema(spec):
    """JSON Schema for one parameter in a query string: a list or object parameter is JSON text there."""
    if isinstance(spec, (LogitBias, Phrases)):
        return {"type": ["string", "null"], "contentMediaType": "application/json", "contentSchema": structured(spec)}
    return schema(spec)


def obj(properties, required=(), **extra):
    return {"type": "object", "properties": properties, "required": list(required), **extra}


STRING, INTEGER, NUMBER, BOOLEAN = ({"type": t} for t in ("string", "integer", "number", "boolean"))
STRINGS = {"type": "array", "items": STRING}


def sse_content(events, data, last=None):
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


def budget(n_ctx, shared_by, length="length"):
    """The bound on one request's work, as the operations state it (params.prompt_for checks it)."""
    return (f"One request's work is bounded by the model's context: {shared_by} × (prompt tokens + {length}) "
            f"≤ n_ctx = {n_ctx} tokens. Over it: a 400 that states the limit.")


def get(summary, operation, answer, error=None, codes=(), parameters=()):
    return {"get": {"summary": summary, "operationId": operation, "parameters": list(parameters),
                    "responses": responses(answer, error, codes)}}

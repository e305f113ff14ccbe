"""HTTP plumbing every protocol shares: reading the body, the query string and JSON; the JSON response;
Server-Sent Events; and the answers to what no route handles (404, 405, a client gone while sending, a bug)."""
import asyncio
import json

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from urllib.parse import parse_qsl

from app import logs
from app.params import ParamError

BODY_MAX_BYTES = 16 * 1024
BODY_SECONDS = 10  # the whole body must arrive within this, or 408


class UJSONResponse(JSONResponse):
    def render(self, content):
        return logs.dumps(content).encode("utf-8")


def sse(data, event=None):
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {logs.dumps(data)}\n\n"


def query_params(raw):
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict", max_num_fields=20)
    except UnicodeDecodeError:
        raise ParamError("the query string is not valid UTF-8 (percent-encode UTF-8 text)") from None
    except ValueError:
        raise ParamError("the query string has too many fields (at most 20)") from None
    return unique_keys(pairs)


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
    data = json_object(body)
    if not isinstance(data, dict):
        raise ParamError('the body must be a JSON object, e.g. {"length": 50, "temperature": 0.7}')
    return data


def json_object(body, what="the body"):
    """JSON text (bytes) parsed, refusing repeated keys; ParamError says what is wrong with it."""
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=unique_keys)
    except UnicodeDecodeError:
        raise ParamError(f"{what} is not valid UTF-8") from None
    except ValueError as e:
        raise ParamError(f"{what} is not valid JSON ({e})") from None
    except RecursionError:
        raise ParamError(f"{what} is not valid JSON (nested too deeply)") from None


def unique_keys(pairs):
    """A JSON object's pairs (or a query string's) as a dict; a repeated name is refused."""
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


def error_handlers(shapes, api):
    """Starlette's exception handlers. 404 and 405 answer in the shape of the protocol whose path was
    asked (shapes: (path prefix, shape(status, message)) pairs, the first that matches); a client
    that left while sending its body gets 499 (nobody listens); anything else is a logged 500."""

    def error(request, status, message, headers=None):
        shape = next(shape for prefix, shape in shapes if request.url.path.startswith(prefix))
        return UJSONResponse(shape(status, message), status, headers=headers)

    async def http_error(request, exc):
        if exc.status_code == 404:
            message = f"no such path {request.url.path}; the API is {api}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "GET")
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
        else:
            message = exc.detail
        return error(request, exc.status_code, message, exc.headers)

    async def client_gone(request, exc):
        return Response(status_code=499)

    async def server_error(request, exc):  # Starlette logs the traceback
        return error(request, 500, "internal error (logged on the server)")

    return {HTTPException: http_error, ClientDisconnect: client_gone, Exception: server_error}


def check_name(request):
    """/v2/models/NAME/...: NAME must be the served model's (V2 and its generate extension)."""
    name, served = request.path_params["name"], request.app.state.name
    if name != served:
        raise ParamError(f"unknown model {name!r}; this server serves {served!r}")

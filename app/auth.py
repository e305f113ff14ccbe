"""Optional API keys: with API_KEYS (comma separated) or API_KEYS_FILE (one key a line, e.g. a Secret
Manager volume on Cloud Run) set, the routes that generate need `Authorization: Bearer KEY` (what the
OpenAI SDK sends). A missing, malformed or wrong key is a 401 in the protocol's own error shape. Keys are
compared in constant time and never logged. Health, readiness, metadata, /openapi.json, /metrics and the
page stay open (Cloud Run's probes carry no key).

Keys fail closed: a variable that is set but holds no key stops the start, as does a key file that is not
a regular file (a FIFO would hang the start) or cannot be read. In the file, blank lines and lines starting
with `#` are not keys, and a UTF-8 byte-order mark is not part of the first key. A key in the URL
(`?api_key=`) is no way in: URLs end up in logs, proxies and browser histories (app/middleware.py never
logs its value)."""
import hmac
import os
import re
import stat

from app.http import UJSONResponse
from app.middleware import key_in_query

MISSING = "this server needs an API key: send Authorization: Bearer KEY"
MALFORMED = "the Authorization header is malformed: send Authorization: Bearer KEY (one space between them)"
IN_URL = "an API key in the URL is not accepted (URLs get logged): send Authorization: Bearer KEY"
WRONG = "the API key is not valid"
BEARER = re.compile(r"bearer +([^ \t]+)", re.IGNORECASE)  # RFC 6750: the scheme, one or more spaces, the token


class KeysError(Exception):
    """API_KEYS or API_KEYS_FILE is set but names no key, or the file cannot be read."""


def keys(environ=os.environ):
    """The accepted keys, as bytes (an empty list: keys are off). Raises KeysError."""
    found = []
    if "API_KEYS" in environ:
        found = [k.strip() for k in environ["API_KEYS"].split(",") if k.strip()]
        if not found:
            raise KeysError(f"API_KEYS is set but holds no key (got {environ['API_KEYS']!r}): give comma-separated "
                            "keys, or unset it to serve without keys")
    if "API_KEYS_FILE" in environ:
        found += read_file(environ["API_KEYS_FILE"])
    if any(char.isspace() for key in found for char in key):  # `Bearer KEY` cannot carry it: no way in
        raise KeysError("API_KEYS or API_KEYS_FILE holds a key with a space or tab in it: one key a line, "
                        "comma-separated in API_KEYS")
    return [k.encode("utf-8") for k in found]


def read_file(path):
    """The keys in a key file: one a line, neither blank lines nor `#` comments, a leading BOM dropped."""
    try:
        # Non-blocking: opening a FIFO for reading would wait for a writer. Only a regular file is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise KeysError(f"API_KEYS_FILE {path!r} cannot be read: {e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise KeysError(f"API_KEYS_FILE {path!r} is not a regular file: give a file with one key a line")
    with open(fd, encoding="utf-8-sig") as f:
        try:
            lines = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise KeysError(f"API_KEYS_FILE {path!r} cannot be read: {e}") from None
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise KeysError(f"API_KEYS_FILE {path!r} has no key (one key a line; blank lines and # lines are not keys)")
    return found


def known(given, accepted):
    """Whether the key is one of `accepted`: every comparison made, each in constant time."""
    return sum(hmac.compare_digest(given, key) for key in accepted) > 0


def required(endpoint, shape, accepted):
    """`endpoint`, answering 401 in `shape` (the protocol's error shape) unless the request carries one
    of the `accepted` keys. HEAD (an uptime check, which generates nothing) stays open."""
    if not accepted:
        return endpoint

    async def guarded(request):
        if request.method == "HEAD":
            return await endpoint(request)
        header = request.headers.get("authorization")
        match = BEARER.fullmatch(header) if header is not None else None
        if match and known(match[1].encode("latin-1"), accepted):
            return await endpoint(request)
        if match:
            message, logged = WRONG, "wrong API key"
        elif header is not None:
            message, logged = MALFORMED, "malformed Authorization header"
        elif key_in_query(request.scope["query_string"]):
            message, logged = IN_URL, "API key in the URL"
        else:
            message, logged = MISSING, "no API key"
        request.state.log = {"error": logged}  # never the key itself
        return UJSONResponse(shape(401, message), 401, headers={"WWW-Authenticate": "Bearer"})

    guarded.needs_key = True  # for /openapi.json (app/openapi.py)
    return guarded

"""Optional API keys: with API_KEYS (comma separated) or API_KEYS_FILE (one key a line, e.g. a Secret
Manager volume on Cloud Run) set, the routes that generate need `Authorization: Bearer KEY` (what the
OpenAI SDK sends). A missing or wrong key is a 401 in the protocol's own error shape. Keys are compared
in constant time and never logged. Health, readiness, metadata, /openapi.json, /metrics and the page
stay open (Cloud Run's probes carry no key)."""
import hmac
import os

from app.http import UJSONResponse

MISSING = "this server needs an API key: send Authorization: Bearer KEY"
WRONG = "the API key is not valid"


class KeysError(Exception):
    """API_KEYS_FILE cannot be read, or names no key."""


def keys(environ=os.environ):
    """The accepted keys, as bytes (an empty list: keys are off). Raises KeysError."""
    found = [k.strip() for k in environ.get("API_KEYS", "").split(",")]
    if path := environ.get("API_KEYS_FILE"):
        try:
            with open(path, encoding="utf-8") as f:
                from_file = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise KeysError(f"API_KEYS_FILE {path!r} cannot be read: {e}") from None
        if not any(from_file):
            raise KeysError(f"API_KEYS_FILE {path!r} has no key (one key a line)")
        found += from_file
    return [k.encode("utf-8") for k in found if k]


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
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and known(given.strip().encode("latin-1"), accepted):
            return await endpoint(request)
        message = WRONG if given else MISSING
        request.state.log = {"error": "wrong API key" if given else "no API key"}  # never the key itself
        return UJSONResponse(shape(401, message), 401, headers={"WWW-Authenticate": "Bearer"})

    guarded.needs_key = True  # for /openapi.json (app/openapi.py)
    return guarded

"""The middleware every answer passes through: the request log line, and the security headers."""
import base64
import hashlib
import logging
import re
import time
import urllib.parse

from starlette.datastructures import MutableHeaders

from app import logs
from app.logs import log


# Query parameters that carry a credential (a key sent as ?api_key=, which app/auth.py never accepts):
# their values are never logged, LOG_PROMPTS=1 included.
URL_KEYS = ("api_key", "api-key", "apikey", "key", "access_token", "token")


def query_pairs(query_string):
    """(name as sent, name decoded and lower-cased) of each of a query string's (bytes) parameters."""
    for pair in query_string.decode("latin-1").split("&"):
        name = pair.split("=", 1)[0]
        yield pair, name, urllib.parse.unquote_plus(name).lower()


def key_in_query(query_string):
    """Whether a query string names a credential (URL_KEYS)."""
    return any(decoded in URL_KEYS for _, _, decoded in query_pairs(query_string))


def logged_query(query_string):
    """A query string as logged: a credential's value replaced by [redacted]."""
    return "&".join(f"{name}=[redacted]" if decoded in URL_KEYS else pair
                    for pair, name, decoded in query_pairs(query_string))


class RequestLog:
    """One JSON log line per request: method, path, status, latency, plus what the route added
    (request.state.log). A client that left before its answer ended is logged with status 499."""

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
            if fields.get("disconnected"):  # a stream's 200 went out before its client left
                status[0] = 499
            level = logging.INFO if status[0] < 400 else logging.WARNING if status[0] < 500 else logging.ERROR
            latency = time.perf_counter() - started
            path = scope["path"]
            if scope["query_string"] and logs.LOG_PROMPTS:  # else the prompt is left out; params has the rest
                path += "?" + logged_query(scope["query_string"])
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

    def __init__(self, app, page):
        self.app, self.policy = app, page_policy(page)

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

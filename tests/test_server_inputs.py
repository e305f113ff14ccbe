"""Bad input of every kind gets a 4xx JSON error naming the parameter and what it accepts; never a
500, never a stack trace. Table-driven, over real HTTP against `python -m app`."""
import json

import httpx
import pytest

from test_server import running_server

JSON = {"Content-Type": "application/json"}

# (id, method, query string, body bytes, headers, status, parameter, words the error must contain)
CASES = [
    ("length-not-a-number", "GET", "length=abc", None, {}, 400, "length", "integer from 1 to 1023"),
    ("length-zero", "GET", "length=0", None, {}, 400, "length", "from 1 to 1023"),
    ("length-over-context", "GET", "length=1024", None, {}, 400, "length", "from 1 to 1023"),
    ("length-fraction", "GET", "length=1.5", None, {}, 400, "length", "integer"),
    ("length-nan", "GET", "length=NaN", None, {}, 400, "length", "integer"),
    ("length-empty", "GET", "length=", None, {}, 400, "length", "integer"),
    ("length-huge", "GET", "length=" + "9" * 40, None, {}, 400, "length", "from 1 to 1023"),
    ("temperature-zero", "GET", "temperature=0", None, {}, 400, "temperature", "at least 0.01 and at most 2"),
    ("temperature-tiny", "GET", "temperature=1e-38", None, {}, 400, "temperature", "at least 0.01 and at most 2 (for greedy"),
    ("temperature-nan", "GET", "temperature=nan", None, {}, 400, "temperature", "at least 0.01"),
    ("temperature-inf", "GET", "temperature=inf", None, {}, 400, "temperature", "at least 0.01"),
    ("temperature-overflow", "GET", "temperature=1e999", None, {}, 400, "temperature", "at most 2"),
    ("temperature-negative", "GET", "temperature=-1", None, {}, 400, "temperature", "at least 0.01"),
    ("temperature-too-high", "GET", "temperature=2.5", None, {}, 400, "temperature", "at most 2"),
    ("temperature-words", "GET", "temperature=hot", None, {}, 400, "temperature", "a number"),
    ("top_k-negative", "GET", "top_k=-1", None, {}, 400, "top_k", "integer from 0 to"),
    ("top_k-over-vocab", "GET", "top_k=99999", None, {}, 400, "top_k", "integer from 0 to"),
    ("top_p-over-one", "GET", "top_p=1.5", None, {}, 400, "top_p", "at least 0 and at most 1"),
    ("top_p-negative", "GET", "top_p=-0.1", None, {}, 400, "top_p", "at least 0"),
    ("top_p-nan", "GET", "top_p=NaN", None, {}, 400, "top_p", "a number"),
    ("seed-negative", "GET", "seed=-1", None, {}, 400, "seed", "integer from 0 to 4294967295"),
    ("seed-too-big", "GET", "seed=4294967296", None, {}, 400, "seed", "integer from 0 to 4294967295"),
    ("nsamples-zero", "GET", "nsamples=0", None, {}, 400, "nsamples", "integer from 1 to 4"),
    ("nsamples-too-many", "GET", "nsamples=5", None, {}, 400, "nsamples", "integer from 1 to 4"),
    ("include_prefix-word", "GET", "include_prefix=maybe", None, {}, 400, "include_prefix", "true or false"),
    ("stream-word", "GET", "stream=yes", None, {}, 400, "stream", "true or false"),
    ("stream-with-nsamples", "GET", "stream=true&nsamples=2", None, {}, 400, "nsamples", "nsamples=1"),
    ("prefix-too-long", "GET", "prefix=" + "x" * 501, None, {}, 400, "prefix", "at most 500 characters, got 501 characters"),
    ("truncate-too-long", "GET", "truncate=" + "x" * 101, None, {}, 400, "truncate", "at most 100 characters"),
    ("prefix-plus-length-over-context", "GET", "length=1023&prefix=my%20dog", None, {}, 400, "length",
     "at most 1024 tokens"),
    ("unknown-parameter", "GET", "lenght=5", None, {}, 400, "lenght", "unknown parameter"),
    ("repeated-parameter", "GET", "length=5&length=6", None, {}, 400, "length", "more than once"),
    ("query-invalid-utf8", "GET", "prefix=%FF%FE", None, {}, 400, None, "UTF-8"),
    ("query-too-many-fields", "GET", "&".join(f"a{i}=1" for i in range(25)), None, {}, 400, None, "at most 20"),
    ("json-invalid", "POST", "", b'{"length": ', JSON, 400, None, "not valid JSON"),
    ("json-not-an-object", "POST", "", b"[1, 2]", JSON, 400, None, "JSON object"),
    ("json-string", "POST", "", b'"length=5"', JSON, 400, None, "JSON object"),
    ("json-too-deep", "POST", "", b"[" * 2000, JSON, 400, None, "not valid JSON"),
    ("body-invalid-utf8", "POST", "", b'{"prefix": "\xff\xfe"}', JSON, 400, None, "UTF-8"),
    ("content-type-text", "POST", "", b'{"length": 5}', {"Content-Type": "text/plain"}, 415, None,
     "application/json"),
    ("content-type-form", "POST", "", b"length=5", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     None, "application/json"),
    ("charset-latin1-among-others", "POST", "", b'{"length": 5}',
     {"Content-Type": "application/json; x=y; charset=iso-8859-1"}, 415, None, "UTF-8"),
    ("content-type-missing", "POST", "", b'{"length": 5}', {}, 415, None, "application/json"),
    ("charset-latin1", "POST", "", b'{"length": 5}', {"Content-Type": "application/json; charset=latin-1"}, 415,
     None, "UTF-8"),
    ("body-too-big", "POST", "", b'{"prefix": "' + b"x" * 20000 + b'"}', JSON, 413, None, "at most 16384"),
    ("post-with-query", "POST", "length=5", b'{"length": 5}', JSON, 400, "length", "JSON body"),
    ("json-length-string-word", "POST", "", b'{"length": "abc"}', JSON, 400, "length", "integer from 1 to"),
    ("json-length-bool", "POST", "", b'{"length": true}', JSON, 400, "length", "integer"),
    ("json-length-fraction", "POST", "", b'{"length": 5.5}', JSON, 400, "length", "integer"),
    ("json-temperature-nan", "POST", "", b'{"temperature": NaN}', JSON, 400, "temperature", "a number"),
    ("json-temperature-infinity", "POST", "", b'{"temperature": Infinity}', JSON, 400, "temperature", "a number"),
    ("json-temperature-list", "POST", "", b'{"temperature": [1]}', JSON, 400, "temperature", "a number"),
    ("json-top_p-huge-integer", "POST", "", b'{"top_p": ' + b"9" * 400 + b"}", JSON, 400, "top_p", "a number"),
    ("json-seed-float", "POST", "", b'{"seed": 1e20}', JSON, 400, "seed", "integer"),
    ("json-prefix-number", "POST", "", b'{"prefix": 123}', JSON, 400, "prefix", "a string"),
    ("json-prefix-lone-surrogate", "POST", "", b'{"prefix": "\\ud800"}', JSON, 400, "prefix", "a string"),
    ("json-include_prefix-number", "POST", "", b'{"include_prefix": 2}', JSON, 400, "include_prefix",
     "true or false"),
    ("json-stream-object", "POST", "", b'{"stream": {}}', JSON, 400, "stream", "true or false"),
    ("json-unknown-parameter", "POST", "", b'{"length": 5, "model": "gpt-4"}', JSON, 400, "model",
     "unknown parameter"),
    ("json-lone-surrogate-key", "POST", "", b'{"\\ud800": 1}', JSON, 400, "\ufffd", "unknown parameter '\\ud800'"),
    ("json-repeated-key", "POST", "", b'{"length": 5, "length": 6}', JSON, 400, "length", "more than once"),
    ("get-with-body", "GET", "length=5", b"{}", {}, 400, None, "GET takes no body"),
    ("method-put", "PUT", "", b"{}", JSON, 405, None, "not allowed"),
    ("method-delete-limits", "DELETE", "", None, {}, 405, None, "not allowed"),
    ("no-such-path", "GET", "", None, {}, 404, None, "no such path"),
]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    from conftest import find_free_port

    log = tmp_path_factory.mktemp("inputs_server") / "server.log"
    with running_server(tiny_run, find_free_port(), log) as s:
        yield s


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input(server, case):
    name, method, query, body, headers, status, parameter, words = case
    path = {"method-delete-limits": "/limits", "no-such-path": "/nope"}.get(name, "/")
    url = server.url + path + ("?" + query if query else "")
    r = httpx.request(method, url, content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    answer = json.loads(r.content)
    assert answer["parameter"] == parameter
    assert words in answer["error"], answer["error"]
    assert "Traceback" not in r.text and "\n" not in answer["error"]


def test_the_table_is_long_enough_and_the_server_survived(server):
    assert len(CASES) >= 30
    assert httpx.get(server.url + "/", params={"length": 3}, timeout=30).status_code == 200
    assert all(entry["severity"] != "ERROR" for entry in server.logs())

"""GET /openapi.json against `python -m app` in a subprocess: it describes every route, follows the same
parameter table as the checks, and schemathesis (its CLI, as a user runs it) generating requests for
every operation finds no 5xx and no response that differs from the description."""
import re
import subprocess
import sys
from urllib.parse import urljoin

import httpx
import pytest

from test_server import running_server

# The limits the description must follow (a smaller prefix also keeps the generated requests quick).
PREFIX_MAX_CHARS = 40


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    from conftest import find_free_port

    log = tmp_path_factory.mktemp("openapi_server") / "server.log"
    with running_server(tiny_run, find_free_port(), log, PREFIX_MAX_CHARS=str(PREFIX_MAX_CHARS)) as s:
        yield s


def test_describes_every_route_with_the_checks_limits(server):
    from app.main import routes

    spec = httpx.get(server.url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    described = {path.rstrip("/") for path in spec["paths"]}
    assert {route.path.rstrip("/") for route in routes} <= described | {""}  # "/" strips to ""
    limits = httpx.get(server.url + "/limits").json()

    query = {p["name"]: p["schema"] for p in spec["paths"]["/"]["get"]["parameters"]}
    assert list(query) == [name for name in limits if name in query] and set(query) >= {"length", "seed", "stream"}
    assert query["prefix"]["maxLength"] == PREFIX_MAX_CHARS == limits["prefix"]["max_chars"]
    assert query["length"]["maximum"] == limits["length"]["max"] == 1023
    assert query["temperature"]["minimum"] == limits["temperature"]["min"] == 0.01

    completion = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert completion["properties"]["prompt"]["anyOf"][0]["maxLength"] == PREFIX_MAX_CHARS
    assert completion["properties"]["max_tokens"]["maximum"] == 1023
    assert completion["properties"]["model"] == {"enum": ["run1"]} and completion["required"] == ["model"]

    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    parameters = infer["properties"]["parameters"]["properties"]
    assert "prefix" not in parameters and parameters["top_k"]["maximum"] == limits["top_k"]["max"]


def test_the_page_links_to_it(server):
    page = httpx.get(server.url + "/ui/")
    link = re.search(r'href="([^"]*openapi\.json)"', page.text).group(1)
    assert httpx.get(urljoin(str(page.url), link)).json()["openapi"].startswith("3.1")


def test_schemathesis_finds_no_server_error_and_no_undocumented_response(server, tmp_path):
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,"
              "response_schema_conformance,response_headers_conformance")
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json", "--checks", checks,
         "--max-examples", "40", "--workers", "1", "--seed", "1", "--warnings", "off", "--request-timeout", "60"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Tested: 20" in output and "generated" in output

"""Issue 19 item 4, the page's and the server's bits, in real Chromium against the real app (test_page's
set-up: the page from a static server, the app on another origin): a stream stopped from the page is
logged 499 like any client that left; Stop before the server answered says that nothing was generated
(not the earlier result's line alone); the page says why its Top k differs from the API's default."""
import json
import threading
import time

import httpx
import pytest
from playwright.sync_api import expect

from test_page import (browser, fill, fill_body, long_answer, make_page, open_page, out_dir, serve, shown,  # noqa: F401
                       site, slow_api, wait_done, watched)
from test_server import write_random_run

pytestmark = pytest.mark.slow


def entries(api):
    """The app's JSON log lines (uvicorn's own start-up lines, under `uvicorn app.main:app`, are plain text)."""
    return [json.loads(line) for line in api.log_path.read_text().splitlines() if line.startswith("{")]


def wait_for_entry(api, predicate, timeout=15):
    deadline = time.monotonic() + timeout
    while not (found := [e for e in entries(api) if predicate(e)]):
        assert time.monotonic() < deadline, "no such log line"
        time.sleep(0.1)
    return found[-1]


@pytest.fixture(scope="module")
def limits(slow_api):
    return httpx.get(slow_api.url + "/limits", timeout=10).json()


def test_a_stream_stopped_from_the_page_is_logged_499(watched, site, slow_api, limits, long_answer):
    body, _ = long_answer
    page = open_page(watched, site, slow_api.url, limits)
    fill_body(page, {**body, "seed": 101})
    page.click("#generate")
    expect(page.locator("#output .generated")).not_to_have_text("")
    page.click("#stop")
    wait_done(page)
    entry = wait_for_entry(slow_api, lambda e: e.get("params", {}).get("seed") == 101)
    assert entry["disconnected"] is True and entry["httpRequest"]["status"] == 499
    assert entry["message"] == "POST / 499" and entry["severity"] == "WARNING"


def test_stop_before_the_server_answered_says_nothing_was_generated(make_page, site, tiny_run, tmp_path_factory,
                                                                    out_dir):
    model = write_random_run(tmp_path_factory.mktemp("queued") / "run1", tiny_run, n_layer=8, n_embd=512, n_head=8)
    with serve(model, site, out_dir / "server-queued.log", QUEUE_SIZE="1") as api:
        limits = httpx.get(api.url + "/limits", timeout=10).json()
        page = open_page(make_page(), site, api.url, limits)
        fill(page, "The cat ", length=5, seed=1, top_k=0)
        page.click("#generate")
        wait_done(page)
        earlier_meta = page.locator("#meta").text_content()
        assert "5 tokens" in earlier_meta

        holding = threading.Event()

        def hold_the_gate():  # a long stream that keeps the one generation slot busy until closed
            with httpx.stream("GET", api.url + "/", params={"stream": "true", "length": 600, "seed": 2},
                              timeout=120) as r:
                lines = r.iter_lines()  # held: dropping the iterator would close the response
                next(line for line in lines if line.startswith("data:"))
                holding.set()
                while not done.is_set():
                    time.sleep(0.05)

        done = threading.Event()
        holder = threading.Thread(target=hold_the_gate)
        holder.start()
        try:
            assert holding.wait(60)
            fill(page, "The dog ", length=5, seed=3)
            page.click("#generate")
            expect(page.locator("#status")).to_have_text("Generating…")
            page.wait_for_timeout(500)  # it waits its turn at the gate: no answer yet
            page.click("#stop")
            wait_done(page)
            page.screenshot(path=out_dir / "stopped-while-waiting.png", full_page=True)
            expect(page.locator("#status")).to_have_text(
                "Stopped before the server answered: nothing was generated. The text shown is the earlier result.")
            assert shown(page)[0] == "The cat " and page.locator("#meta").text_content() == earlier_meta
        finally:
            done.set()
            holder.join(60)
        # Its turn came after the client had left: logged as a departed client.
        entry = wait_for_entry(api, lambda e: e.get("params", {}).get("seed") == 3)
        assert entry["disconnected"] is True and entry["httpRequest"]["status"] == 499


def test_the_page_says_why_its_top_k_differs_from_the_apis(watched, site, slow_api, limits):
    page = open_page(watched, site, slow_api.url, limits)
    assert page.locator("#top_k").input_value() == "40" and limits["top_k"]["default"] == 0
    hint = page.locator("#top_k-hint").text_content()
    assert "API's default" in hint and "40" in hint and "gpt-2-simple" in hint

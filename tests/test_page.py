"""The HTML page (app/static/index.html) in a real browser, against the real app, cross-origin.

The page is served by a plain static server on one port and the app (uvicorn, the tiny model) runs on
another, so every call the page makes is cross-origin and the app's CORS handling is exercised for real.
Screenshots of each state go to tests/out/page/.
"""
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import find_free_port as free_port
from test_server import running_server, write_random_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "app" / "static"
OUT = ROOT / "tests" / "out" / "page"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
XSS = "<img src=x onerror=alert(1)>"


def wait_until_up(url, proc, log, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.head(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def out_dir():
    OUT.mkdir(parents=True, exist_ok=True)
    return OUT


@pytest.fixture(scope="module")
def site(out_dir):
    """The page, from a plain static file server: a different origin from the API."""
    port = free_port()
    log = out_dir / "static.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(STATIC)], stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url + "/index.html", proc, log)
        yield url
    finally:
        stop(proc)


def serve(model_dir, site, log, **env):
    """The real app (`uvicorn app.main:app`) on MODEL_DIR, allowing the page's origin only."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    return running_server(model_dir, port, log, command=command, ALLOWED_ORIGINS=site, **env)


@pytest.fixture(scope="module")
def api(tiny_run, site, out_dir):
    with serve(tiny_run, site, out_dir / "server.log") as api:
        yield api


@pytest.fixture(scope="module")
def slow_api(tiny_run, site, out_dir, tmp_path_factory):
    """The app on random weights of a wider shape, with the tiny run's tokenizer: milliseconds a token
    and no early end, so answers stream for seconds, long enough to press Stop or to find the server
    busy (the trained tiny model writes a whole answer in ~30 ms). QUEUE_SIZE=0: while one answer
    streams, another request gets 429."""
    model = write_random_run(tmp_path_factory.mktemp("slow") / "run1", tiny_run, n_layer=8, n_embd=512, n_head=8)
    with serve(model, site, out_dir / "server-slow.log", QUEUE_SIZE="0") as api:
        yield api


@pytest.fixture(scope="module")
def long_answer(slow_api):
    """A request whose answer runs its full length (no early end token), and that answer."""
    for seed in range(20):
        body = {"prefix": "The cat ", "length": 600, "temperature": 1.0, "top_k": 0, "top_p": 0, "seed": seed}
        answer = httpx.post(slow_api.url + "/", json=body, timeout=120).json()
        if answer["stop_reason"] == "length":
            return body, answer
    pytest.fail("every seed in 0..19 ended early")


@pytest.fixture(scope="module")
def limits(api):
    return httpx.get(api.url + "/limits", timeout=10).json()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Watched:
    """A page with what it did recorded: dialogs, script errors, requests."""
    def __init__(self, context, page):
        self.context, self.page = context, page
        self.dialogs, self.errors, self.requests, self.console = [], [], [], []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("console", lambda m: self.console.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: self.requests.append((r.method, r.url)))
        self.responses = []
        page.on("response", lambda r: self.responses.append((r.request.method, r.url, r.status, r.headers)))

    def posts(self):
        return [url for method, url in self.requests if method == "POST"]


@pytest.fixture
def make_page(browser):
    contexts = []

    def make(**options):
        options.setdefault("viewport", {"width": 1000, "height": 900})
        context = browser.new_context(**options)
        contexts.append(context)
        return Watched(context, context.new_page())

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def watched(make_page):
    return make_page()


def open_page(watched, site, api_url, limits):
    """Open the page pointed at the API with ?api=, and wait until it shows the server's limits."""
    page = watched.page
    page.goto(f"{site}/index.html?api={api_url}")
    expect_limits_shown(page, limits)
    return page


def expect_limits_shown(page, limits):
    expect(page.locator("#prefix-source")).to_have_text("allowed by the server")
    expect(page.locator("#prefix-max")).to_have_text(str(limits["prefix_max_chars"]))


def fill(page, prefix, **fields):
    page.fill("#prefix", prefix)
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def wait_done(page, timeout=60_000):
    expect(page.locator("#output")).to_have_attribute("aria-busy", "false", timeout=timeout)
    expect(page.locator("#generate")).to_be_enabled()


def shown(page):
    """(prefix, generated) as the output area shows them."""
    return (page.locator("#output .prefix").text_content(), page.locator("#output .generated").text_content())


# Records every change of the generated text and of aria-busy / the button, as they happen.
RECORDER = """() => {
  const output = document.getElementById('output');
  const generated = output.querySelector('.generated');
  const button = document.getElementById('generate');
  window.__texts = []; window.__busy = []; window.__disabled = [];
  new MutationObserver(() => window.__texts.push(generated.textContent))
    .observe(generated, {childList: true, characterData: true, subtree: true});
  new MutationObserver(() => window.__busy.push(output.getAttribute('aria-busy')))
    .observe(output, {attributes: true, attributeFilter: ['aria-busy']});
  new MutationObserver(() => window.__disabled.push(button.disabled))
    .observe(button, {attributes: true, attributeFilter: ['disabled']});
}"""


def fill_body(page, body):
    fill(page, body["prefix"], **{k: body[k] for k in ("length", "temperature", "top_k", "top_p", "seed")})


def test_generate_streams_text_cross_origin(watched, site, slow_api, limits, long_answer, out_dir):
    body, answer = long_answer
    page = open_page(watched, site, slow_api.url, limits)
    page.screenshot(path=out_dir / "initial.png", full_page=True)
    fill_body(page, body)
    page.evaluate(RECORDER)
    page.dblclick("#generate")                      # the second click must not send a second request
    expect(page.locator("#output .generated")).not_to_have_text("")
    expect(page.locator("#output")).to_have_attribute("aria-busy", "true")
    page.screenshot(path=out_dir / "streaming.png", full_page=True)
    wait_done(page)
    page.screenshot(path=out_dir / "generated.png", full_page=True)

    texts = [t for t in page.evaluate("window.__texts") if t]
    assert len(set(texts)) > 1, f"the text arrived in one piece: {texts}"
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "the text should only grow"
    assert page.evaluate("window.__busy") == ["true", "false"]
    assert page.evaluate("window.__disabled") == [True, False]
    # The same request made directly, without streaming, gave the same text (same seed).
    prefix, generated = shown(page)
    assert prefix == body["prefix"]
    assert prefix + generated == answer["text"]
    expect(page.locator("#meta")).to_have_text(
        re.compile(rf"{answer['tokens']} tokens in \d+\.\d\d s · reached the length asked for"))
    assert watched.posts() == [slow_api.url + "/"]
    # Cross-origin with a JSON body: the browser asked first (the app logs the preflight) and the
    # answer allowed the page's origin.
    assert '"requestMethod":"OPTIONS"' in slow_api.log_path.read_text(), "no CORS preflight reached the server"
    [(_, _, status, headers)] = [r for r in watched.responses if r[0] == "POST"]
    assert status == 200 and headers.get("access-control-allow-origin") == site
    assert not watched.errors and not watched.dialogs


def test_out_of_range_length_shows_the_servers_message_next_to_length(watched, site, api, limits, out_dir):
    page = open_page(watched, site, api.url, limits)
    # The server's ranges are shown by the fields they limit.
    length = limits["length"]
    expect(page.locator("#length-hint")).to_have_text(f"{length['min']}–{length['max']} · tokens to generate")
    expect(page.locator("#temperature-hint")).to_have_text(
        f"{limits['temperature']['min']:g}–{limits['temperature']['max']:g} · higher is wilder")
    too_long = limits["n_ctx"] + 1000
    fill(page, "Hello", length=too_long)
    page.click("#generate")
    error = page.locator("#length-error")
    expect(error).to_be_visible()
    direct = httpx.post(api.url + "/", json={"prefix": "Hello", "length": too_long, "temperature": 0.7,
                                             "top_k": 40, "top_p": 0, "stream": True}, timeout=30)
    assert direct.status_code == 400 and direct.json()["parameter"] == "length"
    expect(error).to_have_text(direct.json()["error"])
    expect(page.locator("#length")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#length")).to_be_focused()
    expect(page.locator("#form-error")).to_be_hidden()
    assert shown(page) == ("", "")
    page.screenshot(path=out_dir / "error-length.png", full_page=True)
    # Editing the field clears its message.
    page.fill("#length", "20")
    expect(error).to_be_hidden()
    assert not watched.errors


def test_markup_in_the_prefix_shows_literally(watched, site, api, limits, out_dir):
    page = open_page(watched, site, api.url, limits)
    fill(page, XSS, length=20, seed=3)
    page.click("#generate")
    wait_done(page)
    fill(page, XSS + " again", length=10, seed=4)    # the first result moves to the list below
    page.click("#generate")
    wait_done(page)
    page.wait_for_timeout(300)                      # give a stray onerror the time to fire
    page.screenshot(path=out_dir / "xss.png", full_page=True)
    assert shown(page)[0] == XSS + " again"
    expect(page.locator("#history .prefix")).to_have_text([XSS])
    assert page.locator("img").count() == 0
    assert "&lt;img src=x" in page.inner_html("#output .prefix")
    assert watched.dialogs == [] and not watched.errors


def test_stop_aborts_the_stream(watched, site, slow_api, limits, long_answer, out_dir):
    body, answer = long_answer
    page = open_page(watched, site, slow_api.url, limits)
    fill_body(page, body)
    page.click("#generate")
    expect(page.locator("#output .generated")).not_to_have_text("")
    page.click("#stop")
    wait_done(page)
    page.screenshot(path=out_dir / "stopped.png", full_page=True)
    expect(page.locator("#meta")).to_contain_text("Stopped by you after")
    expect(page.locator("#status")).to_have_text("Stopped.")
    expect(page.locator("#stop")).to_be_disabled()
    prefix, generated = shown(page)
    assert prefix == body["prefix"]
    full = answer["text"][len(body["prefix"]):]
    assert generated and full.startswith(generated) and len(generated) < len(full), (generated, full)
    # The server noticed the client leaving and stopped generating.
    deadline = time.monotonic() + 10
    while '"disconnected":true' not in slow_api.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"disconnected":true' in slow_api.log_path.read_text()
    assert not watched.errors


def test_busy_server_says_when_to_retry(make_page, site, slow_api, limits, long_answer, out_dir):
    """While one visitor's answer streams, another visitor's request gets 429 and the page says so."""
    body, _ = long_answer
    first, second = make_page(), make_page()
    for watched in (first, second):
        open_page(watched, site, slow_api.url, limits)
        fill_body(watched.page, body)
    first.page.click("#generate")
    expect(first.page.locator("#output .generated")).not_to_have_text("")
    second.page.click("#generate")
    wait_done(second.page)
    first.page.click("#stop")
    wait_done(first.page)
    error = second.page.locator("#form-error")
    expect(error).to_have_text(re.compile(r"The server is busy with another request\. Try again in \d+ seconds?\."))
    second.page.screenshot(path=out_dir / "busy-429.png", full_page=True)
    assert shown(second.page) == ("", ""), "nothing was generated for the refused request"
    assert '"status":429' in slow_api.log_path.read_text()
    assert not first.errors and not second.errors


def test_served_by_the_app_at_ui(watched, api, limits, out_dir):
    """Opened from the service itself, the page talks to its own origin without being told, under the
    app's Content-Security-Policy (which the static server in the other tests does not send)."""
    page = watched.page
    response = page.goto(api.url + "/ui/")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    expect_limits_shown(page, limits)
    expect(page.locator("#api-shown")).to_have_text("this site")
    fill(page, "Same origin ", length=15, seed=2)
    page.click("#generate")
    wait_done(page)
    expect(page.locator("#meta")).to_contain_text(re.compile(r"\d+ tokens? in"))
    assert watched.posts() == [api.url + "/"]
    page.screenshot(path=out_dir / "same-origin.png", full_page=True)
    assert not watched.errors
    assert not [m for m in watched.console if "Content Security Policy" in m], watched.console


def test_phone_width(make_page, site, api, limits, out_dir):
    watched = make_page(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True,
                        device_scale_factor=2)
    page = open_page(watched, site, api.url, limits)
    for seed in (1, 2):
        fill(page, "On a small screen ", length=30, seed=seed)
        page.click("#generate")
        wait_done(page)
    page.screenshot(path=out_dir / "phone.png", full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375, "the page scrolls sideways"
    for selector in ("#prefix", "#length", "#seed", "#generate", "#stop", "#output", "#history"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375, selector
    for selector in ("#generate", "#stop"):
        assert page.locator(selector).bounding_box()["height"] >= 40, f"{selector} is too small to tap"


def test_keyboard_alone(watched, site, api, limits, out_dir):
    page = open_page(watched, site, api.url, limits)
    order = []
    for _ in range(11):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    # Stop is disabled while idle, so it is skipped; the server settings come last.
    assert order == ["prefix", "length", "temperature", "top_k", "top_p", "truncate", "repetition_penalty",
                     "bad_words", "seed", "generate", "SUMMARY"], order
    page.focus("#prefix")
    page.keyboard.type("Typed with keys ")
    page.keyboard.press("Control+Enter")
    wait_done(page)
    assert shown(page)[0] == "Typed with keys " and shown(page)[1]
    # Generate from the button with Enter: focus is on it, visibly, and comes back to it afterwards.
    page.focus("#seed")
    page.keyboard.press("Tab")
    expect(page.locator("#generate")).to_be_focused()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", "no visible focus on the button"
    page.screenshot(path=out_dir / "keyboard-focus.png")
    page.keyboard.press("Enter")
    wait_done(page)
    expect(page.locator("#generate")).to_be_focused()
    assert len(watched.posts()) == 2, watched.posts()
    assert not watched.errors


def test_history_copy_and_clear(make_page, site, api, limits, out_dir):
    watched = make_page(color_scheme="dark")        # and a look at the dark colours
    watched.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site)
    page = open_page(watched, site, api.url, limits)
    for word in ("one ", "two ", "three "):
        fill(page, word, length=12, seed=5)
        page.click("#generate")
        wait_done(page)
    expect(page.locator("#history .prefix")).to_have_text(["two ", "one "])   # newest first
    page.screenshot(path=out_dir / "history-dark.png", full_page=True)
    newest = page.locator("#history li").first
    expected = newest.locator(".text").text_content()
    newest.locator("button.copy").click()
    expect(newest.locator("button.copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == expected
    page.click("#clear")
    expect(page.locator("#history li")).to_have_count(0)
    expect(page.locator("#history-section")).to_be_hidden()
    expect(page.locator("#generate")).to_be_focused()
    assert shown(page)[0] == "three ", "Clear leaves the latest result alone"
    assert not watched.errors


def test_a_links_api_is_for_that_visit_only_and_a_typed_one_is_remembered(watched, site, api, limits, out_dir):
    """A link's ?api= must not stick: one crafted link would otherwise send every later prompt elsewhere."""
    page = open_page(watched, site, api.url, limits)
    expect(page.locator("#api-shown")).to_have_text(f"{api.url} (from the link you opened, this visit only)")
    expect(page.locator("#server")).to_have_attribute("open", "")   # where the prompts go is in view
    assert page.evaluate("localStorage.getItem('gpt2-run.api')") is None
    # Without ?api= the page is back to its own site (which, here, has no API).
    page.goto(f"{site}/index.html")
    expect(page.locator("#api-shown")).to_have_text("this site")
    expect(page.locator("#api-error")).to_contain_text("Could not reach")
    # An address typed into the Server field is remembered.
    page.fill("#api", api.url)
    page.press("#api", "Enter")
    expect_limits_shown(page, limits)
    assert page.evaluate("localStorage.getItem('gpt2-run.api')") == api.url
    page.goto(f"{site}/index.html")
    expect_limits_shown(page, limits)
    expect(page.locator("#api-shown")).to_have_text(api.url)
    assert not watched.errors


def test_network_failure_is_said(watched, site, api, limits, out_dir):
    page = open_page(watched, site, api.url, limits)
    # Point the field at a port where nothing listens: generating says the server can't be reached.
    dead = f"http://127.0.0.1:{free_port()}"
    page.fill("#api", dead)
    page.press("#api", "Enter")
    expect(page.locator("#api-error")).to_contain_text("Could not reach")
    assert page.evaluate("localStorage.getItem('gpt2-run.api')") == dead
    fill(page, "Anyone there? ", length=10)
    page.click("#generate")
    expect(page.locator("#form-error")).to_contain_text("Could not reach the server")
    wait_done(page)
    page.screenshot(path=out_dir / "network-error.png", full_page=True)
    # Something that is not an http(s) URL is refused next to the field.
    page.fill("#api", "ftp://example")
    page.press("#api", "Enter")
    expect(page.locator("#api-error")).to_contain_text("https://")
    assert page.evaluate("localStorage.getItem('gpt2-run.api')") == dead
    assert not watched.errors


def test_an_api_key_typed_on_the_page_is_sent_and_kept_for_the_tab_only(make_page, site, tiny_run, limits, out_dir):
    key = "page-key-0123456789"
    with serve(tiny_run, site, out_dir / "server-keyed.log", API_KEYS=key) as keyed:
        watched = make_page()
        page = open_page(watched, site, keyed.url, limits)  # /limits stays open
        fill(page, "Let me in ", length=8, seed=1)
        page.click("#generate")
        expect(page.locator("#form-error")).to_contain_text("this server needs an API key")
        expect(page.locator("#server")).to_have_attribute("open", "")  # where the key goes
        wait_done(page)
        page.fill("#key", key)
        page.click("#generate")
        wait_done(page)
        expect(page.locator("#meta")).to_contain_text(re.compile(r"\d+ tokens? in"))
        page.screenshot(path=out_dir / "api-key.png", full_page=True)
        assert page.evaluate("sessionStorage.getItem('gpt2-run.key')") == key
        assert key not in page.evaluate("JSON.stringify(localStorage)")
        page.reload()
        expect(page.locator("#key")).to_have_value(key)  # same tab: still there
        other = make_page()  # a new browser session: gone
        open_page(other, site, keyed.url, limits)
        expect(other.page.locator("#key")).to_have_value("")
        assert not watched.errors and not other.errors
    assert key not in (out_dir / "server-keyed.log").read_text()


def test_a_delimited_runs_defaults_fill_the_fields_and_answer_whole_texts(watched, site, api, limits, out_dir):
    assert limits["text_format"] == "delimited"  # the tiny run's corpus is <|startoftext|>...<|endoftext|> lines
    page = open_page(watched, site, api.url, limits)
    expect(page.locator("#prefix")).to_have_value("<|startoftext|>")
    expect(page.locator("#truncate")).to_have_value("<|endoftext|>")
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.method == "POST" else None)
    page.fill("#seed", "4")
    page.fill("#length", "40")
    page.click("#generate")
    wait_done(page)
    page.screenshot(path=out_dir / "whole-text.png", full_page=True)
    prefix, generated = shown(page)
    [body] = bodies
    direct = httpx.post(api.url + "/", json={**body, "stream": False}, timeout=30).json()
    assert prefix == "" and "<|startoftext|>" + generated == direct["text"]
    assert "<|" not in generated and generated.strip()
    # cleared fields are sent as empty (none), not left to the server's defaults
    page.fill("#prefix", "")
    page.fill("#truncate", "")
    page.click("#generate")
    wait_done(page)
    assert (bodies[-1]["prefix"], bodies[-1]["truncate"]) == ("", "")
    assert not watched.errors


def test_repetition_penalty_and_banned_words_fields(watched, site, api, limits, out_dir):
    page = open_page(watched, site, api.url, limits)
    penalty = limits["repetition_penalty"]
    expect(page.locator("#repetition_penalty-hint")).to_have_text(
        f"{penalty['min']:g}–{penalty['max']:g} · 1 = off; 1.2 curbs loops (CTRL's penalty)")
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "POST" else None)
    fill(page, "<|startoftext|>my dog", length=30, seed=3, temperature=1, top_k=0, repetition_penalty=1.3)
    page.fill("#bad_words", " likes, the red ball ,")
    page.click("#generate")
    wait_done(page)
    page.screenshot(path=out_dir / "steering.png", full_page=True)
    assert sent[-1]["repetition_penalty"] == 1.3 and sent[-1]["bad_words"] == ["likes", "the red ball"]
    # What the page shows is the server's answer to what it sent, which holds no banned word.
    answer = httpx.post(api.url + "/", json={**sent[-1], "stream": False}, timeout=30).json()
    prefix, generated = shown(page)
    assert "<|startoftext|>" + prefix + generated == answer["text"] and generated  # the page hides the marker
    assert not re.search(r"\blikes\b|\bthe red ball\b", generated, re.I), generated
    # Out of range: the server's message under the field.
    page.fill("#repetition_penalty", "3")
    page.click("#generate")
    error = page.locator("#repetition_penalty-error")
    expect(error).to_be_visible()
    direct = httpx.post(api.url + "/", json={"repetition_penalty": 3}, timeout=30).json()
    assert direct["parameter"] == "repetition_penalty"
    expect(error).to_have_text(direct["error"])
    expect(page.locator("#repetition_penalty")).to_have_attribute("aria-invalid", "true")
    assert not watched.errors

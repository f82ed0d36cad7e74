"""The web chat page (``chat/static/``) in Debian's chromium, driven by Playwright.

The page talks only the OpenAI API, so most tests serve it from a stand-in server (standard
library, in a thread) whose ``/v1/chat/completions`` streams a chosen reply slowly, a few
characters per event, each event split across two writes (and a UTF-8 character split across
reads) so the page's SSE parser has to reassemble them. What is checked: streaming shows
partial text, markdown renders with no HTML from the model ever becoming elements, Stop keeps
the partial reply, Export downloads the OpenAI ``messages``, New chat clears, the model's name,
and a 401 shown in the chat.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

STATIC = Path(__file__).resolve().parents[1] / "src" / "chatforge" / "chat" / "static"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}


class StandIn(ThreadingHTTPServer):
    """GET / and /static/* from the static folder, /v1/models, /v1/config, and a streaming
    /v1/chat/completions answering ``self.reply`` ``self.step`` characters per event."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.key: str | None = None
        self.reply = "Hello!"
        self.step, self.delay = 4, 0.01
        self.requests: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class Handler(BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, data: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.server.key and self.headers.get("Authorization") != f"Bearer {self.server.key}":
            self._send(401, json.dumps({"error": {"message": "Invalid API key", "type": "invalid_request_error"}})
                       .encode())
            return False
        return True

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/" or path.startswith("/static/"):
            f = STATIC / ("index.html" if path == "/" else path[len("/static/"):])
            if f.parent == STATIC and f.is_file():
                self._send(200, f.read_bytes(), TYPES.get(f.suffix, "application/octet-stream"))
            else:
                self._send(404, b"{}")
        elif path == "/v1/models":
            if self._authorised():
                self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                           .encode())
        elif path == "/v1/config":
            self._send(200, json.dumps({"defaults": {"temperature": 0.3, "top_p": 0.95, "max_tokens": 99}}).encode())
        else:
            self._send(404, b'{"error": {"message": "no route"}}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._authorised():
            return
        self.server.requests.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes

        def event(obj, split: bool = True) -> None:
            data = b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
            cut = next((i + 1 for i, b in enumerate(data) if b >= 0x80), len(data) // 2)  # inside a character
            for part in (data[:cut], data[cut:]) if split else (data,):  # an event in two reads
                if part:
                    self.wfile.write(part)
                    self.wfile.flush()
                    time.sleep(0.002)

        text, step = self.server.reply, self.server.step
        try:
            event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i in range(0, len(text), step):
                time.sleep(self.server.delay)
                event({"choices": [{"index": 0, "delta": {"content": text[i:i + step]}, "finish_reason": None}]})
            event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # Stop closed the connection


@pytest.fixture(scope="module")
def server():
    srv = StandIn()
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    server.key, server.reply, server.step, server.delay = None, "Hello!", 4, 0.01
    server.requests.clear()
    ctx = browser.new_context(accept_downloads=True)
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url.rstrip("/"))
    pg = ctx.new_page()
    problems = watch(pg)
    pg.set_default_timeout(10_000)
    pg.goto(server.url)
    yield pg
    ctx.close()
    assert problems == []


def watch(page) -> list[str]:
    """Uncaught script errors and Content-Security-Policy refusals: none expected."""
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    return problems


def expect(locator):
    return sync_api.expect(locator)


def ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_done(page) -> None:
    page.wait_for_selector("#messages .msg.assistant.streaming", state="detached")
    expect(page.locator("#send")).to_be_enabled()


def assistant_text(page, i: int = -1) -> str:
    return page.locator("#messages .msg.assistant .body").nth(i).inner_text()


# ---------------------------------------------------------------- streaming, history, settings
def test_reply_streams_in_and_the_history_is_sent(page, server):
    expect(page.locator("#model-name")).to_have_text("fake-model")
    expect(page.locator("#temperature")).to_have_value("0.3")  # the server's published defaults
    server.reply, server.delay = "The quick brown fox jumps over the lazy dog, twice: é€😀 done.", 0.04
    page.fill("#system", "Be brief.")
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")  # a newline, not a send
    page.type("#input", "line two")
    assert server.requests == []
    page.press("#input", "Enter")
    page.wait_for_function(
        "() => { const m = document.querySelector('#messages .msg.assistant');"
        " return m && m.classList.contains('streaming') && m.querySelector('.body').textContent.length >= 8 }")
    partial = assistant_text(page)
    wait_done(page)
    final = assistant_text(page)
    assert final == server.reply and 0 < len(partial) < len(final) and final.startswith(partial.rstrip("▍"))
    expect(page.locator("#messages .msg.user .body")).to_have_text("line one\nline two")
    expect(page.locator("#speed")).to_contain_text("tok/s")

    server.reply, server.delay = "Second.", 0.0
    ask(page, "And again")
    wait_done(page)
    first, second = server.requests
    assert first["stream"] is True and first["model"] == "fake-model"
    assert (first["temperature"], first["top_p"], first["max_tokens"]) == (0.3, 0.95, 99)
    assert second["messages"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "line one\nline two"},
                                  {"role": "assistant", "content": final},
                                  {"role": "user", "content": "And again"}]


# ---------------------------------------------------------------- markdown, safely
PAYLOAD = """# Title

Some **bold**, *italic* and `x<y && <b>` code.

<script>window.__pwned = 1</script>
<img src=x onerror="window.__pwned = 1"> <b onmouseover="window.__pwned = 1">hover</b>
[bad](javascript:window.__pwned=1) and [good](https://example.com/a?b=1)

- one
- two

1. first
2. second

```python
print("<img src=x onerror=alert(1)>")
```
"""


def test_markdown_renders_and_model_html_stays_text(page, server):
    server.reply, server.step, server.delay = PAYLOAD, 40, 0.0
    ask(page, "show me")
    wait_done(page)
    body = page.locator("#messages .msg.assistant .body")
    assert page.locator("#messages img, #messages script, #messages b, #messages [onerror]").count() == 0
    assert page.evaluate("window.__pwned") is None
    text = body.inner_text()
    assert '<script>window.__pwned = 1</script>' in text and 'onerror="window.__pwned = 1"' in text
    expect(body.locator("h2")).to_have_text("Title")
    expect(body.locator("strong")).to_have_text("bold")
    expect(body.locator("em")).to_have_text("italic")
    expect(body.locator("p code")).to_have_text("x<y && <b>")
    expect(body.locator("ul li")).to_have_text(["one", "two"])
    expect(body.locator("ol li")).to_have_text(["first", "second"])
    links = body.locator("a")
    expect(links).to_have_count(1)
    assert links.get_attribute("href") == "https://example.com/a?b=1"
    assert "noopener" in links.get_attribute("rel") and links.get_attribute("target") == "_blank"
    assert "[bad](javascript:window.__pwned=1)" in text  # not a link: shown as written
    code = body.locator("pre > code")
    expect(code).to_have_text('print("<img src=x onerror=alert(1)>")')
    assert code.get_attribute("class") == "language-python"
    expect(body.locator(".code .lang")).to_have_text("python")
    body.locator(".code .copy").click()
    expect(body.locator(".code .copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == 'print("<img src=x onerror=alert(1)>")'
    page.locator("#messages .msg.assistant .tools .copy").click()
    expect(page.locator("#messages .msg.assistant .tools .copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == PAYLOAD


# ---------------------------------------------------------------- Stop, Export, New chat
def test_stop_keeps_the_partial_reply(page, server):
    server.reply, server.step, server.delay = "word " * 300, 5, 0.03
    ask(page, "Talk for a long time")
    expect(page.locator("#stop")).to_be_enabled()
    expect(page.locator("#send")).to_be_disabled()
    page.wait_for_function("() => document.querySelector('#messages .msg.assistant .body').textContent.length > 20")
    page.click("#stop")
    wait_done(page)
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#messages .msg.assistant .stopped")).to_have_text("(stopped)")
    partial = assistant_text(page)
    assert partial.startswith("word word") and len(partial) < len(server.reply) - 100
    with page.expect_download() as dl:
        page.click("#export")
    msgs = json.loads(Path(dl.value.path()).read_text())
    assert msgs == [{"role": "user", "content": "Talk for a long time"}, {"role": "assistant", "content": partial}]

    server.reply, server.delay = "ok", 0.0
    ask(page, "Thanks")  # Send works again, and the partial reply is part of the history
    wait_done(page)
    assert server.requests[-1]["messages"][1] == {"role": "assistant", "content": partial}


def test_export_and_new_chat(page, server):
    server.delay = 0.0
    page.fill("#system", "You are a pirate.")
    ask(page, "Hi")
    wait_done(page)
    with page.expect_download() as dl:
        page.click("#export")
    assert dl.value.suggested_filename.endswith(".json")
    assert json.loads(Path(dl.value.path()).read_text()) == [
        {"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}]
    page.click("#new-chat")
    expect(page.locator("#messages > *")).to_have_count(0)
    with page.expect_download() as dl:
        page.click("#export")
    assert json.loads(Path(dl.value.path()).read_text()) == [{"role": "system", "content": "You are a pirate."}]
    ask(page, "Again")
    wait_done(page)
    assert server.requests[-1]["messages"] == [{"role": "system", "content": "You are a pirate."},
                                               {"role": "user", "content": "Again"}]


# ---------------------------------------------------------------- errors, API key, narrow screens
def test_401_is_shown_in_the_chat_and_the_key_fixes_it(browser, server):
    server.key, server.reply, server.delay = "sekrit", "Hello!", 0.0
    server.requests.clear()
    ctx = browser.new_context(viewport={"width": 380, "height": 700})
    try:
        page = ctx.new_page()
        problems = watch(page)
        page.set_default_timeout(10_000)
        page.goto(server.url)
        note = page.locator("#messages .note.error")
        expect(note).to_contain_text("401")
        expect(note).to_contain_text("Invalid API key")
        ask(page, "Hi")
        expect(note).to_have_count(2)
        expect(page.locator("#messages .msg")).to_have_count(0)  # the failed turn is not kept...
        expect(page.locator("#input")).to_have_value("Hi")  # ...its text is given back to retry
        assert page.evaluate("document.documentElement.scrollWidth") <= 380  # fits a phone
        expect(page.locator("#send")).to_be_in_viewport()

        if not page.locator("#settings").get_attribute("open"):
            page.click("#settings summary")  # collapsed on a narrow screen
        page.check("#remember")
        page.fill("#api-key", "sekrit")
        page.press("#api-key", "Tab")  # change: the model list is fetched again with the key
        expect(page.locator("#model-name")).to_have_text("fake-model")
        page.click("#send")
        wait_done(page)
        assert assistant_text(page) == "Hello!"
        page.reload()
        expect(page.locator("#api-key")).to_have_value("sekrit")  # remembered, as asked
        expect(page.locator("#model-name")).to_have_text("fake-model")
        page.click("#settings summary")
        page.uncheck("#remember")
        assert page.evaluate("localStorage.getItem('chatforge.apiKey')") is None
        assert problems == []
    finally:
        ctx.close()


# ---------------------------------------------------------------- end to end: the real `chatforge serve`
@pytest.fixture(scope="module")
def real_server():
    """``chatforge serve`` (FastAPI + uvicorn, on a thread) with the tiny model steered to write
    letters and never end (:func:`chatforge.models.tiny.steer`): replies are printable and run to
    max_tokens, so what is checked is the page against the real server, not what the model says."""
    from chatforge.chat import server
    from chatforge.generate.engine import Engine
    from chatforge.models.tiny import chatty_tiny

    engine = Engine(*chatty_tiny())
    srv = server.make_server(engine, "tiny-chat", port=0, api_key="sekrit")
    yield srv
    srv.close()


def test_end_to_end_with_the_real_server(browser, real_server):
    ctx = browser.new_context(accept_downloads=True)
    try:
        page = ctx.new_page()
        problems = watch(page)
        page.set_default_timeout(60_000)
        page.goto(real_server.url + "/")
        expect(page.locator("#messages .note.error")).to_contain_text("401")  # the server has a key
        page.fill("#api-key", "sekrit")
        page.press("#api-key", "Tab")
        expect(page.locator("#model-name")).to_have_text("tiny-chat")
        expect(page.locator("#temperature")).to_have_value("1")  # the server's /v1/config defaults
        page.fill("#max-tokens", "12")
        page.fill("#system", "Be brief.")
        ask(page, "Hello")
        wait_done(page)
        assert page.locator("#messages .note.error").all_inner_texts()[1:] == []  # only the first 401
        reply = assistant_text(page)
        assert reply.strip()
        expect(page.locator("#speed")).to_contain_text("tok/s")  # from the usage chunk
        with page.expect_download() as dl:
            page.click("#export")
        msgs = json.loads(Path(dl.value.path()).read_text())
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[2]["content"].strip()
        assert problems == []
    finally:
        ctx.close()

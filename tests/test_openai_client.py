"""The shared OpenAI-compatible client (chatforge.data.openai_client) against a stand-in server
(standard library, in a thread) for what our own server never does: 429 with Retry-After,
5xx, replies that come too late, malformed JSON, 401; plus the cache's crash safety."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chatforge.data.openai_client import ApiClient, ReplyCache, RequestFailed, _retry_after, request_key
from chatforge.errors import ChatforgeError, DataError


class Stub(ThreadingHTTPServer):
    """``/v1/chat/completions`` answering from ``script``: a list of actions used in turn, then
    ``"ok"`` forever. Actions: ``"ok"``, ``"429"`` (Retry-After: ``retry_after``), ``"503"``,
    ``"slow"`` (sleeps ``delay`` s first), ``"garbage"`` (not JSON), ``"nochoices"``, ``"401"``, ``"400"``."""

    daemon_threads = True

    def __init__(self, script=(), retry_after: str = "0", delay: float = 1.0):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.retry_after, self.delay = list(script), retry_after, delay
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.active = self.peak = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_action(self) -> str:
        with self.lock:
            return self.script.pop(0) if self.script else "ok"


class Handler(BaseHTTPRequestHandler):
    server: Stub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, data: bytes, headers: dict | None = None) -> None:
        with self.server.lock:  # done before the reply leaves: the client may send the next one at once
            self.server.active -= 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        s = self.server
        with s.lock:
            s.bodies.append(body)
            s.active += 1
            s.peak = max(s.peak, s.active)
        action = s.next_action()
        err = lambda code, msg, **h: self._send(code, json.dumps({"error": {"message": msg}}).encode(), h)  # noqa: E731
        if action == "429":
            err(429, "rate limited", **{"Retry-After": s.retry_after})
        elif action == "503":
            err(503, "overloaded")
        elif action == "401":
            err(401, "Invalid API key")
        elif action == "400":
            err(400, "prompt too long")
        elif action == "garbage":
            self._send(200, b"<html>proxy error</html>")
        elif action == "nochoices":
            self._send(200, b'{"object": "chat.completion"}')
        else:
            time.sleep(s.delay if action == "slow" else 0.05)  # 0.05: concurrent requests overlap
            text = "echo: " + body["messages"][-1]["content"]
            self._send(200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                     "finish_reason": "stop"}],
                                        "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode())


@pytest.fixture
def stub():
    servers = []

    def make(**kw) -> Stub:
        srv = Stub(**kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def body(text: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 4}


def test_429_is_retried_after_the_servers_retry_after(stub):
    srv = stub(script=["429", "429"], retry_after="7")
    waits: list[float] = []
    c = ApiClient(srv.url, retries=3, backoff=0.01, sleep=waits.append)
    r = c.post("/chat/completions", body("hi"))
    assert r.text == "echo: hi" and not r.cached
    assert waits == [7.0, 7.0]  # the server's wait, longer than our 0.01 s back-off
    assert c.stats.sent == 3 and c.stats.retries == 2 and c.stats.ok == 1 and c.stats.tokens == 5


def test_5xx_garbage_and_missing_choices_are_retried_then_fail_the_item(stub):
    srv = stub(script=["503", "garbage", "nochoices"])
    c = ApiClient(srv.url, retries=2, backoff=0.01, sleep=lambda s: None)
    with pytest.raises(RequestFailed) as e:
        c.post("/chat/completions", body("x"))
    assert "malformed reply: no 'choices'" in e.value.reason and "after 3 tries" in e.value.reason
    assert c.stats.failed == 1 and c.stats.sent == 3
    assert c.post("/chat/completions", body("x")).text == "echo: x"  # the script is used up: ok again


def test_a_slow_reply_times_out_and_is_retried(stub):
    srv = stub(script=["slow"], delay=2.0)
    c = ApiClient(srv.url, retries=1, timeout=0.5, backoff=0.01, sleep=lambda s: None)
    assert c.post("/chat/completions", body("late")).text == "echo: late"
    assert c.stats.retries == 1
    srv.script = ["slow", "slow"]
    with pytest.raises(RequestFailed, match="timeout: no answer within 0.5 s"):
        c.post("/chat/completions", body("later"))


def test_401_stops_the_run_400_fails_only_its_item(stub):
    srv = stub(script=["400", "401"])
    c = ApiClient(srv.url, retries=3, backoff=0.01, sleep=lambda s: None)
    with pytest.raises(RequestFailed, match="HTTP 400: prompt too long") as e:
        c.post("/chat/completions", body("a"))
    assert "tries" not in e.value.reason and c.stats.sent == 1  # not retried
    with pytest.raises(ChatforgeError, match="HTTP 401.*OPENAI_API_KEY") as e2:
        c.post("/chat/completions", body("b"))
    assert not isinstance(e2.value, RequestFailed)


def test_unreachable_server_is_one_fatal_error():
    c = ApiClient("http://127.0.0.1:9/v1", retries=1, backoff=0.01, sleep=lambda s: None)
    with pytest.raises(ChatforgeError, match="cannot reach .*after 2 tries"):
        c.map("/chat/completions", [body("a"), body("b")])


def test_map_limits_concurrency_keeps_order_and_sends_duplicates_once(stub):
    srv = stub()
    c = ApiClient(srv.url, concurrency=3)
    bodies = [body(str(i)) for i in range(9)] + [body("0")]
    out = c.map("/chat/completions", bodies)
    assert [r.text for r in out] == [f"echo: {i}" for i in range(9)] + ["echo: 0"]
    assert len(srv.bodies) == 9 and 2 <= srv.peak <= 3


def test_cache_answers_a_second_run_and_survives_a_cut_line(stub, tmp_path):
    srv = stub()
    path = tmp_path / "c.jsonl"
    with ApiClient(srv.url, cache=path) as c:
        c.map("/chat/completions", [body("a"), body("b")])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"v": 1, "key": "abc", "path": "/chat/comp')  # a kill in the middle of a line
    with ApiClient(srv.url, cache=path) as c:
        out = c.map("/chat/completions", [body("a"), body("b"), body("c")])
    assert [r.cached for r in out] == [True, True, False] and c.stats.cached == 2
    assert len(srv.bodies) == 3  # a and b were paid once
    lines = path.read_text().splitlines()
    keys = [json.loads(x)["key"] for x in lines]  # every line parses: the cut one was cut off
    assert len(keys) == len(set(keys)) == 3
    assert set(keys) == {request_key("/chat/completions", body(t)) for t in "abc"}


def test_cache_with_a_broken_middle_line_names_it(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"key": "a", "reply": {}}\nnot json\n{"key": "b", "reply": {}}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: not a reply-cache line"):
        ReplyCache(path)


def test_cache_reads_back_replies_with_unicode_line_separators(tmp_path):
    path = tmp_path / "c.jsonl"
    reply = {"choices": [{"message": {"content": "one\u2028two\x85three\x1cfour"}}]}
    cache = ReplyCache(path)
    cache.put("k", "/chat/completions", body("a"), reply)
    cache.close()
    again = ReplyCache(path)  # raw U+2028 / NEL in the line: still one line
    assert len(again) == 1 and again.get("k") == reply
    again.close()


def test_a_cache_path_that_is_a_folder_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"cannot use it as the reply cache"):
        ReplyCache(tmp_path)


def test_retry_after_forms():
    assert _retry_after("3") == 3.0 and _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
    assert ApiClient("x:1", backoff=1, max_backoff=5)._delay(10, None) == 5  # capped

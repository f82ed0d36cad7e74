"""`chatforge serve` over real HTTP on loopback: the real `openai` client, raw sockets for what a
client library will not send, and a real `chatforge serve` process for SIGTERM.

The served tiny model is steered (chatforge.models.tiny.steer) to say printable words and never
end a turn, so a reply is as long as `max_tokens` asks: long replies for the streaming,
disconnect and queue tests, and no test depends on what a random model happens to say.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from chatforge.chat.server import make_server
from chatforge.generate.engine import Engine, SamplingConfig
from chatforge.generate.scheduler import Scheduler
from chatforge.models.tiny import steer, tiny_model, tiny_tokenizer, word_token_ids

REPO = Path(__file__).resolve().parents[1]
TOK = tiny_tokenizer()
EOS = [TOK.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
MODEL = steer(tiny_model(), prefer=word_token_ids(TOK), never=EOS).eval()
HELLO = [{"role": "user", "content": "Hello there"}]
KEY = "sk-test-123"
ORIGIN = "http://page.example"


def engine() -> Engine:
    return Engine(MODEL, TOK)  # one engine (decoder state) per scheduler; the weights are shared


@pytest.fixture(scope="module")
def server():
    with make_server(engine(), "tiny", default_max_tokens=16) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed():
    with make_server(engine(), "tiny", default_max_tokens=4, api_key=KEY, cors_origins=[ORIGIN]) as srv:
        yield srv


def client(srv, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def http(srv, method: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None):
    """(status, headers, text) of one request; errors are answers, not exceptions."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(srv.url + path, data=data, method=method, headers={**h, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def post(srv, path: str = "/v1/chat/completions", **body):
    if path.endswith("chat/completions"):
        body.setdefault("messages", HELLO)
    status, headers, text = http(srv, "POST", path, body)
    return status, json.loads(text)


def wait_for(cond, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def raw_stream(srv, max_tokens: int, **extra) -> socket.socket:
    """A streaming chat request on a raw socket, returned once its first content chunk is in."""
    host, port = srv.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    body = json.dumps({"messages": HELLO, "stream": True, "max_tokens": max_tokens, **extra}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    seen = b""
    while b'"content":"' not in seen.replace(b'"content":""', b""):  # past the role chunk's empty content
        chunk = s.recv(65536)
        assert chunk, seen
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200")
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    while b"data: [DONE]" not in out and (chunk := s.recv(65536)):
        out += chunk
    return out


class Spy:
    """A scheduler in front of the real one that keeps every handle; with ``hold``, each
    handle's deltas after its first token are held back until ``release`` is set."""

    def __init__(self, inner: Scheduler, hold: bool = False):
        self.inner, self.hold, self.release = inner, hold, threading.Event()
        self.handles: list = []
        self.released_by_client: bool | None = None

    def submit(self, prompt, cfg):
        h = SpyHandle(self.inner.submit(prompt, cfg), self)
        self.handles.append(h)
        return h

    def stats(self) -> dict:
        return self.inner.stats()

    def close(self, **kw) -> None:
        self.inner.close(**kw)


class SpyHandle:
    """Done once its final delta has been handed on (held ones are not); records cancel()."""

    def __init__(self, inner, spy: Spy):
        self.inner, self.spy = inner, spy
        self.done = self.cancel_called = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def cancel(self) -> None:
        self.cancel_called = True
        self.inner.cancel()

    async def __aiter__(self):
        first = True
        async for d in self.inner:
            self.done = d.finish_reason is not None
            yield d
            if first and d.token_ids and self.spy.hold:
                first = False
                end = time.monotonic() + 30
                while not self.spy.release.is_set() and time.monotonic() < end:
                    await asyncio.sleep(0.01)  # (cancellable, unlike a thread waiting on the event)
                if self.spy.released_by_client is None:
                    self.spy.released_by_client = self.spy.release.is_set()


# ---------------------------------------------------------------------------- the API
def test_models_config_health_page_and_openapi(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].context_length == 2048
    assert client(server).models.retrieve("tiny").id == "tiny"
    status, _, text = http(server, "GET", "/v1/models/other")
    assert status == 404 and json.loads(text)["error"]["code"] == "model_not_found"
    status, _, text = http(server, "GET", "/v1/config")
    cfg = json.loads(text)
    assert status == 200 and cfg["defaults"]["max_tokens"] == 16 and cfg["defaults"]["temperature"] == 1.0
    assert set(cfg["defaults"]) >= {"temperature", "top_p", "max_tokens", "repetition_penalty"}
    assert cfg["context_length"] == 2048 and "chat_defaults" in cfg and cfg["auth"] is False
    assert json.loads(http(server, "GET", "/health")[2]) == {"status": "ok", "model": "tiny", "auth": False}
    status, headers, page = http(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and "<" in page
    schema = json.loads(http(server, "GET", "/openapi.json")[2])
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/config", "/health",
            "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["temperature"] == {"type": "number", "minimum": 0, "maximum": 2}


def test_page_placeholder_without_index(tmp_path):
    with make_server(engine(), "tiny", static_dir=tmp_path) as srv:
        status, _, page = http(srv, "GET", "/")
        assert status == 200 and "not installed" in page and "tiny" in page
        assert http(srv, "GET", "/static/app.js")[0] == 404


def test_chat_n_usage_and_logprobs(server):
    r = client(server).chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, n=2, seed=1,
                                               logprobs=True)
    assert r.object == "chat.completion" and r.model == "tiny" and [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.message.role == "assistant" and c.message.content and c.finish_reason == "length"
        assert len(c.logprobs.content) == 5 and all(t.logprob <= 0 for t in c.logprobs.content)
    assert r.choices[0].message.content != r.choices[1].message.content  # seed, seed + 1
    prompt = len(engine().encode_chat(HELLO))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, 10, prompt + 10)


def test_seed_temperature_and_stop(server):
    c = client(server).chat.completions
    a, b = (c.create(model="t", messages=HELLO, max_tokens=12, seed=7).choices[0].message.content for _ in "ab")
    assert a == b
    greedy = c.create(model="t", messages=HELLO, max_tokens=12, temperature=0).choices[0]
    text = greedy.message.content
    assert greedy.finish_reason == "length" and len(text) >= 4
    stop = text[2:4]
    cut = c.create(model="t", messages=HELLO, max_tokens=12, temperature=0, stop=stop).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == text[:text.index(stop)]


def test_stream_matches_non_stream_with_usage(server):
    c = client(server).chat.completions
    full = c.create(model="t", messages=HELLO, max_tokens=10, temperature=0).choices[0]
    chunks = list(c.create(model="t", messages=HELLO, max_tokens=10, temperature=0, stream=True,
                           stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(ch.usage is None for ch in chunks[:-1])


def test_streaming_n_choices(server):
    c = client(server).chat.completions
    texts, finished = {0: "", 1: "", 2: ""}, set()
    for ch in c.create(model="t", messages=HELLO, max_tokens=4, n=3, seed=2, stream=True):
        for x in ch.choices:
            texts[x.index] += x.delta.content or ""
            if x.finish_reason:
                finished.add(x.index)
    assert finished == {0, 1, 2}
    ref = c.create(model="t", messages=HELLO, max_tokens=4, n=3, seed=2).choices
    assert [texts[i] for i in range(3)] == [x.message.content for x in ref]


def test_streaming_is_incremental():
    """Each handle's deltas after its first token are held back until the client has read the
    first text chunk: a server that buffered the reply (or the first chunks) would never show
    it, the hold would time out and ``released_by_client`` would be False. Arrival times are
    recorded on the client: the first text chunk arrives well before the last one."""
    spy = Spy(Scheduler(engine()), hold=True)
    with make_server(spy.inner.engine, "tiny", scheduler=spy) as srv:
        stream = client(srv).chat.completions.create(model="t", messages=HELLO, max_tokens=48, temperature=0,
                                                     stream=True)
        arrivals, texts = [], []
        for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                arrivals.append(time.monotonic())
                texts.append(ch.choices[0].delta.content)
                if len(arrivals) == 1:
                    time.sleep(0.3)  # the rest is held meanwhile: it cannot already be on its way
                    spy.release.set()
    spy.close()
    assert spy.released_by_client is True
    assert len(texts) > 3 and arrivals[-1] - arrivals[0] >= 0.25
    ref = Engine(MODEL, TOK).chat([HELLO], SamplingConfig(temperature=0, max_new_tokens=48))[0]
    assert "".join(texts) == ref.text


def test_legacy_completions(server):
    c = client(server).completions
    r = c.create(model="t", prompt="The sky is", max_tokens=6, temperature=0, logprobs=1)
    ch = r.choices[0]
    assert r.object == "text_completion" and ch.finish_reason == "length" and ch.text
    assert len(ch.logprobs.tokens) == 6 and "".join(ch.logprobs.tokens) == ch.text
    assert ch.logprobs.text_offset[0] == 0 and all(lp <= 0 for lp in ch.logprobs.token_logprobs)
    assert r.usage.prompt_tokens == len(TOK("The sky is")["input_ids"]) and r.usage.completion_tokens == 6
    ids = TOK("The sky is")["input_ids"]
    same = c.create(model="t", prompt=ids, max_tokens=6, temperature=0).choices[0].text
    assert same == ch.text  # token ids are the same prompt
    many = c.create(model="t", prompt=["The sky is", "Hello"], max_tokens=3, n=2, seed=3)
    assert [x.index for x in many.choices] == [0, 1, 2, 3] and many.usage.completion_tokens == 12
    streamed = "".join(x.choices[0].text for x in c.create(model="t", prompt="The sky is", max_tokens=6,
                                                           temperature=0, stream=True) if x.choices)
    assert streamed == ch.text
    status, err = post(server, "/v1/completions", prompt="x", echo=True)
    assert status == 400 and err["error"]["param"] == "echo" and "echo" in err["error"]["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {"temperature": 3}, "temperature"),
    ("/v1/chat/completions", {"temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"max_tokens": 2.5}, "max_tokens"),
    ("/v1/chat/completions", {"n": 100}, "n"),
    ("/v1/chat/completions", {"n": True}, "n"),
    ("/v1/chat/completions", {"stop": [""]}, "stop"),
    ("/v1/chat/completions", {"seed": "x"}, "seed"),
    ("/v1/chat/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"tools": []}, "tools"),
    ("/v1/chat/completions", {"stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"stream_options": "usage"}, "stream_options"),
    ("/v1/chat/completions", {"model": 3}, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
    ("/v1/chat/completions", {"max_tokens": 2040}, "max_tokens"),  # prompt + max_tokens > context
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [100000]]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "messages": HELLO}, "messages"),
])
def test_bad_requests_are_400_naming_the_param(server, path, body, param):
    status, err = post(server, path, **body)
    assert status == 400, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param
    assert err["error"]["message"]


def test_context_errors_name_the_numbers(server):
    err = post(server, messages=[{"role": "user", "content": "word " * 3000}])[1]["error"]["message"]
    assert "tokens" in err and "2048" in err
    err = post(server, max_tokens=2040)[1]["error"]["message"]
    assert "2040" in err and "2048" in err


def test_harmless_openai_params_are_accepted(server):
    status, body = post(server, max_tokens=2, user="u1", presence_penalty=0, frequency_penalty=0, logit_bias={},
                        store=False, metadata={"a": "b"}, response_format={"type": "text"}, top_logprobs=0,
                        max_completion_tokens=3, top_k=5, min_p=0.01, repetition_penalty=1.1)
    assert status == 200 and body["usage"]["completion_tokens"] == 3  # max_completion_tokens wins


def test_invalid_json_routes_and_methods_answer_openai_errors(server):
    for raw in (b"{not json", b'{"messages": NaN}', b"[" * 100000, b"\xff\xfe"):
        status, _, text = http(server, "POST", "/v1/chat/completions", raw=raw)
        err = json.loads(text)["error"]
        assert status == 400 and "not valid JSON" in err["message"], (raw[:10], text)
    status, _, text = http(server, "POST", "/v1/chat/completions", raw=b'"just a string"')
    assert status == 400 and "JSON object" in json.loads(text)["error"]["message"]
    status, _, text = http(server, "GET", "/v1/nope")
    assert status == 404 and json.loads(text)["error"]["type"] == "not_found_error"
    status, _, text = http(server, "GET", "/v1/chat/completions")
    assert status == 405 and set(json.loads(text)["error"]) == {"message", "type", "param", "code"}

    @server.app.get("/v1/probe")  # a route with a typed parameter: FastAPI's own validation
    async def probe(x: int):
        return {"x": x}

    status, _, text = http(server, "GET", "/v1/probe?x=abc")
    assert status == 400 and json.loads(text)["error"]["param"] == "x"  # not FastAPI's 422 {"detail": ...}
    assert post(server, max_tokens=1)[0] == 200  # and it still serves


def test_metrics_counters_move(server):
    before = http(server, "GET", "/metrics")[2]
    assert "# TYPE chatforge_requests_total counter" in before
    for name in ("chatforge_request_duration_seconds_bucket", "chatforge_time_to_first_token_seconds_count",
                 "chatforge_prompt_tokens_total", "chatforge_generated_tokens_total", "chatforge_queue_depth",
                 "chatforge_batch_size"):
        assert name in before, name
    post(server, max_tokens=3)
    after = http(server, "GET", "/metrics")[2]

    def value(text: str, prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    key = 'chatforge_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert value(after, key) == value(before, key) + 1
    assert value(after, "chatforge_generated_tokens_total ") == value(before, "chatforge_generated_tokens_total ") + 3
    assert value(after, "chatforge_time_to_first_token_seconds_count") == \
        value(before, "chatforge_time_to_first_token_seconds_count") + 1


# ---------------------------------------------------------------------------- access
def test_api_key(keyed):
    with pytest.raises(openai.AuthenticationError) as e:
        client(keyed, "wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    status, headers, text = http(keyed, "POST", "/v1/chat/completions", {"messages": HELLO})
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and json.loads(text)["error"]["message"]
    assert http(keyed, "GET", "/metrics")[0] == 401
    assert http(keyed, "GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    r = client(keyed, KEY).chat.completions.create(model="t", messages=HELLO)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    assert http(keyed, "GET", "/openapi.json")[0] == 401 and http(keyed, "GET", "/nope")[0] == 401
    for open_path in ("/health", "/", "/static/app.js"):
        assert http(keyed, "GET", open_path)[0] in (200, 404), open_path
    assert http(keyed, "GET", "/health")[0] == 200 and http(keyed, "GET", "/")[0] == 200


def test_json_posts_need_the_json_content_type(server):
    body = json.dumps({"messages": HELLO}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", ""):
        status, _, text = http(server, "POST", "/v1/chat/completions", raw=body, headers={"Content-Type": ctype})
        assert status == 415 and "application/json" in json.loads(text)["error"]["message"], ctype
    ok = http(server, "POST", "/v1/chat/completions", raw=json.dumps({"messages": HELLO, "max_tokens": 1}).encode(),
              headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok[0] == 200


def test_cors_is_off_by_default_and_on_for_named_origins(server, keyed):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = http(server, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert "Access-Control-Allow-Origin" not in headers
    assert "Access-Control-Allow-Origin" not in http(server, "GET", "/v1/models", headers={"Origin": ORIGIN})[1]
    status, headers, _ = http(keyed, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
    status, headers, _ = http(keyed, "GET", "/v1/models", headers={"Origin": ORIGIN})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == ORIGIN  # the page can read the error
    status, headers, _ = http(keyed, "OPTIONS", "/v1/chat/completions",
                              headers={**preflight, "Origin": "http://evil.example"})
    assert headers.get("Access-Control-Allow-Origin") != "http://evil.example"


# ---------------------------------------------------------------------------- limits and raw sockets
def connect(srv) -> socket.socket:
    host, port = srv.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def exchange(srv, data: bytes) -> bytes:
    with connect(srv) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_oversized_bodies_are_413(server):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\n")
    out = exchange(server, head + b"Content-Length: %d\r\n\r\n{" % (2 << 20))  # declared: refused unread
    assert out.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in out
    with connect(server) as s:  # chunked, no length: refused once past the limit
        s.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * 65536
        try:
            for _ in range(40):
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = s.recv(65536)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    assert post(server, max_tokens=1)[0] == 200


def test_malformed_and_half_open_requests():
    with make_server(engine(), "tiny", default_max_tokens=2, head_timeout=0.5) as srv:
        assert exchange(srv, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
        big_head = b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 200_000 + b"\r\n\r\n"
        try:  # h11 stops buffering a head past 16 KiB (what one read brings may be parsed whole)
            assert exchange(srv, big_head).startswith(b"HTTP/1.1 400")
        except ConnectionResetError:
            pass
        half = connect(srv)
        half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # ... and nothing more
        assert post(srv, max_tokens=1)[0] == 200  # others are served meanwhile
        t0 = time.monotonic()
        assert half.recv(100) == b"" and time.monotonic() - t0 < 5  # closed at head_timeout
        slow_body = connect(srv)
        slow_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"mess")
        assert slow_body.recv(65536).startswith(b"HTTP/1.1 408")
        assert post(srv, max_tokens=1)[0] == 200


def test_client_disconnecting_mid_stream_frees_its_slot():
    spy = Spy(Scheduler(engine()))
    with make_server(spy.inner.engine, "tiny", scheduler=spy) as srv:
        s = raw_stream(srv, max_tokens=1900)
        assert spy.stats()["running"] == 1
        s.close()
        wait_for(lambda: spy.handles[0].inner.done, what="the handle to be cancelled")
        assert spy.handles[0].cancel_called and list(spy.handles[0].inner)[-1].finish_reason == "cancelled"
        wait_for(lambda: spy.stats()["running"] == 0, what="the slot to be freed")
        assert post(srv, max_tokens=2)[0] == 200
    spy.close()


def test_full_queue_is_503_with_retry_after():
    with make_server(engine(), "tiny", max_batch=1, max_queue=1) as srv:
        running = raw_stream(srv, max_tokens=1900)
        waiting = connect(srv)
        body = json.dumps({"messages": HELLO, "stream": True, "max_tokens": 3}).encode()
        waiting.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: srv.scheduler.stats()["waiting"] == 1, what="the second request to queue")
        status, headers, text = http(srv, "POST", "/v1/chat/completions", {"messages": HELLO})
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert json.loads(text)["error"]["code"] == "queue_full"
        with pytest.raises(openai.APIStatusError) as e:
            client(srv).chat.completions.create(model="t", messages=HELLO)
        assert e.value.status_code == 503
        running.close()  # frees the slot: the queued one runs to its end
        out = read_all(waiting)
        waiting.close()
        assert b'"finish_reason":"length"' in out and b"data: [DONE]\n\n" in out


def test_request_timeout_cancels_and_answers_504():
    spy = Spy(Scheduler(engine()), hold=True)  # never released: every reply stalls after one token
    with make_server(spy.inner.engine, "tiny", scheduler=spy, request_timeout=0.5) as srv:
        status, err = post(srv, max_tokens=1000)
        assert status == 504 and err["error"]["code"] == "request_timeout" and "0.5 s" in err["error"]["message"]
        with pytest.raises(openai.APIError) as e:
            list(client(srv).chat.completions.create(model="t", messages=HELLO, max_tokens=1000, stream=True))
        assert "0.5 s" in str(e.value)
        assert len(spy.handles) == 2 and all(h.cancel_called for h in spy.handles)
        wait_for(lambda: spy.stats()["running"] == 0, what="the slots to be freed")
    spy.release.set()
    spy.close()


def test_concurrent_streams_all_complete(server):
    results: list = [None] * 8

    def go(i: int) -> None:
        chunks = list(client(server).chat.completions.create(model="t", messages=HELLO, max_tokens=8, seed=i,
                                                              stream=True))
        results[i] = ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                      [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None and r[0] and r[1] == ["length"] for r in results), results


# ---------------------------------------------------------------------------- the command
def test_serve_rejects_bad_options_before_loading(capsys):
    from chatforge.cli import main

    for argv, words in ([["--max-batch", "0"], "--max-batch"], [["--max-body", "lots"], "--max-body"],
                        [["--request-timeout", "-1"], "--request-timeout"], [["--port", "70000"], "--port"],
                        [["--cors-origin", "evil"], "--cors-origin"], [["--api-key", ""], "--api-key"]):
        assert main(["serve", "tiny", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err


def test_sigterm_finishes_the_request_in_flight_then_exits_0(tmp_path):
    """`chatforge serve` as a process: it prints its URL, publishes the run's measured chat
    settings, and on SIGTERM stops accepting but streams the reply in flight to its end, exit 0."""
    MODEL.save_pretrained(tmp_path / "m")
    TOK.save_pretrained(tmp_path / "m")
    measured = {"temperature": 0.6, "top_p": 0.85, "repetition_penalty": 1.1, "max_tokens": 200}
    (tmp_path / "m" / "chat_defaults.json").write_text(json.dumps({"settings": measured}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHATFORGE_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "chatforge.cli", "serve", str(tmp_path / "m"), "--port", "0",
                             "--name", "t1", "--dtype", "fp32"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving t1 at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["t1"]
        with urllib.request.urlopen(url + "/config", timeout=30) as r:
            assert json.loads(r.read())["chat_defaults"] == measured  # the run's, for the page
        stream = c.chat.completions.create(model="t1", messages=HELLO, max_tokens=300, stream=True,
                                           stream_options={"include_usage": True})
        it = iter(stream)
        first = next(it)
        assert first.choices[0].delta.role == "assistant"
        proc.send_signal(signal.SIGTERM)
        port = int(url.rsplit(":", 1)[1].split("/")[0])

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return False
            except OSError:
                return True

        wait_for(refused, what="the listener to close")  # no new requests ...
        rest = list(it)  # ... but the one in flight runs to its end
        assert rest[-2].choices[0].finish_reason == "length" and rest[-1].usage.completion_tokens == 300
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

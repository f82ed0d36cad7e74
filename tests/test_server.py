"""The OpenAI-compatible server, over real HTTP on loopback with the tiny model."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from chatforge.chat.server import make_server
from chatforge.generate.engine import Engine, SamplingConfig
from chatforge.models.tiny import steer, tiny_model, tiny_tokenizer, word_token_ids

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server():
    srv = make_server(Engine(tiny_model(), tiny_tokenizer()), "tiny", port=0, default_max_tokens=16)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, path: str, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(srv.url.removesuffix("/v1") + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def chat(srv, **body):
    body.setdefault("messages", [{"role": "user", "content": "Hello there"}])
    status, _, text = request(srv, "/v1/chat/completions", body)
    return status, json.loads(text)


def sse(srv, **body):
    """POST with stream=true; returns the parsed chunks and whether [DONE] ended the stream."""
    body.setdefault("messages", [{"role": "user", "content": "Hello there"}])
    status, headers, text = request(srv, "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    done = events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events if e != "data: [DONE]"], done


def test_models(server):
    status, _, text = request(server, "/v1/models")
    body = json.loads(text)
    assert status == 200 and body["object"] == "list" and body["data"][0]["id"] == "tiny"


def test_completion_shape_n_and_usage(server):
    status, body = chat(server, max_tokens=5, n=2, temperature=1.0, seed=1)
    assert status == 200 and body["object"] == "chat.completion" and body["model"] == "tiny"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c in body["choices"]:
        assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
        assert c["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and 2 <= u["completion_tokens"] <= 10
    assert u["prompt_tokens"] == len(server.engine.encode_chat([{"role": "user", "content": "Hello there"}]))


def test_seed_temperature_and_stop(server):
    a = chat(server, max_tokens=12, seed=7)[1]["choices"][0]["message"]["content"]
    b = chat(server, max_tokens=12, seed=7)[1]["choices"][0]["message"]["content"]
    assert a == b
    greedy = chat(server, max_tokens=12, temperature=0)[1]["choices"][0]
    text = greedy["message"]["content"]
    assert greedy["finish_reason"] == "length" and len(text) >= 4
    stop = text[2:4]
    cut = chat(server, max_tokens=12, temperature=0, stop=stop)[1]["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == text[:text.index(stop)]


def test_logprobs(server):
    body = chat(server, max_tokens=6, logprobs=True, seed=3)[1]
    lps = body["choices"][0]["logprobs"]["content"]
    assert len(lps) == body["usage"]["completion_tokens"] and all(x["logprob"] <= 0 for x in lps)


def test_streaming_matches_non_streaming(server):
    full = chat(server, max_tokens=10, temperature=0)[1]["choices"][0]
    chunks, done = sse(server, max_tokens=10, temperature=0, stream_options={"include_usage": True})
    assert done
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["message"]["content"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == [full["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def test_streaming_n_choices(server):
    chunks, done = sse(server, max_tokens=4, n=3, seed=2)
    assert done
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["delta"].get("content", "")
            if ch["finish_reason"]:
                finished.add(ch["index"])
    assert finished == {0, 1, 2}
    ref = chat(server, max_tokens=4, n=3, seed=2)[1]["choices"]
    assert [texts[i] for i in range(3)] == [c["message"]["content"] for c in ref]


class GatedEngine(Engine):
    """An engine that, after its first non-empty text delta, waits until the test's client
    says it has read that delta (``client_saw_text``) before decoding on. A server that
    buffered the reply could not deliver the delta before decoding ends, so the wait would
    time out: ``released_by_client`` tells which happened."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.client_saw_text = threading.Event()
        self.finished = threading.Event()
        self.released_by_client: bool | None = None

    def generate(self, prompts, cfg=None, on_delta=None):
        def gated(i: int, delta: str) -> None:
            on_delta(i, delta)  # the server writes and flushes the chunk
            if delta and self.released_by_client is None:
                self.released_by_client = self.client_saw_text.wait(timeout=60)

        try:
            return super().generate(prompts, cfg, gated if on_delta is not None else None)
        finally:
            self.finished.set()


def read_sse(resp: http.client.HTTPResponse, on_first_text) -> list[dict | None]:
    """The chunks of an SSE response as they arrive (None for ``[DONE]``); ``on_first_text()``
    is called when the first chunk with content text has been read, before reading on."""
    chunks: list[dict | None] = []
    seen_text = False
    while line := resp.readline():
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):].strip()
        chunks.append(None if data == b"[DONE]" else json.loads(data))
        if not seen_text and chunks[-1] and any(c["delta"].get("content") for c in chunks[-1]["choices"]):
            seen_text = True
            on_first_text()
    return chunks


@pytest.mark.parametrize("n", [1, 2])
def test_streaming_is_incremental(n):
    """The first text chunk reaches the client while the engine is still decoding (held right
    after its first delta), and the rest of the reply follows it. Ordering, not timing: a
    server that buffered the whole reply fails here."""
    tok = tiny_tokenizer()
    never = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    eng = GatedEngine(steer(tiny_model(), prefer=word_token_ids(tok), never=never).eval(), tok)
    srv = make_server(eng, "tiny", port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    still_decoding = []
    try:
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=120)
        body = {"messages": [{"role": "user", "content": "Hello there"}], "stream": True, "max_tokens": 48, "n": n,
                "temperature": 0}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"

        def first_text() -> None:
            still_decoding.append(not eng.finished.is_set())
            eng.client_saw_text.set()

        chunks = read_sse(resp, first_text)
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()
    assert still_decoding == [True] and eng.released_by_client is True
    assert chunks[-1] is None  # [DONE]
    deltas = [(c["index"], c["delta"]["content"]) for ch in chunks[:-1] for c in ch["choices"]
              if c["delta"].get("content")]
    assert len(deltas) > n  # more text followed the first chunk, after the engine was let go
    finals = [c["finish_reason"] for ch in chunks[:-1] for c in ch["choices"] if c["finish_reason"]]
    assert finals == ["length"] * n
    texts = ["".join(d for i, d in deltas if i == k) for k in range(n)]
    ref = Engine(eng.model, tok).generate([eng.encode_chat(body["messages"])] * n,
                                          eng.chat_config(SamplingConfig(temperature=0, max_new_tokens=48)))
    assert texts == [c.text for c in ref]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 100}, "n"),
    ({"stop": [""]}, "stop"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"tools": []}, "tools"),
    ({"stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
])
def test_bad_requests_are_400_with_a_message(server, body, param):
    status, err = chat(server, **body)
    assert status == 400, err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param
    assert err["error"]["message"]


def test_invalid_json_and_unknown_routes(server):
    status, _, text = request(server, "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(text)["error"]["message"]
    status, _, text = request(server, "/v1/completions", {"prompt": "x"})
    assert status == 404 and json.loads(text)["error"]["type"] == "not_found_error"
    assert request(server, "/nope")[0] == 404


def test_concurrent_requests(server):
    results = []

    def go(seed):
        results.append(chat(server, max_tokens=6, seed=seed))

    threads = [threading.Thread(target=go, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(s == 200 for s, _ in results)


def test_serve_command(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "chatforge.cli", "serve", "tiny", "--port", "0", "--name", "t1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving t1 at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "/models", timeout=60) as r:
            assert json.loads(r.read())["data"][0]["id"] == "t1"
        req = urllib.request.Request(url + "/chat/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 3}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        proc.wait(timeout=30)

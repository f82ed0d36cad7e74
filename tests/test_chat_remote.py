"""``chatforge chat --url``: the REPL against a stand-in OpenAI-compatible server (standard
library, in a thread), so what is checked is the client: the history it sends, the streamed
text it prints, the settings it maps, and one-line errors for 401 / 4xx / a dead server."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chatforge.chat.remote import RemoteSession, normalise_url
from chatforge.chat.repl import Repl
from chatforge.cli import main
from chatforge.errors import ChatforgeError, ConfigError


class StandIn(ThreadingHTTPServer):
    """``/v1/models`` and a streaming ``/v1/chat/completions`` whose reply is ``reply(messages)``,
    sent a few characters per chunk (``delay`` seconds apart); every request body is recorded."""

    daemon_threads = True

    def __init__(self, key: str | None = None, reply=None, delay: float = 0.0, models=("stand-in", "other")):
        super().__init__(("127.0.0.1", 0), StandInHandler)
        self.key, self.delay, self.models = key, delay, list(models)
        self.reply = reply or (lambda msgs: f"echo {len(msgs)}: {msgs[-1]['content']}")
        self.requests: list[dict] = []
        self.status: tuple[int, str] | None = None  # force an error answer
        self.disconnected = threading.Event()  # the client closed the stream early

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class StandInHandler(BaseHTTPRequestHandler):
    server: StandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.server.key and self.headers.get("Authorization") != f"Bearer {self.server.key}":
            self._json(401, {"error": {"message": "Invalid API key", "type": "invalid_request_error"}})
            return False
        return True

    def do_GET(self) -> None:
        if self._authorised():
            self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.server.models]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._authorised():
            return
        self.server.requests.append(body)
        if self.server.status:
            self._json(self.server.status[0], {"error": {"message": self.server.status[1]}})
            return
        assert body["stream"] is True
        text = self.server.reply(body["messages"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(obj) -> None:
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        try:
            send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
            for p in pieces:
                time.sleep(self.server.delay)
                send({"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]})
            send({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            send({"choices": [], "usage": {"completion_tokens": len(pieces)}})
            send(b"[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnected.set()


@pytest.fixture
def serve():
    started = []

    def start(**kw) -> StandIn:
        srv = StandIn(**kw)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


class Writes(io.StringIO):
    """stdout that remembers each write (to see that text arrived in pieces)."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def repl(session) -> tuple[Repl, Writes, io.StringIO]:
    out, info = Writes(), io.StringIO()
    return Repl(session, out=out, interactive=False, info=info), out, info


def dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on (just freed)
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


# ---------------------------------------------------------------- the conversation
def test_multi_turn_sends_the_full_history_and_streams(serve, tmp_path):
    srv = serve(key="sekrit")
    s = RemoteSession(srv.url, api_key="sekrit", system="You are terse.")
    assert s.model == "stand-in"  # the first id /v1/models lists
    r, out, info = repl(s)
    saved = tmp_path / "t.json"
    r.run_lines(["Hello there\n", "/set temperature=0 max_tokens=7 top_k=5 seed=3\n", "And then?\n",
                 f"/save {saved}\n"])
    first, second = "echo 2: Hello there", "echo 4: And then?"
    assert out.getvalue() == first + "\n" + second + "\n"
    assert sum(1 for w in out.writes if w.strip()) > 4  # streamed: several pieces per reply
    assert [m["role"] for m in srv.requests[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert srv.requests[1]["messages"][2] == {"role": "assistant", "content": first}
    b0, b1 = srv.requests
    assert (b0["temperature"], b0["top_p"], b0["model"]) == (0.7, 0.9, "stand-in") and "top_k" not in b0
    assert (b1["temperature"], b1["max_tokens"], b1["top_k"], b1["seed"]) == (0, 7, 5, 3)
    assert "temperature=0.0" in info.getvalue() and "beams" not in info.getvalue()
    assert json.loads(saved.read_text()) == [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first}, {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": second}]
    r.run_lines(["/reset\n", "Again\n"])
    assert srv.requests[-1]["messages"] == [{"role": "system", "content": "You are terse."},
                                           {"role": "user", "content": "Again"}]


def test_ctrl_c_stops_the_reply_and_keeps_what_was_shown(serve):
    srv = serve(reply=lambda msgs: "word " * 200, delay=0.01)
    s = RemoteSession(srv.url)
    r, out, info = repl(s)

    def write(text: str) -> int:  # Ctrl-C lands while the third piece is being printed
        out.writes.append(text)
        if len(out.writes) == 3:
            raise KeyboardInterrupt
        return io.StringIO.write(out, text)

    out.write = write
    r.handle("Tell me a long story")
    assert "[interrupted]" in info.getvalue()
    assert srv.disconnected.wait(10)  # the connection was closed: the server stops generating
    partial = s.history[-1]["content"]
    assert s.history[-1]["role"] == "assistant" and 0 < len(partial) < len("word " * 200)
    out.write = Writes.write.__get__(out)
    srv.reply = lambda msgs: "ok"
    r.handle("Go on")
    assert srv.requests[-1]["messages"][1] == {"role": "assistant", "content": partial}


def test_ctrl_c_in_a_terminal(serve, tmp_path):
    """A real SIGINT while the REPL waits on the socket: the reply stops, the session goes on."""
    pexpect = pytest.importorskip("pexpect")
    srv = serve(reply=lambda msgs: "word " * 400 if len(msgs) == 1 else "short", delay=0.02)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "chatforge.cli", "chat", "--url", srv.url], env=env,
                          encoding="utf-8", timeout=120)
    saved = tmp_path / "t.json"
    try:
        child.expect_exact("model stand-in")
        child.expect_exact(">>> ")
        child.sendline("Go on and on")
        child.expect_exact("word word")
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(">>> ")
        child.sendline("And now?")
        child.expect_exact("short")
        child.expect_exact(">>> ")
        child.sendline(f"/save {saved}")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0 and srv.disconnected.wait(10)
    msgs = json.loads(saved.read_text())
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[1]["content"].startswith("word word") and len(msgs[1]["content"]) < len("word " * 400)
    assert srv.requests[-1]["messages"][1] == msgs[1]


def test_history_is_fitted_by_a_character_estimate_when_the_context_is_known(serve):
    srv = serve(reply=lambda msgs: "x" * 300)
    s = RemoteSession(srv.url, system="sys", context=400)
    s.cfg = s.cfg.replace(max_new_tokens=100)  # budget 300 "tokens" ~ 900 characters
    for i in range(6):
        s.send(f"question {i}")
    sent = srv.requests[-1]["messages"]
    assert sent[0]["role"] == "system" and sent[1]["role"] == "user" and sent[-1]["content"] == "question 5"
    assert len(sent) < 12 and s.dropped > 0


def test_settings_the_api_cannot_do_are_refused(serve):
    s = RemoteSession(serve().url)
    r, out, info = repl(s)
    r.run_lines(["/set beams=2\n", "/set no_repeat_ngram_size=3\n"])
    assert info.getvalue().count("error: ") == 2 and "beam search is not available" in info.getvalue()
    assert s.cfg.num_beams == 1
    with pytest.raises(ConfigError, match="beams"):
        s.cfg = s.cfg.replace(num_beams=4)


def test_urls_are_normalised():
    assert normalise_url("127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalise_url("http://h:1/v1/") == normalise_url("http://h:1/v1/chat/completions") == "http://h:1/v1"
    assert normalise_url("https://api.example.com/openai/v1") == "https://api.example.com/openai/v1"
    with pytest.raises(ConfigError):
        normalise_url("ftp://h/v1")


# ---------------------------------------------------------------- errors are one line
def test_errors_in_the_repl_are_one_line_and_the_session_goes_on(serve):
    srv = serve()
    r, out, info = repl(RemoteSession(srv.url))
    srv.status = (500, "the GPU caught fire\nsecond line")
    r.handle("Hi")
    assert info.getvalue().strip() == f"error: {srv.url}/chat/completions: HTTP 500 Internal Server Error: " \
                                      "the GPU caught fire second line"
    srv.status = None
    r.handle("Hi")
    assert out.getvalue() == "echo 1: Hi\n"
    srv.shutdown()
    srv.server_close()
    r.handle("Still there?")
    assert info.getvalue().splitlines()[-1].startswith(f"error: cannot reach {srv.url}")


def test_401_and_connection_refused_from_the_command(serve, capfd, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("CHATFORGE_API_KEY", raising=False)
    srv = serve(key="sekrit")
    assert main(["chat", "--url", srv.url, "--message", "Hi"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "HTTP 401" in err and "Invalid API key" in err and "--api-key" in err

    assert main(["chat", "--url", srv.url, "--api-key", "wrong", "--message", "Hi"]) == 2
    assert "the API key was refused" in capfd.readouterr().err

    monkeypatch.setenv("OPENAI_API_KEY", "sekrit")  # the environment's key is used
    assert main(["chat", "--url", srv.url, "--model", "other", "--message", "Hi", "--message", "Bye"]) == 0
    cap = capfd.readouterr()
    assert cap.out == "echo 1: Hi\necho 3: Bye\n" and srv.requests[-1]["model"] == "other"

    url = dead_url()
    assert main(["chat", "--url", url, "--message", "Hi"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"cannot reach {url}" in err and "refused" in err.lower()


def test_local_only_and_remote_only_options_are_refused(capfd):
    assert main(["chat", "tiny", "--url", "http://127.0.0.1:1/v1", "--message", "x"]) == 2
    assert "--model tiny" in capfd.readouterr().err
    assert main(["chat", "tiny", "--api-key", "k", "--message", "x"]) == 2
    assert "--api-key goes with --url" in capfd.readouterr().err
    with pytest.raises(ChatforgeError, match="cannot reach"):
        RemoteSession(dead_url())


# ---------------------------------------------------------------- end to end: the real `chatforge serve`
def test_against_the_real_server():
    """The client against ``chatforge serve`` itself (FastAPI, on a thread) with the tiny model
    steered to write letters and never stop: two turns stream, the context length it reports is
    used for fitting, a wrong key is a one-line 401."""
    from chatforge.chat import server
    from chatforge.generate.engine import Engine
    from chatforge.models.tiny import chatty_tiny

    engine = Engine(*chatty_tiny())
    with server.make_server(engine, "tiny-chat", port=0, api_key="sekrit") as srv:
        with pytest.raises(ChatforgeError, match="HTTP 401"):
            RemoteSession(srv.url, api_key="wrong")
        s = RemoteSession(srv.url, api_key="sekrit", system="Be brief.")
        assert (s.model, s.context) == ("tiny-chat", engine.max_context)
        s.cfg = s.cfg.replace(max_new_tokens=6, temperature=0.0)
        r, out, info = repl(s)
        r.run_lines(["Hello\n", "And again?\n"])
        replies = out.getvalue().splitlines()
        assert info.getvalue() == "", info.getvalue()
        assert len(replies) == 2 and all(x.strip() for x in replies), out.getvalue()
        assert [m["role"] for m in s.messages()] == ["system", "user", "assistant", "user", "assistant"]
        assert s.history[-1]["content"] == replies[1] and s.send("Once more").finish_reason == "length"

"""An OpenAI-compatible HTTP server: ``chatforge serve MODEL``.

Speaks enough of the OpenAI chat API for the usual clients (the ``openai`` package,
curl, chat UIs pointed at ``http://HOST:PORT/v1``):

* ``GET  /v1/models``            -- the one model being served;
* ``POST /v1/chat/completions``  -- ``messages``, ``temperature``, ``top_p``, ``max_tokens``
  (or ``max_completion_tokens``), ``stop``, ``n``, ``seed``, ``logprobs``, ``stream``
  (server-sent events: ``data: {chunk}`` lines, then ``data: [DONE]``); extensions
  ``top_k``, ``min_p``, ``repetition_penalty``.

Bad requests get HTTP 400 with ``{"error": {"message", "type", "param", "code"}}``.
Standard library only (``ThreadingHTTPServer``); requests are served one at a time by the
engine (a lock), the ``n`` choices of one request are decoded as one batch.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from chatforge.errors import ChatforgeError
from chatforge.generate.engine import Completion, Engine, SamplingConfig

MAX_N = 16
MAX_BODY = 16 * 1024 * 1024
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
IGNORED_IF_DEFAULT = {"presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0}
ACCEPTED = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n",
            "seed", "stream", "stream_options", "logprobs", "user", "top_k", "min_p", "repetition_penalty",
            *IGNORED_IF_DEFAULT}


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _number(body: dict, key: str, lo: float, hi: float, default, integer: bool = False):
    v = body.get(key, default)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not (lo <= v <= hi):
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{key}' must be {kind} between {lo} and {hi}, got {v!r}", key)
    return v


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequest(f"messages[{i}]: 'role' must be system, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def parse_request(body, default_max_tokens: int) -> tuple[list[dict], SamplingConfig, int, bool, bool]:
    """Request JSON -> (messages, sampling config, n, stream, include usage in stream)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - ACCEPTED)
    if unknown:
        raise BadRequest(f"unsupported parameter(s): {', '.join(unknown)}", unknown[0])
    for key, default in IGNORED_IF_DEFAULT.items():
        if body.get(key) not in (None, default):
            raise BadRequest(f"'{key}' is not supported (only {default})", key)
    messages = parse_messages(body)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise BadRequest("'stop' must be a string or a list of up to 16 non-empty strings", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({key: max_tokens}, key, 1, 1 << 20, default_max_tokens, integer=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise BadRequest("'logprobs' must be true or false", "logprobs")
    opts = body.get("stream_options") or {}
    cfg = SamplingConfig(
        temperature=_number(body, "temperature", 0, 2, 1.0),
        top_p=_number(body, "top_p", 1e-9, 1, 1.0),
        top_k=_number(body, "top_k", 0, 1 << 20, 0, integer=True),
        min_p=_number(body, "min_p", 0, 0.999999, 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1e-3, 100, 1.0),
        max_new_tokens=max_tokens, stop=stop, seed=seed, logprobs=logprobs,
    )
    n = _number(body, "n", 1, MAX_N, 1, integer=True)
    return messages, cfg, n, stream, bool(isinstance(opts, dict) and opts.get("include_usage"))


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, engine: Engine, model_name: str, default_max_tokens: int = 512, quiet: bool = True):
        super().__init__(address, Handler)
        self.engine = engine
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.quiet = quiet
        self.lock = threading.Lock()
        self.created = int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


class Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args) -> None:
        if not self.server.quiet:
            super().log_message(fmt, *args)

    # ---------------------------------------------------------------- plumbing
    def _json(self, status: int, obj) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        self.close_connection = True  # the request body may not have been read
        self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def _read_json(self):
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest("a Content-Length header is required", status=411) from None
        if length > MAX_BODY:
            raise BadRequest("request body too large", status=413)
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None

    # ---------------------------------------------------------------- routes
    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [self._model_card()]})
        elif self.path.rstrip("/") in ("/v1/models/" + self.server.model_name,):
            self._json(200, self._model_card())
        elif self.path in ("/", "/health"):
            self._json(200, {"status": "ok", "model": self.server.model_name})
        else:
            self._error(404, f"no route GET {self.path}", kind="not_found_error")

    def do_POST(self) -> None:
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route POST {self.path}", kind="not_found_error")
            return
        try:
            messages, cfg, n, stream, usage = parse_request(self._read_json(), self.server.default_max_tokens)
            eng = self.server.engine
            cfg = eng.chat_config(cfg)
            prompt = eng.encode_chat(messages)
            if len(prompt) >= eng.max_context:
                raise BadRequest(f"the messages are {len(prompt)} tokens: the model's context is {eng.max_context}",
                                 "messages")
        except BadRequest as e:
            self._error(e.status, str(e), e.param)
            return
        except ChatforgeError as e:  # e.g. a SamplingConfig range, a template refusing the roles
            self._error(400, str(e))
            return
        if stream:
            self._stream(prompt, cfg, n, usage)
        else:
            self._complete(prompt, cfg, n)

    def _model_card(self) -> dict:
        return {"id": self.server.model_name, "object": "model", "created": self.server.created,
                "owned_by": "chatforge"}

    def _generate(self, prompt: list[int], cfg: SamplingConfig, n: int, on_delta=None) -> list[Completion]:
        with self.server.lock:
            return self.server.engine.generate([prompt] * n, cfg, on_delta)

    def _logprobs(self, c: Completion) -> dict | None:
        if c.logprobs is None:
            return None
        tok = self.server.engine.tokenizer
        content = []
        for t, lp in zip(c.token_ids, c.logprobs):
            s = tok.decode([t])
            content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []})
        return {"content": content}

    def _complete(self, prompt: list[int], cfg: SamplingConfig, n: int) -> None:
        try:
            comps = self._generate(prompt, cfg, n)
        except ChatforgeError as e:
            self._error(400, str(e))
            return
        gen = sum(len(c.token_ids) for c in comps)
        self._json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": self.server.model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": FINISH[c.finish_reason], "logprobs": self._logprobs(c)}
                        for i, c in enumerate(comps)],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": gen, "total_tokens": len(prompt) + gen},
        })

    def _stream(self, prompt: list[int], cfg: SamplingConfig, n: int, usage: bool) -> None:
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(choices: list[dict], **extra) -> None:
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created,
                     "model": self.server.model_name, "choices": choices, **extra}
            self.wfile.write(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")
            self.wfile.flush()

        try:
            send([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                  for i in range(n)])
            comps = self._generate(prompt, cfg, n, on_delta=lambda i, d: send(
                [{"index": i, "delta": {"content": d}, "finish_reason": None}]))
            for i, c in enumerate(comps):
                send([{"index": i, "delta": {}, "finish_reason": FINISH[c.finish_reason],
                       "logprobs": self._logprobs(c)}])
            if usage:
                gen = sum(len(c.token_ids) for c in comps)
                send([], usage={"prompt_tokens": len(prompt), "completion_tokens": gen,
                                "total_tokens": len(prompt) + gen})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left: generation stopped with the exception
        except ChatforgeError as e:
            err = {"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": None}}
            self.wfile.write(b"data: " + json.dumps(err).encode() + b"\n\n")


def make_server(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                default_max_tokens: int = 512, quiet: bool = True) -> ChatServer:
    """A ready server (``port=0`` picks a free port: see ``.url``); call ``serve_forever()``."""
    return ChatServer((host, port), engine, model_name, default_max_tokens, quiet)

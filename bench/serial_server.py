"""The server ``chatforge serve`` replaced, kept as ``bench/serve.py``'s baseline ("serial").

Until the FastAPI + continuous-batching rewrite, ``chatforge serve`` was this: a standard-library
``ThreadingHTTPServer`` whose request threads take one lock around ``Engine.generate``, so
requests are decoded one at a time (the ``n`` choices of one request as one batch) however many
clients are connected. This is that code (``git show ada8d66:src/chatforge/chat/server.py`` and
``.../commands/serve.py``), trimmed to what the bench uses: ``GET /v1/models``, ``GET /health``
and streamed ``POST /v1/chat/completions`` (server-sent events, ``stream_options.include_usage``).
Dropped: non-streamed replies, logprobs, the ``/v1/models/{id}`` route. The request parsing
(``messages`` through :func:`chatforge.chat.api.parse_messages`, the same rules), the lock, the
engine call and the event stream are as they were; it is not part of chatforge's API and nothing
in ``src/`` imports it.

    .venv/bin/python bench/serial_server.py smollm2 --port 8001     # then point an OpenAI client at /v1
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from chatforge.chat.api import ApiError as BadRequest  # the same 400s as chatforge serve
from chatforge.chat.api import parse_messages
from chatforge.errors import ChatforgeError
from chatforge.generate.engine import Engine, SamplingConfig

MAX_N = 16
MAX_BODY = 16 * 1024 * 1024
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
IGNORED_IF_DEFAULT = {"presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0, "logprobs": False}
ACCEPTED = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n",
            "seed", "stream", "stream_options", "user", "top_k", "min_p", "repetition_penalty",
            *IGNORED_IF_DEFAULT}


def _number(body: dict, key: str, lo: float, hi: float, default, integer: bool = False):
    v = body.get(key, default)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not (lo <= v <= hi):
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{key}' must be {kind} between {lo} and {hi}, got {v!r}", key)
    return v


def parse_request(body, default_max_tokens: int) -> tuple[list[dict], SamplingConfig, int, bool]:
    """Request JSON -> (messages, sampling config, n, include usage in the stream)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - ACCEPTED)
    if unknown:
        raise BadRequest(f"unsupported parameter(s): {', '.join(unknown)}", unknown[0])
    for key, default in IGNORED_IF_DEFAULT.items():
        if body.get(key) not in (None, default):
            raise BadRequest(f"'{key}' is not supported by this baseline (only {default})", key)
    if body.get("stream") is not True:
        raise BadRequest("this baseline answers streamed requests only ('stream': true)", "stream")
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
    opts = body.get("stream_options") or {}
    cfg = SamplingConfig(
        temperature=_number(body, "temperature", 0, 2, 1.0),
        top_p=_number(body, "top_p", 1e-9, 1, 1.0),
        top_k=_number(body, "top_k", 0, 1 << 20, 0, integer=True),
        min_p=_number(body, "min_p", 0, 0.999999, 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1e-3, 100, 1.0),
        max_new_tokens=max_tokens, stop=stop, seed=seed,
    )
    n = _number(body, "n", 1, MAX_N, 1, integer=True)
    return messages, cfg, n, bool(isinstance(opts, dict) and opts.get("include_usage"))


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, engine: Engine, model_name: str, default_max_tokens: int = 512):
        super().__init__(address, Handler)
        self.engine = engine
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.lock = threading.Lock()  # one request decodes at a time: what the bench measures against
        self.created = int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


class Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args) -> None:
        pass

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
            self._json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "created": self.server.created, "owned_by": "chatforge"}]})
        elif self.path in ("/", "/health"):
            self._json(200, {"status": "ok", "model": self.server.model_name})
        else:
            self._error(404, f"no route GET {self.path}", kind="not_found_error")

    def do_POST(self) -> None:
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route POST {self.path}", kind="not_found_error")
            return
        try:
            messages, cfg, n, usage = parse_request(self._read_json(), self.server.default_max_tokens)
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
        self._stream(prompt, cfg, n, usage)

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
            with self.server.lock:
                comps = self.server.engine.generate([prompt] * n, cfg, lambda i, d: send(
                    [{"index": i, "delta": {"content": d}, "finish_reason": None}]))
            for i, c in enumerate(comps):
                send([{"index": i, "delta": {}, "finish_reason": FINISH[c.finish_reason], "logprobs": None}])
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens", type=int, default=512, help="reply length when a request gives none")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--template", help="chat template (default: the run's, else the tokenizer's own)")
    args = p.parse_args(argv)
    from chatforge.chat.session import load_engine
    from chatforge.errors import ChatforgeError
    from chatforge.models.load import check_model_exists

    try:
        check_model_exists(args.model)
        engine = load_engine(args.model, args.dtype, args.template)
    except ChatforgeError as e:
        print(f"serial_server: error: {e}", file=sys.stderr)
        return 2
    server = ChatServer((args.host, args.port), engine, str(args.model), args.max_tokens)
    print(f"serving {args.model} at {server.url} (serial baseline; Ctrl-C to stop)", flush=True)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SystemExit out of serve_forever: close and exit 0
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

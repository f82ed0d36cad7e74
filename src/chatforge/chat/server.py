"""``chatforge serve``: an OpenAI-compatible HTTP API and the web chat page, on FastAPI + uvicorn.

Routes (every error answer is ``{"error": {"message", "type", "param", "code"}}``):

* ``POST /v1/chat/completions`` and ``POST /v1/completions`` (legacy text completion): the
  request rules are in :mod:`chatforge.chat.api`; ``stream: true`` answers server-sent events
  (``data: {chunk}`` ... ``data: [DONE]``), ``stream_options.include_usage`` adds a last chunk
  with ``usage`` and no choices.
* ``GET /v1/models`` (with ``context_length``), ``GET /v1/config`` (the defaults a request
  without sampling fields gets, see :func:`config_body`), ``GET /health``, ``GET /metrics``
  (Prometheus text), ``GET /openapi.json`` (FastAPI's schema), ``GET /`` + ``/static/*`` (the page).

Requests do not decode themselves: each choice is a :class:`Handle` of the shared continuous-
batching :class:`Scheduler`, and the server only streams its deltas. Hardening, in the order a
request meets it: uvicorn's limits (request head <= 16 KiB and in by ``head_timeout``, idle
keep-alive closed after ``timeout_keep_alive``, ``limit_concurrency`` as a backstop) -> the API
key (everything but ``/``, ``/static/*``, ``/health``) -> ``Content-Type: application/json`` on
POSTs (415: a browser's cross-site "simple" POST is ``text/plain`` and never reaches the model)
-> ``max_body`` (413) -> validation (400) -> admission (503 + ``Retry-After`` when the queue is
full) -> the ``request_timeout`` (504; the handles are cancelled). A client that goes away, mid-stream or
while waiting for a non-streamed reply, cancels its handles at once, freeing its batch slots.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles
from uvicorn.protocols.http.h11_impl import H11Protocol

from chatforge.chat import api
from chatforge.chat.api import ApiError, Choice
from chatforge.errors import ChatforgeError
from chatforge.generate.engine import Engine, SamplingConfig
from chatforge.generate.scheduler import Delta, Handle, QueueFull, Scheduler, SchedulerClosed

log = logging.getLogger("chatforge.serve")
STATIC = Path(__file__).parent / "static"
MAX_HEAD = 16 * 1024  # request line + headers (h11's own default, made explicit)
PLACEHOLDER = "<!doctype html><p>chatforge is serving <b>{name}</b>; the web page is not installed " \
              "(chat/static/index.html). The API is at <code>/v1</code>.</p>"


@dataclass
class ServerSettings:
    """Everything the app needs besides the model; the CLI options map onto these one to one."""

    model_name: str
    defaults: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=512))
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body: int = 1 << 20
    request_timeout: float = 600.0
    head_timeout: float = 10.0  # request head and body must arrive within this (slowloris)
    timeout_keep_alive: float = 5.0
    limit_concurrency: int | None = None  # None: 4 x (max_batch + max_queue) + 64 connections
    chat_defaults: dict | None = None  # the run's recorded chat settings, shown by /v1/config
    static_dir: Path = STATIC


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


# ---------------------------------------------------------------------------- metrics
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ENDPOINTS = {"/", "/health", "/metrics", "/openapi.json", "/v1/models", "/v1/config", "/v1/chat/completions",
             "/v1/completions"}
SCHEDULER_METRICS = [  # stats() key, metric name, type, help
    ("prompt_tokens_total", "chatforge_prompt_tokens_total", "counter", "Prompt tokens admitted."),
    ("generated_tokens_total", "chatforge_generated_tokens_total", "counter", "Tokens generated."),
    ("requests_total", "chatforge_scheduler_requests_total", "counter", "Sequences submitted to the scheduler."),
    ("steps_total", "chatforge_scheduler_steps_total", "counter", "Decoding steps of the batch."),
    ("waiting", "chatforge_queue_depth", "gauge", "Sequences waiting for a batch slot."),
    ("running", "chatforge_batch_size", "gauge", "Sequences in the running batch."),
    ("max_batch", "chatforge_max_batch", "gauge", "Batch slots."),
    ("max_queue", "chatforge_max_queue", "gauge", "Queue places."),
    ("kv_tokens_used", "chatforge_kv_tokens_used", "gauge", "KV-cache tokens in use."),
    ("kv_tokens_max", "chatforge_kv_tokens_max", "gauge", "KV-cache token budget."),
]


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, x: float) -> None:
        i = next((k for k, b in enumerate(self.buckets) if x <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += x

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, total = [], 0
        sep = "," if labels else ""
        for b, c in zip([*map(str, self.buckets), "+Inf"], self.counts):
            total += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b}"}} {total}')
        lab = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{lab} {self.sum:.6f}", f"{name}_count{lab} {total}"]


class Metrics:
    """Prometheus counters and histograms, written by hand (a dozen lines, no dependency).
    Updated only from the event loop's thread, so no lock."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram(TTFT_BUCKETS)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
        self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def render(self, stats: dict) -> str:
        out = ["# HELP chatforge_requests_total HTTP requests answered, by endpoint and status.",
               "# TYPE chatforge_requests_total counter"]
        out += [f'chatforge_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())]
        out += ["# HELP chatforge_request_duration_seconds Time from a request's arrival to its answer's last byte.",
                "# TYPE chatforge_request_duration_seconds histogram"]
        for e, h in sorted(self.latency.items()):
            out += h.lines("chatforge_request_duration_seconds", f'endpoint="{e}"')
        out += ["# HELP chatforge_time_to_first_token_seconds Time from a generation request's arrival to its "
                "first generated token.", "# TYPE chatforge_time_to_first_token_seconds histogram"]
        out += self.ttft.lines("chatforge_time_to_first_token_seconds")
        for key, name, kind, help_ in SCHEDULER_METRICS:
            if isinstance(stats.get(key), (int, float)):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {stats[key]}"]
        return "\n".join(out) + "\n"


def endpoint_label(path: str) -> str:
    """A bounded label set: unknown paths are "other" (a scanner must not grow the metrics)."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/static/"):
        return "/static"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


# ---------------------------------------------------------------------------- middleware
class Observe:
    """Counts every answer by endpoint and status and times it to its last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_observed(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            self.metrics.request(endpoint_label(scope["path"]), status[0], time.perf_counter() - t0)


OPEN_PATHS = {"/", "/health", "/favicon.ico"}


def protected(path: str) -> bool:
    """Everything needs the key but the page, its files and /health (the page asks the user
    for the key and sends it). An allowlist: a route added later is protected by default."""
    return path not in OPEN_PATHS and not path.startswith("/static/")


class RequireKey:
    """``Authorization: Bearer KEY`` on protected paths, compared in constant time."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    def authorised(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and protected(scope["path"]) and not self.authorised(scope):
            body = api.error_body("missing or wrong API key: send 'Authorization: Bearer KEY'", None,
                                  "invalid_request_error", "invalid_api_key")
            return await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------- reading requests
async def read_json(request: Request, max_body: int, timeout: float):
    """The JSON body: 415 unless ``application/json``, 413 past ``max_body`` (declared or
    streamed), 408 when it does not arrive within ``timeout``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(f"Content-Type must be application/json, got {ctype or 'none'!r}", status=415,
                       code="unsupported_media_type")
    too_big = ApiError(f"the request body is larger than {max_body} bytes (--max-body)", status=413,
                       code="request_too_large", headers={"Connection": "close"})
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise too_big
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body:
                    raise too_big
    except TimeoutError:
        raise ApiError(f"the request body did not arrive within {timeout:g} s", status=408,
                       code="request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone() from None
    return api.parse_json(bytes(body))


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: uvicorn's
    ``receive`` then only ever answers ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------- generation
class Generation:
    """The handles of one request (``prompts x n`` choices) and the deadline they share."""

    def __init__(self, scheduler: Scheduler, jobs: list[tuple[list[int], SamplingConfig]], n: int,
                 deadline: float, on_first_token, param: str):
        self.handles: list[Handle] = []
        self.prompt_tokens = sum(len(p) for p, _ in jobs)
        self.deadline, self.on_first_token = deadline, on_first_token
        try:
            for prompt, cfg in jobs:
                for i in range(n):  # choice i of a seeded request: seed + i (distinct, reproducible)
                    self.handles.append(scheduler.submit(prompt, cfg if cfg.seed is None else
                                                         cfg.replace(seed=cfg.seed + i)))
        except QueueFull as e:
            self.cancel()
            retry = max(1, math.ceil(e.retry_after))
            raise ApiError(f"the server is busy (queue full): retry in {retry} s", status=503, kind="server_error",
                           code="queue_full", headers={"Retry-After": str(retry)}) from None
        except SchedulerClosed:
            self.cancel()
            raise ApiError("the server is shutting down", status=503, kind="server_error", code="shutting_down",
                           headers={"Retry-After": "5"}) from None
        except ChatforgeError as e:  # PromptTooLong (prompt + max_tokens > context or KV budget), bad settings
            self.cancel()
            raise ApiError(str(e), param) from None

    def usage(self) -> dict:
        """OpenAI's usage: each prompt counted once (not once per choice), every choice's tokens."""
        return api.usage(self.prompt_tokens, sum(h.generated_tokens for h in self.handles))

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done:
                h.cancel()

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """``(choice index, Delta)`` of every handle as they come, to each one's final delta.
        Raises TimeoutError at the deadline; leaving early (an error, a disconnect: the task is
        cancelled) cancels every handle still running."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, h: Handle) -> None:
            try:
                async for d in h:
                    queue.put_nowait((i, d))
            except Exception as e:  # noqa: BLE001 -- handed to the consumer, which raises it
                queue.put_nowait((i, e))
            queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        running, first = len(tasks), True
        try:
            while running:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                i, d = await asyncio.wait_for(queue.get(), remaining)
                if d is None:
                    running -= 1
                    continue
                if isinstance(d, BaseException):
                    raise d
                if first and d.token_ids:
                    first = False
                    self.on_first_token()
                yield i, d
        finally:
            self.cancel()
            for t in tasks:
                t.cancel()

    async def collect(self, request: Request) -> list[Choice]:
        """Every choice to its end, or :class:`ClientGone` as soon as the client leaves."""
        choices = [Choice() for _ in self.handles]

        async def consume() -> None:
            async for i, d in self.deltas():
                choices[i].add(d.text, d.token_ids, d.logprobs, d.finish_reason)

        work, gone = asyncio.ensure_future(consume()), asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                self.cancel()
                work.cancel()
        if not work.done():
            raise ClientGone()
        try:
            work.result()
        except TimeoutError:
            raise
        except Exception as e:  # noqa: BLE001 -- the scheduler failed this request
            log.error("generation failed", exc_info=e)
            raise server_error(e) from None
        return choices


def timeout_error(seconds: float) -> ApiError:
    return ApiError(f"the reply took longer than the server's limit of {seconds:g} s (--request-timeout)",
                    status=504, kind="timeout_error", code="request_timeout")


def server_error(e: BaseException) -> ApiError:
    return ApiError(f"generation failed: {e}", status=500, kind="server_error")


# ---------------------------------------------------------------------------- the app
def config_body(engine: Engine, settings: ServerSettings, stats: dict) -> dict:
    """``GET /v1/config``: what the page shows and pre-fills.

    ``defaults``: the sampling settings a request gets for every field it leaves out;
    ``chat_defaults``: the run's recorded chat settings when the model is a chatforge run that
    has them (else null); ``limits``: the caps a request must stay within.
    """
    d = settings.defaults
    return {
        "model": settings.model_name, "context_length": engine.max_context, "template": engine.template,
        "defaults": {"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k, "min_p": d.min_p,
                     "max_tokens": d.max_new_tokens, "repetition_penalty": d.repetition_penalty},
        "chat_defaults": settings.chat_defaults,
        "limits": {"max_n": api.MAX_N, "max_body": settings.max_body, "request_timeout": settings.request_timeout,
                   "max_batch": stats.get("max_batch"), "max_queue": stats.get("max_queue")},
        "auth": settings.api_key is not None,
    }


def make_app(scheduler: Scheduler, engine: Engine, settings: ServerSettings) -> FastAPI:
    """The ASGI app over a running scheduler (the caller owns and closes it)."""
    app = FastAPI(title="chatforge", version="1", docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API of `chatforge serve`.")
    metrics, created = Metrics(), int(time.time())
    app.state.metrics = metrics
    # Tokenising a 1 MiB prompt takes ~1 s: off the event loop (every stream would stall), and on
    # one thread (the tokenizer and the encoder's caches are not meant for concurrent calls).
    app.state.tokenizer_pool = pool = ThreadPoolExecutor(1, thread_name_prefix="chatforge-tokenize")

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    tok = engine.tokenizer

    def token_text(t: int) -> str:
        return tok.decode([t])

    def card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "chatforge",
                "context_length": engine.max_context}

    def check_context(prompt: list[int], param: str, what: str) -> None:
        if not prompt:
            raise ApiError(f"{what}: no tokens (at least one is needed)", param)
        if len(prompt) >= engine.max_context:
            raise ApiError(f"{what}: {len(prompt)} tokens, but the model's context is {engine.max_context} "
                           "(the prompt and at least one generated token)", param, code="context_length_exceeded")

    def start(prompts: list[list[int]], cfg: SamplingConfig, n: int, max_tokens_given: bool, param: str,
              t0: float) -> Generation:
        """Submit every choice. Without ``max_tokens`` in the request the default is cut to the
        room the prompt leaves (a long chat still gets a reply); an explicit one that does not
        fit is the client's error (400 from the scheduler, naming the numbers)."""
        jobs = [(p, cfg if max_tokens_given else cfg.replace(
            max_new_tokens=min(cfg.max_new_tokens, engine.max_context - len(p)))) for p in prompts]
        return Generation(scheduler, jobs, n, t0 + settings.request_timeout,
                          lambda: metrics.ttft.observe(time.monotonic() - t0),
                          "max_tokens" if max_tokens_given else param)

    async def collect(gen: Generation, request: Request) -> list[Choice]:
        try:
            return await gen.collect(request)
        except TimeoutError:
            raise timeout_error(settings.request_timeout) from None

    # ------------------------------------------------------------ chat
    @app.post("/v1/chat/completions", openapi_extra=_body_schema(api.CHAT_SCHEMA))
    async def chat_completions(request: Request):
        t0 = time.monotonic()
        req = api.parse_chat(await read_json(request, settings.max_body, settings.head_timeout), settings.defaults)
        try:
            cfg = engine.chat_config(req.cfg)
            prompt = await off_loop(engine.encode_chat, req.messages)
        except ChatforgeError as e:  # e.g. a template refusing a role order
            raise ApiError(str(e), "messages") from None
        check_context(prompt, "messages", "the messages")
        gen = start([prompt], cfg, req.n, req.max_tokens_given, "messages", t0)
        if req.stream:
            return event_stream(chat_chunks(gen, req))
        choices = await collect(gen, request)
        return api.chat_body(settings.model_name, choices, gen.usage(), req.cfg.logprobs, token_text)

    async def chat_chunks(gen: Generation, req: api.ChatRequest) -> AsyncIterator[bytes]:
        cid = api.new_id("chatcmpl")

        def chunk(choices: list[dict], **extra) -> bytes:
            return api.sse(api.envelope(cid, "chat.completion.chunk", settings.model_name, choices, **extra))

        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(req.n)])
        async for i, d in gen.deltas():
            lp = api.chat_logprobs(d.token_ids, d.logprobs, token_text) if req.cfg.logprobs and d.token_ids else None
            if d.text or d.finish_reason or lp:
                yield chunk([api.chat_chunk_choice(i, d.text, d.finish_reason, lp)])
        if req.include_usage:
            yield chunk([], usage=gen.usage())

    # ------------------------------------------------------------ legacy completions
    @app.post("/v1/completions", openapi_extra=_body_schema(api.COMPLETION_SCHEMA))
    async def completions(request: Request):
        t0 = time.monotonic()
        body = await read_json(request, settings.max_body, settings.head_timeout)
        req = api.parse_completion(body, settings.defaults, len(tok))
        prompts = [p if isinstance(p, list) else (await off_loop(tok, p))["input_ids"] for p in req.prompts]
        for k, p in enumerate(prompts):
            check_context(p, "prompt", f"prompt {k}")
        gen = start(prompts, req.cfg, req.n, req.max_tokens_given, "prompt", t0)
        if req.stream:
            return event_stream(text_chunks(gen, req))
        choices = await collect(gen, request)
        return api.completion_body(settings.model_name, choices, gen.usage(), req.logprobs is not None, token_text)

    async def text_chunks(gen: Generation, req: api.CompletionRequest) -> AsyncIterator[bytes]:
        cid, offsets = api.new_id("cmpl"), [0] * len(gen.handles)

        def chunk(choices: list[dict], **extra) -> bytes:
            return api.sse(api.envelope(cid, "text_completion", settings.model_name, choices, **extra))

        async for i, d in gen.deltas():
            lp = None
            if req.logprobs is not None and d.token_ids:
                lp = api.completion_logprobs(d.token_ids, d.logprobs or [], token_text, offsets[i])
                offsets[i] += sum(len(s) for s in lp["tokens"])
            if d.text or d.finish_reason or lp:
                yield chunk([api.completion_chunk_choice(i, d.text, d.finish_reason, lp)])
        if req.include_usage:
            yield chunk([], usage=gen.usage())

    def event_stream(chunks: AsyncIterator[bytes]) -> StreamingResponse:
        async def with_errors_and_done() -> AsyncIterator[bytes]:
            try:
                async for c in chunks:
                    yield c
            except TimeoutError:
                yield api.sse(timeout_error(settings.request_timeout).body())
            except Exception as e:  # noqa: BLE001 -- the 200 has been sent: the error goes in the stream
                log.error("generation failed", exc_info=e)
                yield api.sse(server_error(e).body())
            yield api.sse("[DONE]")

        return StreamingResponse(with_errors_and_done(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------ the rest
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != settings.model_name:
            raise ApiError(f"no model {model_id!r}: this server serves {settings.model_name!r}", "model", 404,
                           code="model_not_found")
        return card()

    @app.get("/v1/config")
    async def config():
        return config_body(engine, settings, scheduler.stats())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "auth": settings.api_key is not None}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(scheduler.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index():
        page = settings.static_dir / "index.html"
        if page.is_file():
            return FileResponse(page, headers={"Cache-Control": "no-cache"})
        return HTMLResponse(PLACEHOLDER.format(name=settings.model_name))

    if settings.static_dir.is_dir():
        app.mount("/static", StaticFiles(directory=settings.static_dir), name="static")
    _add_error_handlers(app)
    # the last added middleware is the outermost: CORS (answers preflights) > metrics > key check
    if settings.api_key is not None:
        app.add_middleware(RequireKey, key=settings.api_key)
    app.add_middleware(Observe, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                           max_age=600)
    return app


def _body_schema(schema: dict) -> dict:
    """The request body as OpenAPI sees it (bodies are parsed by :mod:`api`, not by pydantic)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, FastAPI's own 422 and Starlette's 404/405 included."""

    async def api_error(_request: Request, e: ApiError) -> Response:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    async def validation(_request: Request, e: RequestValidationError) -> Response:
        errs = e.errors()
        loc = ".".join(str(x) for x in errs[0]["loc"][1:]) if errs else None
        msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
        return JSONResponse(api.error_body(f"{loc}: {msg}" if loc else msg, loc or None), 400)

    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code == 404:
            body = api.error_body(f"no route {request.method} {request.url.path}", None, "not_found_error")
        elif e.status_code == 405:
            body = api.error_body(f"{request.method} is not allowed on {request.url.path}")
        else:
            body = api.error_body(str(e.detail))
        return JSONResponse(body, e.status_code, headers=getattr(e, "headers", None))

    async def gone(_request: Request, _e: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, metrics count it

    async def crash(_request: Request, e: Exception) -> Response:
        return JSONResponse(api.error_body(f"internal error: {type(e).__name__}", None, "server_error"), 500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientGone, gone)
    app.add_exception_handler(Exception, crash)


# ---------------------------------------------------------------------------- uvicorn
class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline on the request head. uvicorn closes idle
    keep-alive connections, but not one that connected and never finished its request line
    and headers: such half-open sockets would pile up to ``limit_concurrency`` and lock
    everyone out (slowloris). Subclass, because uvicorn has no setting for it."""

    head_timeout = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's head, on a keep-alive connection

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole request head has arrived
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: FastAPI, settings: ServerSettings, stats: dict, access_log: bool = False) -> uvicorn.Config:
    """One worker (one model in memory), uvicorn's limits set from ``settings``."""
    protocol = type("HeadTimeoutH11", (HeadTimeoutH11,), {"head_timeout": settings.head_timeout})
    limit = settings.limit_concurrency or 4 * (stats.get("max_batch", 16) + stats.get("max_queue", 64)) + 64
    return uvicorn.Config(app, http=protocol, ws="none", lifespan="off", loop="asyncio", log_config=None,
                          access_log=access_log, server_header=False, h11_max_incomplete_event_size=MAX_HEAD,
                          timeout_keep_alive=settings.timeout_keep_alive, limit_concurrency=limit,
                          timeout_graceful_shutdown=settings.request_timeout + settings.head_timeout)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (``port=0``: any free port); OSError when the address is unusable."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(scheduler: Scheduler, engine: Engine, settings: ServerSettings, sock: socket.socket,
          access_log: bool = False) -> None:
    """Serve on ``sock`` in this (main) thread until SIGINT/SIGTERM, then shut down gracefully:
    uvicorn stops accepting and waits for the requests in flight (their handles keep
    decoding), then the scheduler drains and closes. Returns normally, so the exit code is 0."""
    import signal

    app = make_app(scheduler, engine, settings)
    server = uvicorn.Server(uvicorn_config(app, settings, scheduler.stats(), access_log))
    # uvicorn re-raises the signal it handled once it has shut down; with these no-op handlers
    # installed as "the previous ones" that ends nothing, and the process exits 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        app.state.tokenizer_pool.shutdown(wait=False)
        scheduler.close(drain=True, timeout=settings.request_timeout)


class RunningServer:
    """A server on a background thread (tests, notebooks): ``.url`` (``http://HOST:PORT``), ``.close()``."""

    def __init__(self, scheduler: Scheduler, engine: Engine, settings: ServerSettings, sock: socket.socket,
                 own_scheduler: bool):
        self.scheduler, self.engine, self.settings = scheduler, engine, settings
        self.app = make_app(scheduler, engine, settings)
        self.url = base_url(sock)
        self._own = own_scheduler
        self._server = uvicorn.Server(uvicorn_config(self.app, settings, scheduler.stats()))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="chatforge-serve")
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            time.sleep(0.01)
        if not self._server.started:
            raise ChatforgeError(f"the server on {self.url} did not start (see the log above)")

    @property
    def metrics(self) -> Metrics:
        return self.app.state.metrics

    def close(self) -> None:
        """Graceful: requests in flight finish first (as on SIGTERM)."""
        self._server.should_exit = True
        self._thread.join()
        self.app.state.tokenizer_pool.shutdown(wait=False)
        if self._own:
            self.scheduler.close(drain=True, timeout=self.settings.request_timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_server(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 0,
                default_max_tokens: int = 512, scheduler: Scheduler | None = None, max_batch: int = 16,
                max_queue: int = 64, max_kv_tokens: int | None = None, **settings) -> RunningServer:
    """Start serving ``engine`` on a background thread; ``settings``: :class:`ServerSettings` fields.
    Without ``scheduler`` one is made (and closed by ``close()``)."""
    own = scheduler is None
    if own:
        scheduler = Scheduler(engine, max_batch=max_batch, max_queue=max_queue, max_kv_tokens=max_kv_tokens)
    settings.setdefault("defaults", SamplingConfig(max_new_tokens=default_max_tokens))
    return RunningServer(scheduler, engine, ServerSettings(model_name, **settings), bind(host, port), own)

"""Many requests to one OpenAI-compatible endpoint, paid for once: the client under
``chatforge data synth / judge / rank``.

Any server that speaks the OpenAI wire protocol works: a hosted API, llama.cpp's
``llama-server``, vLLM, or ``chatforge serve`` itself. Standard library only (``urllib`` in a
thread pool), like :mod:`chatforge.chat.remote`, so it sits on the data floor and any command
above can reuse it.

What it adds over one ``urlopen``:

* **Concurrency**: :meth:`ApiClient.map` sends up to ``concurrency`` requests at once and
  returns the results in input order (so a seeded loop built on them is deterministic).
* **Retries with backoff** on 408/409/425/429/5xx, a timeout, a dropped connection or a reply
  that is not the JSON it should be: ``backoff * 2**attempt`` seconds (jittered, at most
  ``max_backoff``), or the server's ``Retry-After`` (seconds or an HTTP date) when it is
  longer. After ``retries`` retries the *item* fails (:class:`RequestFailed`, with the
  reason) and the run goes on; a 400/413/422 fails its item at once, unretried (a prompt too
  long for the context, say). A server that refuses us (401/403/404) or stays unreachable
  stops the run with a one-line :class:`ChatforgeError`: every request would fail the same way.
* **A resumable cache**: every successful reply is appended to a JSONL file (one line per
  request, flushed at once, keyed by the SHA-256 of the endpoint path and the request body),
  so a killed run loses at most the requests in flight, and the same command run again
  answers finished requests from the file instead of paying for them twice. A line cut short
  by the kill is ignored and overwritten. The key ignores the URL: the same request to a
  restarted server on another port is still the same request.
* **Progress**: a tqdm bar whose postfix shows requests/s (requests actually sent), tokens
  used (the servers' ``usage``), cache hits, retries and failures; :attr:`stats` holds them.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from chatforge.errors import ChatforgeError, ConfigError

RETRY_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx
CACHE_VERSION = 1


def normalise_url(url: str) -> str:
    """``host:8000`` / ``http://host:8000`` / ``.../v1/`` / ``.../v1/chat/completions`` -> ``http://host:8000/v1``."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--url {url}: expected http(s)://HOST:PORT/v1")
    path = parts.path.rstrip("/")
    for tail in ("/chat/completions", "/completions", "/models"):
        if path.endswith(tail):
            path = path[: -len(tail)]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path or "/v1", "", ""))


def api_key_from_env() -> str | None:
    return os.environ.get("CHATFORGE_API_KEY") or os.environ.get("OPENAI_API_KEY") or None


def request_key(path: str, body: dict) -> str:
    """The cache key: what was asked (path + body), not where (the URL) or how (streaming)."""
    canon = json.dumps({"path": path, "body": {k: v for k, v in body.items() if k != "stream"}},
                       sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def error_message(e: urllib.error.HTTPError) -> str:
    """The server's own words for an HTTP error, on one line: OpenAI's ``{"error": {"message"}}``,
    FastAPI's ``{"detail"}``, else the body's text (at most 300 characters)."""
    try:
        raw = e.read(65536).decode("utf-8", "replace")
    except OSError:
        raw = ""
    message = raw.strip()
    try:
        obj = json.loads(raw)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        message = (err.get("message") or err.get("detail") or message) if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, AttributeError):
        pass
    return " ".join(str(message).split())[:300]  # one line, however the server formats it


class RequestFailed(ChatforgeError):
    """One request that still failed after its retries (``reason`` is one line); the run goes on."""

    def __init__(self, reason: str, key: str = ""):
        super().__init__(reason)
        self.reason, self.key = reason, key


class _Retry(Exception):
    """A failure worth another try; ``wait`` is the server's Retry-After, if any."""

    def __init__(self, reason: str, wait: float | None = None, final: bool = False):
        super().__init__(reason)
        self.reason, self.wait, self.final = reason, wait, final  # final: this request will not get better


@dataclass
class Reply:
    """A finished completion: the first choice's text, why it ended, the usage, and whether
    it came from the cache (then nothing was paid for it in this run)."""

    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    cached: bool
    key: str


def reply_from(path: str, data: Any, key: str, cached: bool) -> Reply:
    """Read a ``/chat/completions`` or ``/completions`` JSON reply; ``_Retry`` if it is not one."""
    if not isinstance(data, dict):
        raise _Retry("malformed reply: not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Retry("malformed reply: no 'choices'")
    c = choices[0]
    if path.endswith("chat/completions"):
        m = c.get("message")
        text = m.get("content") if isinstance(m, dict) else None
    else:
        text = c.get("text")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise _Retry("malformed reply: the choice's text is not a string")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    finish = c.get("finish_reason")
    return Reply(text, finish if isinstance(finish, str) else None, usage, cached, key)


class ReplyCache:
    """Append-only JSONL of successful replies: ``{"v", "key", "path", "body", "reply", "time"}``.

    Thread-safe; each line is written and flushed whole, so a kill leaves at most one
    incomplete last line, which :meth:`__init__` cuts off before appending again.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._replies: dict[str, dict] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._load()
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:  # a folder, no permission ...: one line, before any request is paid for
            from chatforge.errors import DataError

            raise DataError(f"{self.path}: cannot use it as the reply cache ({e.strerror or e})") from None

    def _load(self) -> None:
        raw = self.path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # a line cut by a kill: drop it, the request is simply asked again
            with open(self.path, "r+b") as f:
                f.truncate(end)
            raw = raw[:end]
        # "\n" only: replies keep U+2028, U+0085 ... raw (ensure_ascii=False), splitlines() would cut there
        for i, line in enumerate(raw.decode("utf-8", "replace").split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                key, reply = obj["key"], obj["reply"]
            except (json.JSONDecodeError, KeyError, TypeError):
                from chatforge.errors import DataError

                raise DataError(f"{self.path}:{i}: not a reply-cache line (delete the file to start over)") from None
            self._replies[key] = reply

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> dict | None:
        return self._replies.get(key)

    def put(self, key: str, path: str, body: dict, reply: dict) -> None:
        line = json.dumps({"v": CACHE_VERSION, "key": key, "path": path, "body": body, "reply": reply,
                           "time": utc_now()}, ensure_ascii=False)
        with self._lock:
            if key in self._replies:
                return
            self._replies[key] = reply
            self._f.write(line + "\n")
            self._f.flush()

    def close(self) -> None:
        self._f.close()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Stats:
    """What the run cost: requests sent (retries included), answered from the cache, tokens."""

    sent: int = 0
    ok: int = 0
    cached: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float | None = None
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def rate(self) -> float:
        if not self.started:
            return 0.0
        return self.sent / max(time.monotonic() - self.started, 1e-6)

    def line(self) -> str:
        return (f"{self.rate():.2f} req/s, {self.tokens} tok, {self.cached} cached, "
                f"{self.retries} retries, {self.failed} failed")

    def to_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "ok": self.ok, "cached": self.cached, "retries": self.retries, "failed": self.failed,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "failures": dict(self.failures)}


class ApiClient:
    """Requests to ``url`` (``.../v1``): concurrency, retries, timeouts, cache, progress.

    ``sleep`` is the back-off's clock (tests pass a fake one). ``cache``: a path, or None for
    no cache. Call :meth:`close` (or use ``with``) to close the cache file.
    """

    def __init__(self, url: str, api_key: str | None = None, concurrency: int = 4, timeout: float = 120.0,
                 retries: int = 4, backoff: float = 1.0, max_backoff: float = 60.0,
                 cache: str | Path | None = None, sleep: Callable[[float], None] = time.sleep):
        if concurrency < 1:
            raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
        if timeout <= 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise ConfigError(f"--retries must be >= 0, got {retries}")
        self.url = normalise_url(url)
        self.api_key = api_key
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self.backoff, self.max_backoff, self._sleep = backoff, max_backoff, sleep
        self.cache = ReplyCache(cache) if cache else None
        self.stats = Stats()
        self.bar = None  # a tqdm bar whose postfix :meth:`refresh` keeps current
        self._lock = threading.Lock()
        self._jitter = random.Random()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    # -------------------------------------------------------------- one request
    def post(self, path: str, body: dict) -> Reply:
        """One request (``path`` like ``/chat/completions``): from the cache, or sent with retries.

        Raises :class:`RequestFailed` when it keeps failing, :class:`ChatforgeError` when no
        request to this endpoint can succeed (refused, unauthorised, unreachable).
        """
        key = request_key(path, body)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                with self._lock:
                    self.stats.cached += 1
                return reply_from(path, hit, key, cached=True)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
            try:
                data = self._send(path, body)
                reply = reply_from(path, data, key, cached=False)
            except _Retry as e:
                last = e.reason
                if e.final:
                    break
                if attempt < self.retries:
                    self._sleep(self._delay(attempt, e.wait))
                continue
            with self._lock:
                self.stats.ok += 1
                self.stats.prompt_tokens += _int(reply.usage.get("prompt_tokens"))
                self.stats.completion_tokens += _int(reply.usage.get("completion_tokens"))
            if self.cache is not None:
                self.cache.put(key, path, body, data)
            return reply
        if last.startswith("cannot reach"):
            raise ChatforgeError(f"{last} (after {self.retries + 1} tries)")
        with self._lock:
            self.stats.failed += 1
            reason = last.split(":")[0]
            self.stats.failures[reason] = self.stats.failures.get(reason, 0) + 1
        tries = f" (after {attempt + 1} tries)" if attempt else ""
        raise RequestFailed(f"{self.url}{path}: {last}{tries}", key)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        base = self.backoff * (2 ** attempt) * (0.5 + 0.5 * self._jitter.random())
        return min(self.max_backoff, max(base, retry_after or 0.0))

    def _send(self, path: str, body: dict) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers, method="POST")
        with self._lock:
            self.stats.sent += 1
            if self.stats.started is None:
                self.stats.started = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            self._http_error(e, path)
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retry(f"timeout: no answer within {self.timeout:g} s") from None
            why = getattr(e.reason, "strerror", None) or str(e.reason)
            raise _Retry(f"cannot reach {self.url}: {why}") from None
        except (TimeoutError, socket.timeout):
            raise _Retry(f"timeout: no answer within {self.timeout:g} s") from None
        except (ConnectionError, OSError, http.client.HTTPException) as e:  # reset mid-reply, incomplete read
            raise _Retry(f"connection broke: {getattr(e, 'strerror', None) or e}") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Retry(f"malformed reply: not JSON ({raw[:60]!r})") from None

    def _http_error(self, e: urllib.error.HTTPError, path: str) -> None:
        message = error_message(e)
        text = f"HTTP {e.code}" + (f": {message}" if message else "")
        if e.code in RETRY_STATUS or e.code >= 500:
            raise _Retry(text, _retry_after(e.headers.get("Retry-After") if e.headers else None))
        if e.code in (400, 413, 422):  # this request is refused (too long, a bad value): the others may pass
            raise _Retry(text, final=True)
        if e.code == 401:
            text += " (the API key was refused)" if self.api_key else " (give --api-key, or set OPENAI_API_KEY)"
        raise ChatforgeError(f"{self.url}{path}: {text}")

    # -------------------------------------------------------------- many requests
    def map(self, path: str, bodies: list[dict], on_done: Callable[[int, Reply | RequestFailed], None] | None = None
            ) -> list[Reply | RequestFailed]:
        """Every body sent (at most ``concurrency`` at once); results in input order.

        Identical bodies are sent once. ``on_done(i, result)`` runs in this thread as each
        finishes. A fatal error cancels what has not started and is raised once the requests
        in flight are done (their replies are cached).
        """
        keys = [request_key(path, b) for b in bodies]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        results: dict[int, Reply | RequestFailed] = {}

        def one(i: int) -> Reply | RequestFailed:
            try:
                return self.post(path, bodies[i])
            except RequestFailed as e:
                return e

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            pending = {pool.submit(one, i): i for i in sorted(set(first.values()))}
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    i = pending.pop(fut)
                    exc = fut.exception()
                    if exc is not None:
                        for f in pending:
                            f.cancel()
                        raise exc
                    results[i] = fut.result()
                    if on_done is not None:
                        on_done(i, results[i])
                    self.refresh()
        out = [results[first[k]] for k in keys]
        if on_done is not None:
            for i, k in enumerate(keys):
                if first[k] != i:
                    on_done(i, out[i])
        return out

    def refresh(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self.stats.line(), refresh=True)


def _int(x: Any) -> int:
    return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else 0


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def progress(total: int | None, desc: str, unit: str):
    """A tqdm bar on stderr (hidden when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=None)

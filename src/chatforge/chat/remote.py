"""A conversation with any OpenAI-compatible server: ``chatforge chat --url URL``.

:class:`RemoteSession` has the interface of :class:`chatforge.chat.session.ChatSession`
(``system``, ``cfg``, ``history``, ``stream`` / ``commit``, ``reset``, ``save``), so the
terminal REPL (:mod:`chatforge.chat.repl`) drives either one unchanged: ``chatforge serve``,
llama.cpp's ``llama-server``, vLLM or a hosted API all work the same way.

What differs from the local session:

* Replies stream over ``POST {url}/chat/completions`` with ``stream: true`` (server-sent
  events); the standard library only (``urllib``), no ``openai`` package.
* Settings: ``temperature``, ``top_p``, ``max_tokens``, ``seed`` and ``stop`` are standard
  OpenAI parameters; ``top_k``, ``min_p`` and ``repetition_penalty`` are sent only when set
  (chatforge, llama.cpp and vLLM accept them, OpenAI itself does not); beam search and
  ``no_repeat_ngram_size`` have no API equivalent and are refused.
* History fitting: tokens cannot be counted without the server's tokenizer, so when the
  server reports its context length in ``/v1/models`` (``context_length``,
  ``max_model_len``, llama.cpp's ``meta.n_ctx_train``) the prompt is fitted by an
  *estimate* of ``len(text) / 3`` tokens per message (conservative for English, where a token
  is ~4 characters); otherwise nothing is dropped and a too-long conversation gets the
  server's own error.
* Errors (unreachable server, HTTP 401, any 4xx/5xx, an ``error`` event in the stream) are
  :class:`ChatforgeError` with a one-line message: the REPL prints them and goes on.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from chatforge.chat.session import ChatSession, fit_history
from chatforge.data.openai_client import api_key_from_env, error_message, normalise_url  # noqa: F401  (shared with data commands)
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.generate.sampling import SamplingConfig

CHARS_PER_TOKEN = 3  # the history-fitting estimate (see the module docstring)
UNSUPPORTED = ("no_repeat_ngram_size", "beams", "length_penalty")  # not in the OpenAI API


class Client:
    """The two calls the chat needs, with every failure turned into a one-line :class:`ChatforgeError`."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300):
        self.url = normalise_url(url)
        self.api_key = api_key
        self.timeout = timeout  # per read: a slow CPU server may think a while before the first token

    def _open(self, path: str, body: dict | None = None):
        headers = {"Accept": "text/event-stream" if body and body.get("stream") else "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST" if data else "GET")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise ChatforgeError(self._http_error(e, path)) from None
        except urllib.error.URLError as e:
            reason = e.reason
            why = getattr(reason, "strerror", None) or str(reason)
            raise ChatforgeError(f"cannot reach {self.url}: {why}") from None
        except (TimeoutError, socket.timeout):
            raise ChatforgeError(f"{self.url}{path}: no answer within {self.timeout:g} s") from None
        except OSError as e:  # e.g. a connection reset before the headers
            raise ChatforgeError(f"cannot reach {self.url}: {e.strerror or e}") from None

    def _http_error(self, e: urllib.error.HTTPError, path: str) -> str:
        message = error_message(e)
        text = f"{self.url}{path}: HTTP {e.code} {e.reason}" + (f": {message}" if message else "")
        if e.code == 401:
            text += " (give --api-key, or set CHATFORGE_API_KEY / OPENAI_API_KEY)" if not self.api_key \
                else " (the API key was refused)"
        return text

    def models(self) -> list[dict]:
        """The entries of ``GET /models`` (``[]`` when the server answers something else)."""
        with self._open("/models") as r:
            try:
                data = json.loads(r.read())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ChatforgeError(f"{self.url}/models: the answer is not JSON") from None
        entries = data.get("data") if isinstance(data, dict) else data
        return [m for m in entries if isinstance(m, dict) and m.get("id")] if isinstance(entries, list) else []

    def stream_chat(self, body: dict) -> RemoteStream:
        return RemoteStream(self._open("/chat/completions", {**body, "stream": True}), self.url)


class RemoteCompletion:
    """What the REPL reads of a finished reply (``.text``), plus why it ended and the usage."""

    def __init__(self, text: str, finish_reason: str | None, usage: dict | None):
        self.text, self.finish_reason, self.usage = text, finish_reason, usage


class RemoteStream:
    """Iterator of text deltas read from an SSE response; ``.completion`` once exhausted or closed."""

    def __init__(self, response, url: str):
        self._r = response
        self._url = url
        self._parts: list[str] = []
        self._finish: str | None = None
        self._usage: dict | None = None
        self._events = self._read()
        self.completion: RemoteCompletion | None = None

    def _read(self):
        data: list[str] = []
        try:
            for raw in self._r:  # lines; an event ends at a blank line
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                    continue
                if line or not data:
                    continue  # comments (": ping"), event:/id: fields, stray blank lines
                payload, data = "\n".join(data), []
                if payload.strip() == "[DONE]":
                    return
                delta = self._event(payload)
                if delta:
                    self._parts.append(delta)
                    yield delta
        except (TimeoutError, socket.timeout):
            raise ChatforgeError(f"{self._url}: the server stopped sending (no data for a while)") from None
        except OSError as e:
            raise ChatforgeError(f"{self._url}: the connection broke during the reply ({e.strerror or e})") from None
        finally:
            self._r.close()

    def _event(self, payload: str) -> str:
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            raise ChatforgeError(f"{self._url}: a streamed chunk is not JSON: {payload[:80]!r}") from None
        if not isinstance(chunk, dict):
            return ""
        if chunk.get("error"):
            err = chunk["error"]
            raise ChatforgeError(f"server error: {err.get('message', err) if isinstance(err, dict) else err}")
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        text = ""
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._finish = choice.get("finish_reason") or self._finish
                text += (choice.get("delta") or {}).get("content") or ""
        return text

    def __iter__(self) -> RemoteStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._events)
        except StopIteration:
            self._finalize()
            raise

    def close(self) -> None:
        """Stop reading (Ctrl-C): closing the connection tells the server to stop generating."""
        self._events.close()
        self._r.close()
        self._finalize()

    def _finalize(self) -> None:
        if self.completion is None:
            self.completion = RemoteCompletion("".join(self._parts), self._finish, self._usage)


def context_length(card: dict) -> int | None:
    """The context window a ``/v1/models`` entry reports, if any (servers name it differently)."""
    for value in (card.get("context_length"), card.get("max_model_len"), card.get("context_window"),
                  (card.get("meta") or {}).get("n_ctx_train") if isinstance(card.get("meta"), dict) else None):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def estimate_tokens(messages: list[dict]) -> int:
    return sum(len(m["content"]) // CHARS_PER_TOKEN + 4 for m in messages)  # + the role's framing


class RemoteSession(ChatSession):
    """System prompt + history + settings, talking to an OpenAI-compatible server.

    The transcript, ``reset``, ``commit``, ``send`` and ``save`` are :class:`ChatSession`'s;
    what is new is how a reply is requested. ``model=None``: the first model ``GET /models``
    lists. ``context``: the server's context window in tokens for the history estimate
    (default: what ``/models`` says, else no fitting).
    """

    unsupported_settings = UNSUPPORTED  # the REPL's /set shows only what the API can do

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None,
                 system: str | None = None, cfg: SamplingConfig | None = None, context: int | None = None,
                 timeout: float = 300):
        self.client = Client(url, api_key, timeout)
        self.system = system or None
        self.cfg = cfg or SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=256)
        self.history: list[dict] = []
        self.dropped = 0
        self._pending_user = ""
        card: dict = {}
        try:
            cards = self.client.models()
        except ChatforgeError:
            if model is None:
                raise
            cards = []  # some servers have no /models; a named model can still be used
        if model is None:
            if not cards:
                raise ChatforgeError(f"{self.client.url}/models lists no model: give one with --model NAME")
            card = cards[0]
        else:
            card = next((c for c in cards if c["id"] == model), {})
        self.model = model or str(card["id"])
        self.context = context or context_length(card)

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def banner(self) -> str:
        return f"connected to {self.url}, model {self.model}"

    @property
    def cfg(self) -> SamplingConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: SamplingConfig) -> None:
        """Refuse, before any request, what no OpenAI-compatible API can do."""
        if cfg.num_beams != 1:
            raise ConfigError("beams: beam search is not available over --url (OpenAI API)")
        if cfg.no_repeat_ngram_size:
            raise ConfigError("no_repeat_ngram_size: not available over --url (OpenAI API)")
        if cfg.length_penalty != 1.0:
            raise ConfigError("length_penalty: beam search only, not available over --url")
        self._cfg = cfg

    def request_body(self, messages: list[dict]) -> dict:
        c = self.cfg
        body: dict = {"model": self.model, "messages": messages, "temperature": c.temperature, "top_p": c.top_p,
                      "max_tokens": c.max_new_tokens, "stream_options": {"include_usage": True}}
        if c.seed is not None:
            body["seed"] = c.seed
        if c.stop:
            body["stop"] = list(c.stop)
        for key, off in (("top_k", 0), ("min_p", 0.0), ("repetition_penalty", 1.0)):
            if getattr(c, key) != off:  # extensions: only when asked for, so OpenAI itself stays usable
                body[key] = getattr(c, key)
        return body

    def prompt_for(self, user_text: str) -> list[dict]:
        """The messages of the next request; with a known context, trims the oldest turns by the estimate."""
        pending = self.history + [{"role": "user", "content": user_text}]
        kept = pending
        if self.context:
            budget = self.context - self.cfg.max_new_tokens
            if budget < 1:
                raise ConfigError(f"max_tokens={self.cfg.max_new_tokens} leaves no room in the server's "
                                  f"{self.context}-token context")
            kept = fit_history(self.system_messages(), pending, budget, estimate_tokens)
        self.dropped += sum(1 for m in pending[:len(pending) - len(kept)] if m["role"] == "user")
        self.history = kept[:-1]
        self._pending_user = user_text
        return self.system_messages() + kept

    def stream(self, user_text: str) -> RemoteStream:
        """Start a reply (the request is sent here, so a refused one fails before any output)."""
        return self.client.stream_chat(self.request_body(self.prompt_for(user_text)))

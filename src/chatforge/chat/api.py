"""The OpenAI wire protocol, without the web framework: request validation, response bodies,
stream chunks and error bodies for ``/v1/chat/completions`` and ``/v1/completions``.

Kept apart from :mod:`chatforge.chat.server` so the rules a request must follow read in one
place and are testable without sockets. The rules:

* **Types and ranges** are checked field by field; a bad one is a :class:`ApiError` (HTTP 400)
  whose ``param`` names the field (``messages[2].content``, ``temperature``).
* **Unknown parameters are errors** (``param`` = the first one), so a client that asks for
  something we do not do (``tools``, ``response_format: json_object``) learns it instead of
  silently getting something else. Exceptions, because the common clients send them:
  :data:`IGNORED` are accepted with any value (they never change the reply), and
  :data:`IGNORED_IF_DEFAULT` only with their no-op value (``presence_penalty: 0``).
* ``model`` must be a string but is not matched against the served model: clients often send
  a fixed name (``gpt-3.5-turbo``) and there is only one model here.
* Missing sampling fields take the server's defaults (``--max-tokens`` etc.).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatforge.generate.engine import SamplingConfig

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n in one /v1/completions request
MAX_STOP = 16
MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions' logprobs
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled"}

IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
IGNORED_IF_DEFAULT: dict[str, Any] = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
                                      "response_format": {"type": "text"}}
CHAT_IGNORED_IF_DEFAULT = {**IGNORED_IF_DEFAULT, "top_logprobs": 0}
COMPLETION_IGNORED_IF_DEFAULT = {**IGNORED_IF_DEFAULT, "echo": False, "best_of": 1, "suffix": None}


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (400 unless said)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(str(self), self.param, self.kind, self.code)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    """OpenAI's error shape: every non-2xx answer of the server has it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------- numbers
@dataclass(frozen=True)
class Num:
    """A numeric parameter's range: one table drives both validation and the OpenAPI schema."""

    lo: float
    hi: float
    integer: bool = False

    def schema(self) -> dict:
        return {"type": "integer" if self.integer else "number", "minimum": self.lo, "maximum": self.hi}


NUMBERS = {
    "temperature": Num(0, 2),
    "top_p": Num(1e-9, 1),
    "top_k": Num(0, 1 << 20, integer=True),
    "min_p": Num(0, 0.999999),
    "repetition_penalty": Num(1e-3, 100),
    "max_tokens": Num(1, 1 << 20, integer=True),
    "max_completion_tokens": Num(1, 1 << 20, integer=True),
    "n": Num(1, MAX_N, integer=True),
    "seed": Num(-(1 << 63), (1 << 63) - 1, integer=True),
    "logprobs": Num(0, MAX_LOGPROBS, integer=True),  # /v1/completions' meaning (chat's is a bool)
}


def _number(body: dict, key: str, default):
    v = body.get(key)
    if v is None:
        return default
    spec = NUMBERS[key]
    ok_type = isinstance(v, int) if spec.integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not (spec.lo <= v <= spec.hi):  # NaN fails the range
        kind = "an integer" if spec.integer else "a number"
        raise ApiError(f"'{key}' must be {kind} between {spec.lo} and {spec.hi}, got {v!r}", key)
    return v


def _bool(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(f"'{key}' must be true or false, got {v!r}", key)
    return v


# ---------------------------------------------------------------------------- requests
@dataclass
class ChatRequest:
    messages: list[dict]
    cfg: SamplingConfig  # without the template's stop strings: the server adds them
    n: int
    stream: bool
    include_usage: bool
    max_tokens_given: bool  # False: cfg.max_new_tokens is the server's default


@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]  # text, or token ids used as given
    cfg: SamplingConfig
    n: int
    stream: bool
    include_usage: bool
    max_tokens_given: bool
    logprobs: int | None  # None = no log-probs; k >= 0: the sampled tokens' (top-k alternatives not computed)


def parse_json(raw: bytes) -> Any:
    """Strict JSON (no NaN/Infinity); every failure is a 400 naming the problem."""
    def no_constants(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(raw, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ApiError(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError("the body is not valid JSON: nested too deeply") from None


def parse_messages(body: dict) -> list[dict]:
    """OpenAI ``messages`` -> ``[{role, content}]`` with text content; ``developer`` is a system turn."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(f"messages[{i}]: 'role' must be system, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _check_keys(body, accepted: set[str], if_default: dict[str, Any]) -> None:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    unknown = sorted(set(body) - accepted - IGNORED - set(if_default))
    if unknown:
        raise ApiError(f"unsupported parameter(s): {', '.join(unknown)}", unknown[0])
    for key, default in if_default.items():
        if body.get(key) not in (None, default):
            raise ApiError(f"'{key}' is not supported (only {json.dumps(default)})", key)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError("'model' must be a string", "model")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(f"'stop' must be a string or a list of up to {MAX_STOP} non-empty strings", "stop")
    return stop


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError("'stream_options' must be {\"include_usage\": true|false}", "stream_options")
    return bool(opts.get("include_usage"))


def _sampling(body: dict, defaults: SamplingConfig, logprobs: bool) -> SamplingConfig:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return SamplingConfig(
        temperature=_number(body, "temperature", defaults.temperature),
        top_p=_number(body, "top_p", defaults.top_p),
        top_k=_number(body, "top_k", defaults.top_k),
        min_p=_number(body, "min_p", defaults.min_p),
        repetition_penalty=_number(body, "repetition_penalty", defaults.repetition_penalty),
        max_new_tokens=_number(body, key, defaults.max_new_tokens),
        stop=_stop(body), seed=_number(body, "seed", None), logprobs=logprobs,
    )


COMMON = {"model", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "stop", "n",
          "seed", "stream", "stream_options"}
CHAT_ACCEPTED = COMMON | {"messages", "max_completion_tokens", "logprobs"}
COMPLETION_ACCEPTED = COMMON | {"prompt", "logprobs"}


def parse_chat(body, defaults: SamplingConfig) -> ChatRequest:
    """A ``/v1/chat/completions`` body -> :class:`ChatRequest` (or :class:`ApiError`)."""
    _check_keys(body, CHAT_ACCEPTED, CHAT_IGNORED_IF_DEFAULT)
    messages = parse_messages(body)
    cfg = _sampling(body, defaults, logprobs=_bool(body, "logprobs"))
    return ChatRequest(messages, cfg, _number(body, "n", 1), _bool(body, "stream"), _include_usage(body),
                       _max_tokens_given(body))


def parse_completion(body, defaults: SamplingConfig, vocab_size: int) -> CompletionRequest:
    """A legacy ``/v1/completions`` body: ``prompt`` is a string, a list of strings, a list of
    token ids or a list of such lists (what evaluation harnesses send)."""
    if isinstance(body, dict) and body.get("echo") is True:
        raise ApiError("'echo': true is not supported (the prompt's log-probs are not computed)", "echo")
    _check_keys(body, COMPLETION_ACCEPTED, COMPLETION_IGNORED_IF_DEFAULT)
    prompts = _prompts(body.get("prompt"), vocab_size)
    logprobs = _number(body, "logprobs", None)
    n = _number(body, "n", 1)
    if len(prompts) * n > MAX_CHOICES:
        raise ApiError(f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} choices in one request", "n")
    cfg = _sampling(body, defaults, logprobs=logprobs is not None)
    return CompletionRequest(prompts, cfg, n, _bool(body, "stream"), _include_usage(body), _max_tokens_given(body),
                             logprobs)


def _max_tokens_given(body: dict) -> bool:
    return body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _prompts(p, vocab_size: int) -> list[str | list[int]]:
    what = "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists"
    if isinstance(p, str):
        prompts: list = [p]
    elif _is_ids(p):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or _is_ids(x) for x in p):
        prompts = p
    else:
        raise ApiError(what, "prompt")
    if len(prompts) > MAX_CHOICES:
        raise ApiError(f"at most {MAX_CHOICES} prompts in one request, got {len(prompts)}", "prompt")
    for i, x in enumerate(prompts):
        if isinstance(x, list) and not all(0 <= t < vocab_size for t in x):
            raise ApiError(f"prompt {i}: token ids must be in 0..{vocab_size - 1}", "prompt")
    return prompts


# ---------------------------------------------------------------------------- responses
@dataclass
class Choice:
    """One choice's reply as its deltas arrive."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, text: str, token_ids: list[int], logprobs: list[float] | None, finish_reason: str | None) -> None:
        self.text += text
        self.token_ids += token_ids
        self.logprobs += logprobs or []
        if finish_reason is not None:
            self.finish_reason = FINISH.get(finish_reason, finish_reason)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


TokenText = Callable[[int], str]


def chat_logprobs(token_ids: list[int], logprobs: list[float], token_text: TokenText) -> dict:
    """Chat's ``logprobs.content``: the sampled tokens only (``top_logprobs`` is always empty)."""
    content = []
    for t, lp in zip(token_ids, logprobs):
        s = token_text(t)
        content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []})
    return {"content": content}


def completion_logprobs(token_ids: list[int], logprobs: list[float], token_text: TokenText,
                        offset: int = 0) -> dict:
    """Legacy ``logprobs``: tokens, their log-probs and character offsets (``offset``: where
    this part starts in the choice's text); ``top_logprobs`` is null: alternatives are not computed."""
    tokens = [token_text(t) for t in token_ids]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": list(logprobs[:len(tokens)]), "top_logprobs": None,
            "text_offset": offsets}


def envelope(cid: str, obj: str, model: str, choices: list[dict], **extra) -> dict:
    return {"id": cid, "object": obj, "created": int(time.time()), "model": model, "choices": choices, **extra}


def chat_body(model: str, choices: list[Choice], usage_: dict, logprobs: bool, token_text: TokenText) -> dict:
    """A whole ``chat.completion``."""
    return envelope(new_id("chatcmpl"), "chat.completion", model, [
        {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
         "logprobs": chat_logprobs(c.token_ids, c.logprobs, token_text) if logprobs else None}
        for i, c in enumerate(choices)], usage=usage_)


def completion_body(model: str, choices: list[Choice], usage_: dict, logprobs: bool, token_text: TokenText) -> dict:
    """A whole legacy ``text_completion``."""
    return envelope(new_id("cmpl"), "text_completion", model, [
        {"index": i, "text": c.text, "finish_reason": c.finish_reason,
         "logprobs": completion_logprobs(c.token_ids, c.logprobs, token_text) if logprobs else None}
        for i, c in enumerate(choices)], usage=usage_)


def chat_chunk_choice(i: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": i, "delta": {"content": text} if text else {}, "logprobs": logprobs,
            "finish_reason": FINISH.get(finish_reason, finish_reason)}


def completion_chunk_choice(i: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": FINISH.get(finish_reason, finish_reason)}


def sse(obj: dict | str) -> bytes:
    """One server-sent event: ``data: JSON`` and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# ---------------------------------------------------------------------------- OpenAPI
def _props(names: set[str], extra: dict) -> dict:
    text_or_list = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    base = {"model": {"type": "string", "description": "accepted, not matched: one model is served"},
            "stop": text_or_list, "stream": {"type": "boolean"},
            "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}}
    props = {k: NUMBERS[k].schema() for k in names if k in NUMBERS}
    props.update({k: v for k, v in base.items() if k in names})
    props.update(extra)
    return dict(sorted(props.items()))


CHAT_SCHEMA = {
    "type": "object", "required": ["messages"],
    "properties": _props(CHAT_ACCEPTED, {
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"],
            "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]},
                           "content": {"oneOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]}}}},
        "logprobs": {"type": "boolean"},
    }),
}
COMPLETION_SCHEMA = {
    "type": "object", "required": ["prompt"],
    "properties": _props(COMPLETION_ACCEPTED, {
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array"}]},
        "echo": {"const": False},
    }),
}

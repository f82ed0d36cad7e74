"""Message-list formats: ShareGPT, OpenAI ``messages``, and our own canonical JSONL.

* ``sharegpt`` -- ``{"conversations": [{"from", "value"}, ...]}`` (FastChat/Vicuna);
  ``from`` is human/user, gpt/assistant/chatgpt/bard/bing/model, or system; LLaMA-Factory's
  ``function_call`` and ``observation`` turns are tool calls and tool results
  (:mod:`.tools`). An optional top-level ``system`` string becomes the system message, a
  ``tools`` schema list (or its JSON) goes to ``meta["tools"]``. Turns are kept in order as
  given (nothing is dropped); a conversation needs at least one user and one assistant
  turn.
* ``openai-messages`` -- ``{"messages": [{"role", "content"}, ...]}``. ``developer`` is read
  as ``system``; ``content`` given as a list of text parts is joined; assistant
  ``tool_calls`` (content null) and ``tool`` results are kept, as are the legacy
  ``function_call`` / ``function`` role (:mod:`.tools`); a top-level ``tools`` list goes to
  ``meta["tools"]``. At least one user and one assistant message are required (the OpenAI
  cookbook's toy file has a record with no user message on purpose: it is reported).
* ``chatforge`` -- records written by :func:`chatforge.data.records.write_jsonl`
  (``{"kind": ..., ...}``). Their ``meta`` is kept, so provenance survives a round trip.
"""

from __future__ import annotations

import json
from typing import Any

from chatforge.data.formats import tools as T
from chatforge.data.formats.base import Bad, Format, not_this, with_id
from chatforge.data.records import KINDS, Conversation, RecordError, from_dict, msg

_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant", "bot": "assistant", "system": "system",
}
_SHAREGPT_TOOL_TURNS = {"function_call": "call", "tool_call": "call", "observation": "result", "tool": "result",
                        "function": "result"}
_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _tools_meta(meta: dict, obj: dict) -> None:
    """Keep a record's tool schemas (OpenAI ``tools``, LLaMA-Factory's JSON string) in meta."""
    t = obj.get("tools", obj.get("functions"))
    if isinstance(t, str) and t.strip():
        try:
            t = json.loads(t)
        except json.JSONDecodeError:
            raise Bad("'tools' is not valid JSON") from None
    if t:
        meta["tools"] = t


def _need_user_and_assistant(messages: list) -> None:
    roles = {m["role"] for m in messages}
    if "user" not in roles:
        raise Bad("conversation has no user message")
    if "assistant" not in roles:
        raise Bad("conversation has no assistant message")


def detect_sharegpt(d: Any) -> float:
    if isinstance(d, dict) and isinstance(d.get("conversations"), list):
        turns = d["conversations"]
        if not turns or (isinstance(turns[0], dict) and ("from" in turns[0] or "role" in turns[0])):
            return 3.0
    return 0.0


def convert_sharegpt(obj: Any, meta: dict) -> Conversation:
    if not detect_sharegpt(obj):
        raise not_this(obj, "conversations: [{from, value}]")
    messages = []
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        messages.append(msg("system", system))
    for i, t in enumerate(obj["conversations"]):
        if not isinstance(t, dict):
            raise Bad(f"conversations[{i}] is not an object")
        who, text = t.get("from", t.get("role")), t.get("value", t.get("content"))
        tool_turn = _SHAREGPT_TOOL_TURNS.get(str(who).lower())
        if tool_turn == "call":
            messages.append(T.sharegpt_function_call(text, f"conversations[{i}]"))
            continue
        if tool_turn == "result":
            messages.append(T.tool_result(text, f"conversations[{i}]"))
            continue
        role = _SHAREGPT_ROLES.get(str(who).lower())
        if role is None:
            raise Bad(f"conversations[{i}] has unknown speaker {who!r}")
        if not isinstance(text, str):
            raise Bad(f"conversations[{i}].value is not a string")
        messages.append(msg(role, text))
    _need_user_and_assistant(messages)
    _tools_meta(meta, obj)
    return Conversation(messages, with_id(meta, obj, "id"))


def detect_messages(d: Any) -> float:
    if isinstance(d, dict) and isinstance(d.get("messages"), list) and "kind" not in d:
        m = d["messages"]
        if not m or (isinstance(m[0], dict) and "role" in m[0]):
            return 3.0
    return 0.0


def _content(c: Any, i: int) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) for p in c):
        if any(p.get("type") != "text" for p in c):
            raise Bad(f"messages[{i}] has non-text content parts (images/audio are not supported)")
        return "".join(str(p.get("text", "")) for p in c)
    raise Bad(f"messages[{i}].content is {type(c).__name__}, expected a string")


def convert_messages(obj: Any, meta: dict) -> Conversation:
    if not detect_messages(obj):
        raise not_this(obj, "messages: [{role, content}]")
    messages = []
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict):
            raise Bad(f"messages[{i}] is not an object")
        messages.append(_openai_message(m, i))
    _need_user_and_assistant(messages)
    _tools_meta(meta, obj)
    return Conversation(messages, with_id(meta, obj, "id"))


def _openai_message(m: dict, i: int) -> dict:
    role, where = m.get("role"), f"messages[{i}]"
    if role in ("tool", "function"):  # a tool's result ("function": the legacy name)
        c = m.get("content")
        return T.tool_result(_content(c, i) if isinstance(c, (str, list)) else c, where,
                             m.get("tool_call_id"), m.get("name"))
    if role == "assistant" and (m.get("tool_calls") or m.get("function_call")):
        c = m.get("content")
        return T.assistant_calls(None if c is None else _content(c, i), m.get("tool_calls") or m["function_call"], where)
    mapped = _OPENAI_ROLES.get(role)
    if mapped is None:
        raise Bad(f"{where} has unknown role {role!r}")
    return msg(mapped, _content(m.get("content"), i))


def detect_canonical(d: Any) -> float:
    return 4.0 if isinstance(d, dict) and d.get("kind") in KINDS and "meta" in d else 0.0


def convert_canonical(obj: Any, meta: dict):
    if not isinstance(obj, dict) or obj.get("kind") not in KINDS:
        raise not_this(obj, "a chatforge record with 'kind'")
    if isinstance(obj.get("meta"), str) or any(v is None for v in obj.values()):  # a table row
        obj = T.stored_record(obj)
    try:
        rec = from_dict(obj)
    except RecordError as e:
        raise Bad(str(e)) from None
    if not isinstance(rec.meta, dict):
        raise Bad("'meta' must be an object")
    if "line" not in rec.meta and rec.meta.get("source") not in (None, meta["source"]):
        rec.meta.setdefault("file", meta["source"])  # source "human" / "ai" (chatforge label): file:line for messages
    for k, v in meta.items():  # keep the original provenance; fill in what is missing
        rec.meta.setdefault(k, v)
    return rec


FORMATS = [
    Format("chatforge", "mixed", detect_canonical, convert_canonical,
           "canonical chatforge JSONL (records.write_jsonl): {kind, ..., meta}"),
    Format("sharegpt", "conversation", detect_sharegpt, convert_sharegpt,
           "ShareGPT/FastChat: conversations [{from: human|gpt|system, value}]"),
    Format("openai-messages", "conversation", detect_messages, convert_messages,
           "OpenAI chat fine-tuning: messages [{role, content}]"),
]

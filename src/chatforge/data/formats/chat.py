"""Message-list formats: ShareGPT, OpenAI ``messages``, and our own canonical JSONL.

* ``sharegpt`` -- ``{"conversations": [{"from", "value"}, ...]}`` (FastChat/Vicuna);
  ``from`` is human/user, gpt/assistant/chatgpt/bard/bing/model, or system. An optional
  top-level ``system`` string becomes the system message. Turns are kept in order as
  given (nothing is dropped); a conversation needs at least one user and one assistant
  turn.
* ``openai-messages`` -- ``{"messages": [{"role", "content"}, ...]}``. ``developer`` is read
  as ``system``; ``content`` given as a list of text parts is joined; tool/function
  messages are not supported (the record is reported). At least one user and one
  assistant message are required (the OpenAI cookbook's toy file has a record with no
  user message on purpose: it is reported).
* ``chatforge`` -- records written by :func:`chatforge.data.records.write_jsonl`
  (``{"kind": ..., ...}``). Their ``meta`` is kept, so provenance survives a round trip.
"""

from __future__ import annotations

from typing import Any

from chatforge.data.formats.base import Bad, Format, not_this, with_id
from chatforge.data.records import KINDS, Conversation, RecordError, from_dict, msg

_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant", "bot": "assistant", "system": "system",
}
_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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
        role = _SHAREGPT_ROLES.get(str(who).lower())
        if role is None:
            raise Bad(f"conversations[{i}] has unknown speaker {who!r}")
        if not isinstance(text, str):
            raise Bad(f"conversations[{i}].value is not a string")
        messages.append(msg(role, text))
    _need_user_and_assistant(messages)
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
        role = _OPENAI_ROLES.get(m.get("role"))
        if role is None:
            raise Bad(f"messages[{i}] has role {m.get('role')!r} (tool/function messages are not supported)")
        messages.append(msg(role, _content(m.get("content"), i)))
    _need_user_and_assistant(messages)
    return Conversation(messages, with_id(meta, obj, "id"))


def detect_canonical(d: Any) -> float:
    return 4.0 if isinstance(d, dict) and d.get("kind") in KINDS and "meta" in d else 0.0


def convert_canonical(obj: Any, meta: dict):
    if not isinstance(obj, dict) or obj.get("kind") not in KINDS:
        raise not_this(obj, "a chatforge record with 'kind'")
    try:
        rec = from_dict(obj)
    except RecordError as e:
        raise Bad(str(e)) from None
    if not isinstance(rec.meta, dict):
        raise Bad("'meta' must be an object")
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

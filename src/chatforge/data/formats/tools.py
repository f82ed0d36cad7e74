"""Tool-calling turns as the readers find them -> the canonical shape of :mod:`chatforge.data.records`.

* OpenAI: an assistant message with ``tool_calls`` (``arguments`` a JSON *string*) and
  ``content`` null, then ``tool`` messages (``tool_call_id``, ``content``); the legacy form
  (``function_call`` on the assistant, a ``function`` role with ``name``) reads the same.
* ShareGPT as LLaMA-Factory writes it: a ``function_call`` turn (``value`` the JSON of
  ``{"name", "arguments"}`` or a list of them) is an assistant message with ``tool_calls``,
  an ``observation`` turn is a ``tool`` message.
* Rows of a Parquet / Arrow table: every struct field exists in every message, None where
  a message lacks it; such None fields are dropped.

``arguments`` becomes an object (chat templates take a dict: ``tool_call.arguments | tojson``);
a string that is not the JSON of an object is an error naming the message.
"""

from __future__ import annotations

import json
from typing import Any

from chatforge.data.formats.base import Bad


def arguments(value: Any, where: str) -> dict:
    """A tool call's arguments as an object (OpenAI sends a JSON string)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise Bad(f"{where}.arguments is not valid JSON: {value[:60]!r}") from None
    if not isinstance(value, dict):
        raise Bad(f"{where}.arguments must be a JSON object, got {type(value).__name__}")
    return value


def tool_call(c: Any, where: str) -> dict:
    """One call, OpenAI (``{"id", "type", "function": {...}}``) or bare (``{"name", "arguments"}``)."""
    if not isinstance(c, dict):
        raise Bad(f"{where} is not an object")
    f = c.get("function") if isinstance(c.get("function"), dict) else c
    name = f.get("name")
    if not isinstance(name, str) or not name:
        raise Bad(f"{where} has no function name")
    out: dict[str, Any] = {"type": "function", "function": {"name": name,
                                                           "arguments": arguments(f.get("arguments"), where)}}
    if isinstance(c.get("id"), str) and c["id"]:
        out = {"id": c["id"], **out}
    return out


def tool_calls(calls: Any, where: str) -> list[dict]:
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise Bad(f"{where} must be a non-empty list of calls")
    return [tool_call(c, f"{where}[{j}]") for j, c in enumerate(calls)]


def assistant_calls(content: str | None, calls: Any, where: str) -> dict:
    return {"role": "assistant", "content": content if content else None,
            "tool_calls": tool_calls(calls, f"{where}.tool_calls")}


def tool_result(content: Any, where: str, call_id: Any = None, name: Any = None) -> dict:
    """A ``tool`` message; a result that is not text (an object) is kept as its JSON."""
    if content is None:
        raise Bad(f"{where} (a tool result) has no content")
    if not isinstance(content, str):
        content = json.dumps(content, ensure_ascii=False)
    m: dict[str, Any] = {"role": "tool", "content": content}
    if isinstance(call_id, str) and call_id:
        m["tool_call_id"] = call_id
    if isinstance(name, str) and name:
        m["name"] = name
    return m


def sharegpt_function_call(value: Any, where: str) -> dict:
    """A ShareGPT ``function_call`` turn: its value is the JSON of one call or a list of calls."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise Bad(f"{where}: a function_call turn must hold the JSON of {{name, arguments}}") from None
    return {"role": "assistant", "content": None, "tool_calls": tool_calls(value, where)}


def stored_message(m: Any) -> Any:
    """A canonical message read back from a table (None-valued fields dropped, arguments parsed)."""
    if not isinstance(m, dict):
        return m
    out = {k: v for k, v in m.items() if v is not None or k == "content"}
    calls = out.get("tool_calls")
    if calls is not None:
        out["tool_calls"] = [
            {k: v for k, v in c.items() if v is not None} | {
                "function": {"name": c["function"].get("name"),
                             "arguments": arguments(c["function"].get("arguments"), "tool_calls")}}
            if isinstance(c, dict) and isinstance(c.get("function"), dict) else c
            for c in calls]
    return out


def stored_record(obj: dict) -> dict:
    """A canonical record from a table row (``chatforge data convert --to parquet``): ``meta``
    is stored as JSON text, optional fields are None, message structs carry every field."""
    out = {k: v for k, v in obj.items() if v is not None or k in ("meta",)}
    if isinstance(out.get("meta"), str):
        try:
            out["meta"] = json.loads(out["meta"])
        except json.JSONDecodeError:
            raise Bad("'meta' is neither an object nor the JSON of one") from None
    for k in ("messages", "prompt", "responses"):
        if isinstance(out.get(k), list):
            out[k] = [stored_message(m) for m in out[k]]
    for k in ("chosen", "rejected"):
        if k in out:
            out[k] = stored_message(out[k])
    return out

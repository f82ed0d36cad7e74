"""Canonical records: every reader produces these, every trainer consumes them.

Four kinds, all plain dataclasses that round-trip through one JSON object per line:

* ``Conversation`` -- ``messages`` (OpenAI style) for supervised fine-tuning; may call tools
  (see *Tool calls* below).
* ``Preference``  -- a prompt plus a ``chosen`` and a ``rejected`` assistant message.
* ``Ranking``     -- a prompt plus K >= 2 responses ordered best -> worst; optional ``tiers``
  (one non-decreasing integer per response, 0 = best) mark ties: responses of equal tier
  are equally good, and no (better, worse) pair is made between them.
* ``Prompt``      -- a prompt only, for RL rollouts and evaluation.

``meta`` carries provenance (``source`` file, ``line`` -- or ``row`` for a table --, original
``id``) so an error or a rejected record can always be traced back to the byte it came from.

Tool calls (OpenAI's fine-tuning format, also what Hugging Face chat templates take): an
assistant message may carry ``tool_calls`` -- ``[{"id"?, "type": "function", "function":
{"name": str, "arguments": {...}}}]``, ``arguments`` an object (readers parse OpenAI's JSON
string) -- with ``content`` None or text; a ``tool`` message holds a result as ``content``,
with optional ``tool_call_id`` and ``name``. Conversations and prompts may hold them;
preference and ranking responses may not (they are scored as text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Union

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
TOOL_FIELDS: tuple[str, ...] = ("tool_calls", "tool_call_id", "name")  # beside role and content
Message = dict[str, Any]  # {"role": ..., "content": ...} (+ TOOL_FIELDS, see the module doc)


class RecordError(ValueError):
    """A record that violates its kind's invariants (reason is user-facing)."""


def msg(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def has_tool_calls(messages: list[Message]) -> bool:
    """Does any message call a tool or hold a tool's result?"""
    return any(m["role"] == "tool" or "tool_calls" in m for m in messages)


def _check_messages(messages: list[Message], what: str, tools: bool = False) -> None:
    if not isinstance(messages, list):
        raise RecordError(f"{what} must be a list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"{what}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RecordError(f"{what}[{i}] has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if len(m) > 2 or m["role"] == "tool":
            _check_tool_fields(m, f"{what}[{i}]", tools)
        elif not isinstance(m["content"], str):
            raise RecordError(f"{what}[{i}].content must be a string")


def _check_tool_fields(m: Message, what: str, tools: bool) -> None:
    extra = [k for k in m if k not in ("role", "content", *TOOL_FIELDS)]
    if extra:
        raise RecordError(f"{what} has unknown field {extra[0]!r}")
    calls = m.get("tool_calls")
    if not tools and (calls is not None or m["role"] == "tool"):
        raise RecordError(f"{what}: tool calls can only be part of a conversation or a prompt, not of a response")
    if calls is not None:
        if m["role"] != "assistant":
            raise RecordError(f"{what}: only assistant messages make tool_calls")
        if not isinstance(calls, list) or not calls:
            raise RecordError(f"{what}.tool_calls must be a non-empty list")
        for j, c in enumerate(calls):
            f = c.get("function") if isinstance(c, dict) else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
                raise RecordError(f"{what}.tool_calls[{j}] must be {{\"function\": {{\"name\": ..., \"arguments\": {{...}}}}}}")
            if not isinstance(f.get("arguments", {}), dict):
                raise RecordError(f"{what}.tool_calls[{j}].function.arguments must be an object")
            if c.get("id") is not None and not isinstance(c["id"], str):
                raise RecordError(f"{what}.tool_calls[{j}].id must be a string")
        if m["content"] is not None and not isinstance(m["content"], str):
            raise RecordError(f"{what}.content must be a string or null")
    elif not isinstance(m["content"], str):
        raise RecordError(f"{what}.content must be a string" + (" (null only beside tool_calls)"
                                                                  if m["content"] is None else ""))
    for k in ("tool_call_id", "name"):
        if m.get(k) is not None and (m["role"] != "tool" or not isinstance(m[k], str)):
            raise RecordError(f"{what}.{k} must be a string on a tool message")


def _check_prompt(prompt: list[Message]) -> None:
    _check_messages(prompt, "prompt", tools=True)
    if not prompt or prompt[-1]["role"] != "user":
        raise RecordError("prompt must end with a user message")


@dataclass
class Conversation:
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = field(default="conversation", init=False)

    def validate(self) -> "Conversation":
        _check_messages(self.messages, "messages", tools=True)
        if not any(m["role"] == "assistant" for m in self.messages):
            raise RecordError("conversation has no assistant message to learn from")
        return self

    @property
    def prompt(self) -> list[Message]:
        """Everything before the last assistant message (used for evaluation)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]


@dataclass
class Preference:
    prompt: list[Message]
    chosen: Message
    rejected: Message
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = field(default="preference", init=False)

    def validate(self) -> "Preference":
        _check_prompt(self.prompt)
        _check_messages([self.chosen, self.rejected], "chosen/rejected")
        return self


@dataclass
class Ranking:
    prompt: list[Message]
    responses: list[Message]  # best -> worst
    meta: dict[str, Any] = field(default_factory=dict)
    tiers: list[int] | None = None  # None: a strict order; else one tier per response, 0 = best
    kind: str = field(default="ranking", init=False)

    def validate(self) -> "Ranking":
        _check_prompt(self.prompt)
        _check_messages(self.responses, "responses")
        if len(self.responses) < 2:
            raise RecordError(f"a ranking needs at least 2 responses, got {len(self.responses)}")
        if self.tiers is not None:
            t = self.tiers
            if (not isinstance(t, list) or len(t) != len(self.responses)
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in t)):
                raise RecordError(f"tiers must be one non-negative integer per response "
                                  f"({len(self.responses)}), got {t!r}")
            if any(b < a for a, b in zip(t, t[1:])):
                raise RecordError(f"tiers {t} must not decrease: responses are ordered best -> worst")
        return self

    def tier(self, i: int) -> int:
        """Tier of response ``i`` (its position when the order is strict)."""
        return i if self.tiers is None else self.tiers[i]

    def ordered_pairs(self) -> list[tuple[int, int]]:
        """Every (better, worse) index pair the ranking states; tied responses make none."""
        k = len(self.responses)
        return [(i, j) for i in range(k) for j in range(i + 1, k) if self.tier(i) < self.tier(j)]

    def pairs(self) -> list[Preference]:
        """All (better, worse) pairs implied by the ranking: K(K-1)/2 without ties."""
        return [Preference(self.prompt, self.responses[i], self.responses[j], dict(self.meta, pair=[i, j]))
                for i, j in self.ordered_pairs()]


@dataclass
class Prompt:
    prompt: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = field(default="prompt", init=False)

    def validate(self) -> "Prompt":
        _check_prompt(self.prompt)
        return self


Record = Union[Conversation, Preference, Ranking, Prompt]
KINDS: dict[str, type] = {"conversation": Conversation, "preference": Preference, "ranking": Ranking, "prompt": Prompt}


def to_dict(rec: Record) -> dict[str, Any]:
    d: dict[str, Any] = {"kind": rec.kind}
    for k, v in rec.__dict__.items():
        if k != "kind" and not (k == "tiers" and v is None):  # a strict ranking's file stays as it was
            d[k] = v
    return d


def from_dict(d: dict[str, Any]) -> Record:
    """Inverse of :func:`to_dict`; raises :class:`RecordError` with the reason."""
    kind = d.get("kind")
    if kind not in KINDS:
        raise RecordError(f"unknown record kind {kind!r}")
    cls = KINDS[kind]
    fields = {k: v for k, v in d.items() if k != "kind"}
    try:
        rec = cls(**fields)
    except TypeError as e:
        raise RecordError(f"bad {kind} record: {e}") from None
    return rec.validate()


def write_jsonl(records: Iterable[Record | dict], path: str | Path) -> int:
    """Write records (or plain dicts) as JSON Lines; returns the count."""
    n = 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r if isinstance(r, dict) else to_dict(r), ensure_ascii=False) + "\n")
            n += 1
    return n


def iter_canonical(path: str | Path) -> Iterator[Record]:
    """Read a canonical JSONL file written by :func:`write_jsonl`."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield from_dict(json.loads(line))
                except (json.JSONDecodeError, RecordError) as e:
                    raise RecordError(f"{path}:{i}: {e}") from None


def prompt_of(rec: Record) -> list[Message]:
    """The prompt messages of any record kind (for rollouts and evaluation)."""
    if isinstance(rec, Conversation):
        return rec.prompt
    return rec.prompt

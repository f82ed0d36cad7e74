"""Is this output a correct answer to its instruction? A rubric prompt for any chat model,
and the parsing of its grade: the ``judge`` cleaning rule of ``chatforge data judge``.

The judge sees the instruction (the last user message; earlier turns as context) and the
response a model would learn from (a conversation's last assistant message, a preference's
chosen, a ranking's best), and answers ``Score: 1-5`` and ``Reason: ...`` on the rubric of
:data:`TEMPLATE`. A record passes with ``score >= min_score`` (3: "partly correct" stays,
"mostly wrong" goes). A reply without a readable score is *no verdict* -- the record is
kept and counted as unjudged, with the reason; it is never dropped for the judge's failure.

The verdict goes into ``meta["judge"]`` (score, reason, model, prompt version) of every
judged record, kept or rejected, so a later reader can see why it was kept or dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from chatforge.data.records import Conversation, Message, Preference, Ranking, Record

PROMPT_VERSION = "judge-v1"

SYSTEM = ("You are a strict, fair grader of answers written by an AI assistant. You check whether a response "
          "correctly and completely does what the user's instruction asks. Judge correctness and instruction "
          "following, not style or length; the instruction may be in any language, and a correct answer in the "
          "instruction's language is expected.")

TEMPLATE = """{context}[Instruction]
{instruction}

[Response to grade]
{response}

Does the response correctly and completely do what the instruction asks? Grade it on this scale:
5 = correct and complete
4 = correct, with small omissions or flaws
3 = partly correct, or correct with one real mistake
2 = mostly wrong, or does not do what was asked
1 = wrong, off-topic, unfinished, repetitive, or not an answer

Reply in exactly this format:
Score: <1-5>
Reason: <one sentence>"""


@dataclass
class Verdict:
    """The judge's grade of one record (``score`` None: no verdict, ``error`` says why)."""

    score: int | None
    reason: str
    passed: bool | None  # None: not judged (kept)
    model: str
    error: str | None = None
    raw: str = ""

    def to_meta(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model, "prompt_version": PROMPT_VERSION}
        if self.score is not None:
            d.update(score=self.score, reason=self.reason, passed=self.passed)
        else:
            d.update(error=self.error, reply=self.raw[:300])
        return d


def target(rec: Record) -> tuple[list[Message], Message] | None:
    """``(prompt messages, response)`` the judge grades, None for a record without a response."""
    if isinstance(rec, Conversation):
        idx = [i for i, m in enumerate(rec.messages) if m["role"] == "assistant"]
        if not idx:
            return None
        return rec.messages[:idx[-1]], rec.messages[idx[-1]]
    if isinstance(rec, Preference):
        return rec.prompt, rec.chosen
    if isinstance(rec, Ranking):
        return rec.prompt, rec.responses[0]
    return None


def _text(m: Message) -> str:
    content = m.get("content") or ""
    calls = m.get("tool_calls")
    if calls:
        content += ("\n" if content else "") + "\n".join(json.dumps(c.get("function"), ensure_ascii=False)
                                                        for c in calls)
    return content


def render_context(messages: list[Message]) -> str:
    """Earlier turns as ``Role: text`` lines (what the judge needs to know the instruction's setting)."""
    return "\n\n".join(f"{m['role'].capitalize()}: {_text(m)}" for m in messages)


def messages_for(prompt: list[Message], response: Message) -> list[Message]:
    """The judge request's messages: our system prompt, then the rubric with the record in it."""
    last_user = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=None)
    instruction = _text(prompt[last_user]) if last_user is not None else ""
    before = prompt[:last_user] if last_user is not None else prompt
    context = f"[Conversation so far]\n{render_context(before)}\n\n" if before else ""
    user = TEMPLATE.format(context=context, instruction=instruction, response=_text(response))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def request_body(model: str, prompt: list[Message], response: Message, max_tokens: int = 160) -> dict:
    return {"model": model, "messages": messages_for(prompt, response), "temperature": 0, "max_tokens": max_tokens}


_JSON = re.compile(r"\{[^{}]*\}", re.DOTALL)
_SCORE = re.compile(r"(?:score|grade|rating|skor|markah)\s*\**\s*[:=]?\s*\**\s*([1-5])(?:\s*(?:/|out\s+of)\s*5)?\b",
                    re.IGNORECASE)
_BARE = re.compile(r"^\s*\**\s*([1-5])\s*(?:/\s*5)?\s*\**\s*(?:[.:\-]|$)")
_REASON = re.compile(r"(?:reason|because|sebab|alasan)\s*\**\s*[:=]\s*\**\s*(.+)", re.IGNORECASE)


def parse_grade(text: str) -> tuple[int, str] | None:
    """``(score, reason)`` from the judge's reply, None when no score 1-5 can be read.

    Accepts the asked-for ``Score: N`` / ``Reason: ...`` (any case, markdown bold, ``N/5``),
    a JSON object with ``score`` and ``reason``, or a reply whose first line is the number.
    """
    for m in _JSON.finditer(text):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        s = obj.get("score") if isinstance(obj, dict) else None
        if isinstance(s, (int, float)) and not isinstance(s, bool) and s == int(s) and 1 <= s <= 5:
            return int(s), " ".join(str(obj.get("reason", "")).split())[:300]
    m = _SCORE.search(text) or _BARE.match(text)
    if m is None:
        return None
    r = _REASON.search(text)
    reason = r.group(1) if r else text[m.end():]
    return int(m.group(1)), " ".join(reason.split()).strip("*: ")[:300]


def verdict_from(text: str, model: str, min_score: int) -> Verdict:
    got = parse_grade(text)
    if got is None:
        return Verdict(None, "", None, model, error="no score 1-5 in the reply", raw=text)
    score, reason = got
    return Verdict(score, reason, score >= min_score, model, raw=text)

"""Anthropic hh-rlhf preference pairs (and their Korean translation) -> Preference.

``{"chosen": "\\n\\nHuman: … \\n\\nAssistant: …", "rejected": "…"}``: two whole dialogues.
The prompt is the dialogue up to the last ``\\n\\nAssistant:``; chosen/rejected are what
follows it in each string. Three cases:

1. The two prefixes are identical (2,307 of the 2,312 English test pairs): that is the prompt.
2. The prefixes differ in wording but have the same turn structure: the Korean
   translation (``ko_hh-rlhf``) translated ``chosen`` and ``rejected`` separately, so the
   same question reads differently in each. The prompt is taken from ``chosen`` and the
   record is marked ``meta["prompt_differs"] = True``.
3. The turn structures differ (English lines 1255, 1689, 1951, 1953, 2037: a response
   that itself contains ``\\n\\nAssistant:``, or one side having an extra turn). Then the
   split is made where the two dialogues *diverge*: at the last ``\\n\\nAssistant:`` inside
   their common prefix, and each response is the whole rest of its string
   (``meta["split"] = "divergence"``). This is how TRL's ``extract_prompt`` treats them.

The translation also renamed keys and roles: ``rejected`` appears as ``거부됨``, ``거부``,
``거절``, ``거부되었습니다``, ``거절당했어``, ``거절당했습니다`` (any key starting with 거부/거절
is accepted), and ``Assistant:`` as ``조수``, ``보조자``, ``보조``, ``비서``, ``조교``,
``지원자``, ``어시스턴트``, ``도우미``, ``조언자`` or the misspelling ``Anssistant``. Consecutive
turns of the same role are merged (separated by a blank line).

A ``{"prompt", "chosen", "rejected"}`` record of plain strings (DPO style) is read too:
``prompt`` is one user message (or an hh dialogue, if it has role markers).
"""

from __future__ import annotations

import os
import re
from typing import Any

from chatforge.data.formats.base import Bad, Format, not_this, with_id
from chatforge.data.records import Message, Preference, msg

_HUMAN = ["Human", "User", "인간", "사람", "사용자"]
_ASSISTANT = ["Assistant", "Anssistant", "A시스턴트", "어시스턴트", "보조자", "보조", "조수", "비서", "조교", "지원자",
              "도우미", "조언자"]
_ROLE = {name: "user" for name in _HUMAN} | {name: "assistant" for name in _ASSISTANT}
_MARK = re.compile(r"\n\n(" + "|".join(sorted(map(re.escape, _ROLE), key=len, reverse=True)) + r"):")
_REJECTED_KEYS = ("rejected", "거부됨", "거부", "거절", "거부되었습니다", "거절당했어", "거절당했습니다")


def rejected_key(d: dict) -> str | None:
    for k in _REJECTED_KEYS:
        if k in d:
            return k
    for k in d:
        if isinstance(k, str) and k.startswith(("거부", "거절")):
            return k
    return None


def detect(d: Any) -> float:
    if not isinstance(d, dict) or not isinstance(d.get("chosen"), str):
        return 0.0
    k = rejected_key(d)
    if k is None or not isinstance(d[k], str):
        return 0.0
    if _MARK.search(d["chosen"]):
        return 3.0
    return 2.8 if isinstance(d.get("prompt"), str) else 0.0


def parse_dialogue(text: str) -> list[Message]:
    """``\\n\\nHuman: …\\n\\nAssistant: …`` -> messages (same-role runs merged)."""
    out: list[Message] = []

    def add(role: str, content: str) -> None:
        content = content.strip()
        if out and out[-1]["role"] == role:
            out[-1]["content"] = f"{out[-1]['content']}\n\n{content}".strip()
        else:
            out.append(msg(role, content))

    marks = list(_MARK.finditer(text))
    lead = text[: marks[0].start()] if marks else text
    if lead.strip():
        add("user", lead)
    for m, nxt in zip(marks, marks[1:] + [None]):
        add(_ROLE[m.group(1)], text[m.end() : nxt.start() if nxt else len(text)])
    return out


def _last_assistant(text: str, end: int | None = None) -> re.Match | None:
    last = None
    for m in _MARK.finditer(text, 0, len(text) if end is None else end):
        if _ROLE[m.group(1)] == "assistant":
            last = m
    return last


def _roles(prefix: str) -> list[str]:
    return [m["role"] for m in parse_dialogue(prefix)]


def split_pair(chosen: str, rejected: str, meta: dict) -> tuple[list[Message], str, str]:
    """(prompt messages, chosen response, rejected response); see the module docstring."""
    ca, ra = _last_assistant(chosen), _last_assistant(rejected)
    if ca is None or ra is None:
        raise Bad(f"no '\\n\\nAssistant:' turn in {'chosen' if ca is None else 'rejected'}")
    prompt_text = chosen[: ca.start()]
    c_resp, r_resp = chosen[ca.end() :], rejected[ra.end() :]
    if prompt_text != rejected[: ra.start()]:
        if _roles(prompt_text) == _roles(rejected[: ra.start()]):
            meta["prompt_differs"] = True
        else:
            n = len(os.path.commonprefix([chosen, rejected]))
            k = _last_assistant(chosen, n)
            if k is None:
                raise Bad("chosen and rejected have different turns and already differ before the first Assistant turn")
            prompt_text, c_resp, r_resp = chosen[: k.start()], chosen[k.end() :], rejected[k.end() :]
            meta["split"] = "divergence"
    return parse_dialogue(prompt_text), c_resp.strip(), r_resp.strip()


def convert(obj: Any, meta: dict) -> Preference:
    if not isinstance(obj, dict) or "chosen" not in obj:
        raise not_this(obj, "chosen/rejected dialogues")
    rk = rejected_key(obj)
    if rk is None:
        raise Bad(f"no 'rejected' field ({'|'.join(map(str, obj))})")
    chosen, rejected = obj["chosen"], obj[rk]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise Bad("'chosen' and 'rejected' must be strings")
    if chosen == rejected:
        raise Bad("'chosen' and 'rejected' are identical")
    meta = with_id(meta, obj, "id")
    if isinstance(obj.get("prompt"), str) and not _MARK.search(chosen):
        p = obj["prompt"]
        prompt = parse_dialogue(p) if _MARK.search(p) else [msg("user", p.strip())]
        if prompt and prompt[-1]["role"] == "assistant" and not prompt[-1]["content"]:
            prompt.pop()  # an hh prompt ends with "\n\nAssistant:" (the cue, no content)
        c_resp, r_resp = chosen.strip(), rejected.strip()
    else:
        prompt, c_resp, r_resp = split_pair(chosen, rejected, meta)
    if not prompt or prompt[-1]["role"] != "user":
        raise Bad("the dialogue before the compared Assistant turn does not end with a Human turn")
    return Preference(prompt, msg("assistant", c_resp), msg("assistant", r_resp), meta)


FORMATS = [
    Format("hh-rlhf", "preference", detect, convert,
           "chosen/rejected dialogue strings (\\n\\nHuman:/\\n\\nAssistant:), incl. the Korean key/role variants"),
]

"""Chat transcripts stored as text: HugChat/HugNLP, KoChatGPT blocks, nanoChatGPT tags, lines.

* ``hugchat`` (JSON) -- ``{"text": "Human: … \\n HugChat: … \\n\\n"}`` and HugNLP's
  ``{"text": "Input: Instruction: … \\n Output: … \\n\\n"}``. A role label
  (Human/User/Input -> user, HugChat/Assistant/Bot/Output -> assistant) at the start of a
  line starts a turn only when the speaker *changes*; a repeated label (an ``Input:``
  field inside an instruction) stays part of the text. Content is kept verbatim
  (HugNLP's ``Instruction:`` prefix included), stripped of surrounding whitespace.
* ``conversation-blocks`` (text) -- KoChatGPT / MYChatGPT SFT conversations: a line
  ``<<start conversation>>`` opens a conversation; each turn is a line ``<사람>: …`` /
  ``<챗봇>: …`` (Malay ``<Orang>:`` / ``<Chatbot>:``; the MYChatGPT file also has
  ``Orang:``, ``<orang>:``, ``<Chabot>:``, ``<AI>:`` and untranslated Korean, all
  accepted). A line without a speaker prefix continues the previous turn. A block
  without both a user and an assistant turn is reported.
* ``nanochatgpt`` (text) -- ``<human>…<endOfText>`` / ``<bot>…<endOfText>`` lines (tags in
  either case). There are no conversation separators, so a conversation is one
  exchange: it starts at a human line and ends when a human line follows a bot line
  (so consecutive human lines form one multi-message prompt). A bot line with no human
  line before it (``input59.txt`` starts with one) is reported, as is a line without a
  tag unless the previous turn lacked ``<endOfText>`` (then it continues that turn). A
  blank line ends the current conversation.
* ``lines`` (text) -- one prompt per line (KoChatGPT ``seed_data.txt``) -> Prompt; blank
  lines are skipped. Detected only for short lines that do not look like markup.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

from chatforge.data.formats.base import Bad, Format, not_this, with_id
from chatforge.data.io import ReadError
from chatforge.data.records import Conversation, Prompt, msg

# -- HugChat / HugNLP (JSON) -------------------------------------------------------------

_HUG_ROLE = {"human": "user", "user": "user", "input": "user",
             "hugchat": "assistant", "assistant": "assistant", "bot": "assistant", "output": "assistant"}
_HUG_LABEL = re.compile(r"(?:^|\n)[ \t]*(Human|User|Input|HugChat|Assistant|Bot|Output)[ \t]*:", re.IGNORECASE)


def detect_hugchat(d: Any) -> float:
    if isinstance(d, dict) and isinstance(d.get("text"), str):
        m = _HUG_LABEL.match(d["text"].lstrip())
        if m and _HUG_ROLE[m.group(1).lower()] == "user" and len(_HUG_LABEL.findall(d["text"])) >= 2:
            return 3.0 if len(d) == 1 else 2.0
    return 0.0


def split_labelled(text: str) -> list[dict]:
    turns: list[dict] = []
    start, role = None, None
    for m in _HUG_LABEL.finditer(text):
        r = _HUG_ROLE[m.group(1).lower()]
        if r == role:
            continue  # same speaker again: part of the text
        if role is not None:
            turns.append(msg(role, text[start : m.start()].strip()))
        role, start = r, m.end()
    if role is not None:
        turns.append(msg(role, text[start:].strip()))
    return turns


def convert_hugchat(obj: Any, meta: dict) -> Conversation:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise not_this(obj, '{"text": "Human: … HugChat: …"}')
    messages = split_labelled(obj["text"])
    if not any(m["role"] == "user" for m in messages) or not any(m["role"] == "assistant" for m in messages):
        raise Bad("text has no Human:/Input: turn followed by a HugChat:/Output: turn")
    return Conversation(messages, with_id(meta, obj, "id"))


# -- KoChatGPT / MYChatGPT conversation blocks (text) -----------------------------------

_START = "<<start conversation>>"
_SPEAKER = {"사람": "user", "orang": "user", "human": "user", "user": "user", "사용자": "user",
            "챗봇": "assistant", "chatbot": "assistant", "chabot": "assistant", "ai": "assistant",
            "bot": "assistant", "assistant": "assistant"}
_TURN = re.compile(r"^\s*<?\s*(" + "|".join(_SPEAKER) + r")\s*>?\s*:[ \t]?", re.IGNORECASE)


def detect_blocks(lines: list[str]) -> float:
    if any(l.strip() == _START for l in lines):
        return 3.0
    body = [l for l in lines if l.strip()]
    hits = sum(1 for l in body if l.lstrip().startswith("<") and _TURN.match(l))
    return 2.0 if body and hits / len(body) > 0.5 else 0.0


def parse_blocks(lines: Iterator, source: str) -> Iterator:
    block: list[dict] = []
    first = 0

    def finish():
        if not block:
            return ReadError(source, first, "empty conversation (no turns before the next <<start conversation>>)") \
                if first else None
        roles = {m["role"] for m in block}
        if roles != {"user", "assistant"}:
            who = "assistant" if "user" in roles else "user"
            return ReadError(source, first, f"conversation has no {who} turn")
        return Conversation(list(block), {"source": source, "line": first})

    for n, line in lines:
        if isinstance(line, ReadError):
            yield line
            continue
        if line.strip() == _START:
            rec = finish()
            if rec is not None:
                yield rec
            block, first = [], n
            continue
        if not line.strip():
            continue
        m = _TURN.match(line)
        if m:
            if not block and not first:
                first = n
            block.append(msg(_SPEAKER[m.group(1).lower()], line[m.end() :].strip()))
        elif block:
            block[-1]["content"] = f"{block[-1]['content']}\n{line.strip()}".strip()
        else:
            yield ReadError(source, n, f"text outside any turn (no <사람>:/<챗봇>: prefix): {line.strip()[:60]!r}")
    rec = finish()
    if rec is not None:
        yield rec


# -- nanoChatGPT tags (text) -------------------------------------------------------------

_TAG = re.compile(r"^\s*<(human|bot)>", re.IGNORECASE)
_EOT = re.compile(r"<endoftext>\s*$", re.IGNORECASE)


def detect_nanochat(lines: list[str]) -> float:
    body = [l for l in lines if l.strip()]
    hits = sum(1 for l in body if _TAG.match(l))
    return 3.0 if body and hits / len(body) > 0.5 else 0.0


def parse_nanochat(lines: Iterator, source: str) -> Iterator:
    conv: list[dict] = []
    first = 0
    closed = True  # did the last turn end with <endOfText>?

    def finish():
        rec = Conversation(list(conv), {"source": source, "line": first}) if conv else None
        conv.clear()
        return rec

    for n, line in lines:
        if isinstance(line, ReadError):
            yield line
            continue
        if not line.strip():
            if conv and conv[-1]["role"] == "user":
                yield ReadError(source, first, "conversation ends (blank line) before any bot turn")
                conv.clear()
            elif conv:
                yield finish()
            closed = True
            continue
        m = _TAG.match(line)
        if not m:
            if not closed and conv:
                text, closed = _EOT.subn("", line)
                conv[-1]["content"] = f"{conv[-1]['content']}\n{text.strip()}".strip()
                continue
            yield ReadError(source, n, f"line without a <human>/<bot> tag: {line.strip()[:60]!r}")
            continue
        text, eot = _EOT.subn("", line[m.end() :])
        closed = bool(eot)
        role = "user" if m.group(1).lower() == "human" else "assistant"
        if role == "user" and conv and conv[-1]["role"] == "assistant":
            yield finish()
        if role == "assistant" and not conv:
            yield ReadError(source, n, "bot turn with no human turn before it (not read)")
            closed = True  # untagged lines after it are reported, not glued to another turn
            continue
        if not conv:
            first = n
        conv.append(msg(role, text.strip()))
    if conv and conv[-1]["role"] == "assistant":
        yield finish()
    elif conv:
        yield ReadError(source, first, "file ends before the bot answers this human turn")


# -- one prompt per line (text) ----------------------------------------------------------

_MARKUP = tuple("#-*`<{[|>=!")


def detect_lines(lines: list[str]) -> float:
    body = [l.strip() for l in lines if l.strip()]
    if not body or max(map(len, body)) > 2000:
        return 0.0
    plain = sum(1 for l in body if not l.startswith(_MARKUP))
    avg = sum(map(len, body)) / len(body)
    return 0.5 if plain / len(body) >= 0.9 and avg < 300 else 0.0


def parse_lines(lines: Iterator, source: str) -> Iterator:
    for n, line in lines:
        if isinstance(line, ReadError):
            yield line
        elif line.strip():
            yield Prompt([msg("user", line.strip())], {"source": source, "line": n})


FORMATS = [
    Format("hugchat", "conversation", detect_hugchat, convert_hugchat,
           'HugChat/HugNLP {"text": "Human: … HugChat: …"} or "Input: … Output: …"'),
    Format("conversation-blocks", "conversation", detect_blocks, parse_blocks,
           "KoChatGPT/MYChatGPT text: <<start conversation>> blocks of <사람>:/<챗봇>: lines", text=True),
    Format("nanochatgpt", "conversation", detect_nanochat, parse_nanochat,
           "nanoChatGPT text: <human>…<endOfText> / <bot>…<endOfText> lines, one exchange per conversation",
           text=True),
    Format("lines", "prompt", detect_lines, parse_lines, "plain text, one prompt per line", text=True),
]

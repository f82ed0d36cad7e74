"""Cleaning rules for instruction / chat data (``chatforge data clean``).

The rules are the problems AlpacaDataCleaned lists for the original Alpaca data, made
mechanical. Each has a name, can be switched off (``disable=``, ``--no-RULE``), and is
counted. Two *fix* rules repair text in place and never reject; the *filter* rules reject
a record and tag it with the first rule that fired (checked in the order below, cheap
ones first). Nothing is lost: every input record is either kept or rejected-with-rule.

Fix rules
  ``control_chars``  strip C0/C1 control characters (``\\n`` and ``\\t`` kept), ANSI escape
                     sequences, zero-width spaces and stray BOMs; ``\\r\\n``/``\\r`` -> ``\\n``;
                     runs of 4+ combining marks ("zalgo" garbage, found in Alpaca outputs);
                     in prose (text without code punctuation ``(){};=<>```), double-escaped
                     quotes ``\\"`` -> ``"`` (Luotuo's data has them). Backslash escapes in
                     code are left alone.
  ``noinput``        remove leftover "no input" markers from user messages: ``<noinput>`` /
                     ``<no input>`` anywhere, and a final paragraph that is only a marker
                     (``Input: N/A``, ``No input``, ``none``, ``nan`` ...).

Filter rules (scope: "responses" = assistant messages / chosen+rejected / all ranked)
  ``empty_prompt``   a user message is empty.
  ``empty_output``   a response is empty.
  ``na_output``      the response to learn from (assistant messages; chosen; the best
                     ranked) is an N/A-style non-answer: ``N/A``, ``<nooutput>``, ``no
                     output``, ``not applicable``, ``null``, ``nan``, only punctuation ...
                     (``None`` is kept: it is a real answer to "which of these ...?").
  ``length``         total characters of all messages outside ``[min_chars, max_chars]``.
  ``unfulfillable``  a user message asks for something a text model cannot do: make an
                     image/photo/logo/video/audio, sing or play music, look at an attached
                     picture/recording, open/summarise a URL, browse the web. Requests
                     (imperatives: at a sentence start, or after "please", "can you" ...)
                     count in the first paragraph only -- the instruction, not its input;
                     references to a missing picture or a URL count anywhere.
                     English keyword regexes (plus a few Chinese ones); approximate
                     by nature: "write a video script", "make a list of movies", "how to
                     design a logo" are *not* matched.
  ``repetition``     the response to learn from loops: more than ``max_repeat`` (0.9) of
                     its word 4-grams are repeats (character 8-grams for text without
                     spaces, e.g. Chinese) -- the text is ~10 copies of its distinct content.
                     Judged only on responses of >= 16 words / 64 chars. On the shared data
                     this catches "Eat a banana!" x 2000 and "3 orang" x 12; legitimate
                     repetitive answers (empty markdown tables, IP regexes, schedules, a
                     one-hot vector at 0.85) stay below it.
  ``identical_pair`` a preference whose chosen and rejected are the same text, or a
                     ranking with two equal responses (nothing to learn).
  ``duplicate``      the same record content (roles + texts; meta ignored) seen before.
  ``near_duplicate`` the same after lower-casing, dropping punctuation and collapsing
                     whitespace.

Tool calls: the filter rules read an assistant message that calls tools as its text plus
the calls' JSON (a call is not an empty output, two records that call different tools are
not duplicates); tool results count as prompt text (length, duplicates), not as user
messages. The fix rules touch text content only, never a call's arguments.

Judged rule (only with a judge: ``chatforge data judge``, :mod:`chatforge.data.judge`)
  ``judge``          a judge model graded the response to learn from below ``min_score``.
                     Checked last, on records every other rule kept; the verdict (score,
                     reason) goes into ``meta["judge"]`` kept or rejected; a record without a
                     verdict (the request failed, the reply had no score) is kept and counted
                     as ``unjudged`` with its reason.

Works on every record kind: prompt-only records have no responses, so only the prompt
rules, length and duplicates apply. Dedup keeps 64-bit hashes only (about 100 bytes a
record), so a million records stay well under 200 MB.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from chatforge.data.records import Conversation, Message, Preference, Ranking, Record

FIX_RULES = ("control_chars", "noinput")
FILTER_RULES = ("empty_prompt", "empty_output", "na_output", "length", "unfulfillable", "repetition",
                "identical_pair", "duplicate", "near_duplicate")
RULES = FIX_RULES + FILTER_RULES

# -- text patterns (compiled once) -------------------------------------------------------

_CTRL = re.compile("[\x00-\x08\x0b\x0c\x0d\x0e-\x1f\x7f-\x9f\u200b\u2028\u2029\ufeff\ufffe]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_ZALGO = re.compile("[\u0300-\u036f\u0489]{4,}")
_CODEISH = re.compile(r"[(){};=<>`]")
_NOINPUT_TAG = re.compile(r"[ \t]*<\s*no[\s_-]*input\s*>[ \t]*", re.IGNORECASE)
_NOINPUT_TAIL = re.compile(
    r"\n\s*(?:input\s*:\s*)?(?:no[\s_-]*input(?:\s+(?:required|needed|provided))?|n/a|none|nan|null)\s*\.?\s*$",
    re.IGNORECASE,
)
_NOT_ALNUM = re.compile(r"[\W_]+")
_NA_KEYS = frozenset({"", "na", "nan", "null", "nil", "nooutput", "notapplicable", "noanswer", "noresponse",
                      "outputna", "answerna", "tiadaoutput", "无", "없음"})

# A request is an imperative: at the start of the message / a sentence / a list item, or
# after "please", "can you", "I want you to" ... ("how to draw a logo" or "took six hours
# to paint 12 paintings" are not requests).
_START = (r"(?:^|[.!?:;\n\-*]\s*|\b(?:please|pls|kindly|can\s+you|could\s+you|would\s+you|will\s+you|"
          r"you\s+need\s+to|you\s+should|i\s+want\s+you\s+to|i\s+need\s+you\s+to|help\s+me|let's|go\s+ahead\s+and|"
          r"now)\s+)")
_FILL = r"(?:(?!(?:of|for|about|on|in|with|from|to|by|that|which|and|his|her|their|its)\b)[\w'-]+\s+){0,3}?"
_NOT_TEXT = (r"(?!\s*\()(?!\s*(?:script|title|description|caption|idea|concept|outline|summary|plan|prompt|"
             r"storyboard|transcript|review|tagline|slogan|name|proposal|pitch|brief|synopsis|tutorial|lesson|list|"
             r"recommendation|ranking|critique|analysis|essay|story|poem|lyrics|post|blurb)s?\b)")
_MEDIA = (r"(?:image|picture|pic|photo(?:graph)?|drawing|painting|illustration|logo|meme|icon|poster|"
          r"infographic|gif|animation|video|clip|movie|film|cartoon|comic|wallpaper|collage|artwork|"
          r"audio|audio\s+clip|sound\s+effect|mp3|wav|voice\s+(?:message|note|recording)|ringtone|soundtrack)")
# Requests (imperatives) are looked for in the first paragraph only: in alpaca-shaped data
# that is the instruction, and the input after it may legitimately say "Sing a song of
# sorrow" (lyrics to complete) or "Create an infographic" (a task to delegate).
_REQUEST = re.compile(
    "|".join([
        # make a picture / video / sound
        rf"{_START}(?:draw|paint|sketch|illustrate|create|generate|make|produce|design|render|take|shoot|film|record|edit|"
        rf"upload|send\s+me|show\s+me|attach)\s+{_FILL}{_MEDIA}s?\b{_NOT_TEXT}",
        # perform sound
        rf"{_START}(?:play|sing|hum|perform|record)\s+{_FILL}(?:song|music|tune|melody|audio|sound|recording|podcast|"
        rf"piano|guitar|violin|drums|instrument)s?\b{_NOT_TEXT}",
        # browse the web
        rf"{_START}(?:search|browse)\s+(?:on\s+|in\s+)?(?:the\s+)?(?:web|internet|online)\b",
        # Chinese: (please) draw/generate a picture/video/audio; open a link
        r"(?:^|[。！？\n]\s*|请)(?:画一|画出|画个|画张|绘制|生成|制作|创建|拍摄|拍)(?:一|几|这)?(?:张|幅|个|段|部|些)?"
        r"[^，。！？\n]{0,6}?(?:图片|图像|照片|画作|海报|标志|视频|音频|动画)(?!的?(?:描述|标题|脚本|文案|说明|名字))",
        r"(?:^|[。！？\n]\s*|请)(?:访问|打开|浏览)(?:这个|以下|下面的)?(?:网站|链接|网址|网页)",
    ]),
    re.IGNORECASE,
)
# References to media that is not there, or to a URL to open, anywhere in the message.
_REFERENCE = re.compile(
    "|".join([
        # look at / listen to media that is not there
        r"\b(?:listen\s+to|watch|view|look\s+at|describe|analy[sz]e|caption|identify|examine|interpret)\s+"
        r"(?:the\s+following|this|these|the\s+attached|the\s+given|the\s+provided|the\s+above|the\s+below|"
        r"the\s+uploaded|my)\s+(?:[\w-]+\s+)?(?:image|picture|photo(?:graph)?|video|audio|clip|recording|song|"
        r"painting|drawing|screenshot|x-?ray|scan)s?\b",
        # open / read a URL
        r"\b(?:visit|browse|go\s+to|open|access|navigate\s+to|click|check\s+out|read|summari[sz]e|watch|"
        r"listen\s+to|look\s+at|describe|review|analy[sz]e|scrape|download|fetch|explore)\s+(?:\S+\s+){0,6}?"
        r"(?:https?://|www\.)",
    ]),
    re.IGNORECASE,
)


def _asks_the_impossible(s: str) -> bool:
    return _REQUEST.search(s.split("\n\n", 1)[0]) is not None or _REFERENCE.search(s) is not None

@functools.lru_cache(maxsize=1)
def _punct_table() -> dict[int, str]:
    """Translation table mapping every Unicode punctuation/symbol in the BMP to a space
    (built on first use: ~20 ms, kept out of ``chatforge --help``)."""
    return {i: " " for i in range(0x10000) if unicodedata.category(chr(i))[0] in "PS"}

# Cheap gate in front of the regexes (a regex of that size costs ~50 us a message):
# every English branch needs one of these words (or a URL / "web" word) to be present.
_TRIGGER_WORDS = frozenset(
    w + s for w in (
        "image picture pic photo photograph drawing painting illustration logo sketch meme icon poster "
        "infographic gif animation video clip movie film cartoon comic wallpaper collage artwork audio sound "
        "mp3 wav voice ringtone soundtrack song music tune melody recording podcast piano guitar violin drums "
        "instrument screenshot ray xray scan web internet online google bing"
    ).split() for s in ("", "s")
)
_TRIGGER_BYTES = frozenset(w.encode() for w in _TRIGGER_WORDS)
_ZH_TRIGGERS = ("图", "照片", "画", "视频", "音频", "动画", "海报", "标志", "网站", "链接", "网址", "网页")


def unfulfillable(s: str, words: list | None = None) -> bool:
    """True if a user message asks for something a text-only model cannot do.

    ``words`` (the message's :func:`words`, if already computed) feeds the cheap gate.
    """
    low = s.lower()
    if "http" in low or "www." in low:
        return _asks_the_impossible(s)
    if not s.isascii() and any(t in s for t in _ZH_TRIGGERS):
        return _asks_the_impossible(s)
    w = words_of(s) if words is None else words
    if (_TRIGGER_BYTES if s.isascii() else _TRIGGER_WORDS).isdisjoint(w):
        return False
    return _asks_the_impossible(s)


_CTRL_BYTES = bytes([*range(0x09), 0x0B, 0x0C, 0x0D, *range(0x0E, 0x20), 0x7F])
_ASCII_PUNCT = b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_ASCII_NORM = bytes.maketrans(_ASCII_PUNCT + b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b" " * len(_ASCII_PUNCT) + b"abcdefghijklmnopqrstuvwxyz")


def _has_controls(s: str) -> bool:
    if s.isascii():  # fast path (O(1) check): a byte table instead of a regex
        b = s.encode("ascii")
        return len(b.translate(None, _CTRL_BYTES)) != len(b)
    return _CTRL.search(s) is not None


def fix_controls(s: str) -> str:
    if _has_controls(s):
        s = _ANSI.sub("", s).replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
        s = _CTRL.sub("", s)
    if not s.isascii() and _ZALGO.search(s):
        s = _ZALGO.sub("", s)
    if '\\"' in s and not _CODEISH.search(s):
        s = s.replace('\\"', '"')
    return s


def fix_noinput(s: str) -> str:
    out = s
    if "nput" in s.lower():
        out = _NOINPUT_TAG.sub(" ", out).strip() if _NOINPUT_TAG.search(out) else out
    if "\n" in out:
        out = _NOINPUT_TAIL.sub("", out)
    return out if out.strip() else s


def is_na(s: str) -> bool:
    """An N/A-style non-answer (an empty string is the empty_output rule's business)."""
    return 0 < len(s) < 32 and _NOT_ALNUM.sub("", s.lower()) in _NA_KEYS


def words_of(s: str) -> list:
    """Lower-cased words with punctuation removed: the unit of the gate, repetition and
    near-duplicate rules, computed once per message. Bytes for ASCII text (a byte table
    is ~5x faster than a Unicode one), str otherwise."""
    if s.isascii():
        return s.encode("ascii").translate(_ASCII_NORM).split()
    return s.lower().translate(_punct_table()).split()


def repeat_ratio(s: str, n_words: int = 4, n_chars: int = 8, at_least: float = 0.0,
                 words: list | None = None) -> float | None:
    """Share of repeated n-grams (0 = none repeat); None if the text is too short to judge.

    Word n-grams over :func:`words_of`; character n-grams for text without spaces
    (Chinese). With ``at_least`` > 0 the exact figure is only computed when it could
    exceed that value: a new word always starts new n-grams, so ``distinct words - n + 1``
    bounds the distinct n-grams from below -- natural text fails the bound in one ``set()``.
    """
    toks = words_of(s) if words is None else words
    n = len(toks)
    if n >= 16 and len(s) / n < 20:
        units, k = toks, n_words
    else:
        units = "".join(t.decode() if isinstance(t, bytes) else t for t in toks)
        if len(units) < 64:
            return None
        k = n_chars
    total = len(units) - k + 1
    if at_least > 0 and len(set(units)) - k + 1 > (1.0 - at_least) * total:
        return 0.0  # cannot exceed at_least (an under-estimate, good enough to keep the record)
    grams = set(zip(*(units[i:] for i in range(k))))
    return 1.0 - len(grams) / total


def normalise(s: str, words: list | None = None) -> str | bytes:
    """Lower-case, punctuation -> space, whitespace collapsed (a dedup key, not for display)."""
    w = words_of(s) if words is None else words
    return (b" " if s.isascii() else " ").join(w)


# -- views of a record -------------------------------------------------------------------


def all_messages(rec: Record) -> list[Message]:
    if isinstance(rec, Conversation):
        return rec.messages
    if isinstance(rec, Preference):
        return [*rec.prompt, rec.chosen, rec.rejected]
    if isinstance(rec, Ranking):
        return [*rec.prompt, *rec.responses]
    return list(rec.prompt)


def message_text(m: Message) -> str:
    """What the rules read: the content, plus the JSON of any tool calls."""
    calls = m.get("tool_calls")
    if not calls:
        return m["content"]
    text = "\n".join(json.dumps(c["function"], ensure_ascii=False, sort_keys=True) for c in calls)
    return f"{m['content']}\n{text}" if m["content"] else text


def _text_views(msgs: list[Message]) -> dict[int, Message]:
    """Plain {role, content} stand-ins for messages with tool calls (for the filter rules)."""
    return {id(m): {"role": m["role"], "content": message_text(m)} for m in msgs}


def user_messages(rec: Record) -> list[Message]:
    msgs = rec.messages if isinstance(rec, Conversation) else rec.prompt
    return [m for m in msgs if m["role"] == "user"]


def responses(rec: Record) -> list[Message]:
    if isinstance(rec, Conversation):
        return [m for m in rec.messages if m["role"] == "assistant"]
    if isinstance(rec, Preference):
        return [rec.chosen, rec.rejected]
    if isinstance(rec, Ranking):
        return rec.responses
    return []


def learned_responses(rec: Record) -> list[Message]:
    """The responses a model is trained to *produce* (a bad rejected answer is a fine negative)."""
    if isinstance(rec, Conversation):
        return [m for m in rec.messages if m["role"] == "assistant"]
    if isinstance(rec, Preference):
        return [rec.chosen]
    if isinstance(rec, Ranking):
        return rec.responses[:1]
    return []


# -- the cleaner -------------------------------------------------------------------------


@dataclass
class Cleaner:
    """Streaming cleaner: ``rule = cleaner.check(record)`` (None = keep), with counts.

    ``check`` applies the fix rules to the record *in place*, then returns the first
    filter rule that rejects it. Duplicate detection is stateful (hashes of the records
    kept so far), so feed records in the order you want the first copy kept.
    """

    disable: Iterable[str] = ()
    min_chars: int = 2
    max_chars: int = 16000
    max_repeat: float = 0.9
    judge: Callable[[Record], Any] | None = None  # record -> data.judge.Verdict | None (the judge rule)
    n_in: int = field(default=0, init=False)
    rejected: Counter = field(default_factory=Counter, init=False)  # rule -> records rejected
    fixed: Counter = field(default_factory=Counter, init=False)  # rule -> records changed

    def __post_init__(self) -> None:
        self.disable = frozenset(self.disable)
        unknown = self.disable - set(RULES)
        if unknown:
            from chatforge.errors import ConfigError

            raise ConfigError(f"unknown cleaning rule(s) {', '.join(sorted(unknown))}; rules: {', '.join(RULES)}")
        self.on = {r: r not in self.disable for r in RULES}
        self.scores: Counter = Counter()  # judge rule: score -> records
        self.unjudged: Counter = Counter()  # judge rule: reason -> records kept without a verdict
        self._seen: set[int] = set()
        self._seen_norm: set[int] = set()

    def check(self, rec: Record) -> str | None:
        self.n_in += 1
        rule = self._check(rec)
        if rule is None and self.judge is not None:
            rule = self._judged(rec)
        if rule is not None:
            self.rejected[rule] += 1
        return rule

    def _check(self, rec: Record) -> str | None:
        on = self.on
        msgs = all_messages(rec)
        if on["control_chars"]:
            changed = False
            for m in msgs:
                c = m["content"]
                if c is None:  # an assistant message that only calls tools
                    continue
                f = fix_controls(c)
                if f is not c and f != c:
                    m["content"] = f
                    changed = True
            if changed:
                self.fixed["control_chars"] += 1
        users = user_messages(rec)
        if on["noinput"]:
            changed = False
            for m in users:
                f = fix_noinput(m["content"])
                if f != m["content"]:
                    m["content"] = f
                    changed = True
            if changed:
                self.fixed["noinput"] += 1
        if on["empty_prompt"] and any(not m["content"].strip() for m in users):
            return "empty_prompt"
        resp = responses(rec)
        learned = learned_responses(rec)
        if any(len(m) > 2 for m in msgs):  # tool calls: the rules below read text views
            views = _text_views(msgs)
            msgs, resp, learned = ([views[id(m)] for m in ms] for ms in (msgs, resp, learned))
            users = [m for m in msgs if m["role"] == "user"]
        if on["empty_output"] and any(not m["content"].strip() for m in resp):
            return "empty_output"
        if on["na_output"] and any(is_na(m["content"].strip()) for m in learned):
            return "na_output"
        if on["length"]:
            n = sum(len(m["content"]) for m in msgs)
            if n < self.min_chars or n > self.max_chars:
                return "length"
        words = {id(m): words_of(m["content"]) for m in msgs}  # shared by the rules below
        if on["unfulfillable"] and any(unfulfillable(m["content"], words[id(m)]) for m in users):
            return "unfulfillable"
        if on["repetition"]:
            for m in learned:
                r = repeat_ratio(m["content"], at_least=self.max_repeat, words=words[id(m)])
                if r is not None and r > self.max_repeat:
                    return "repetition"
        if on["identical_pair"] and len(resp) >= 2 and not isinstance(rec, Conversation):
            texts = [m["content"].strip() for m in resp]
            if len(set(texts)) < len(texts):
                return "identical_pair"
        if on["duplicate"] or on["near_duplicate"]:
            if on["duplicate"]:
                h = hash((rec.kind, tuple((m["role"], m["content"]) for m in msgs)))
                if h in self._seen:
                    return "duplicate"
            if on["near_duplicate"]:
                hn = hash((rec.kind, tuple((m["role"], normalise(m["content"], words[id(m)])) for m in msgs)))
                if hn in self._seen_norm:
                    return "near_duplicate"
                self._seen_norm.add(hn)
            if on["duplicate"]:
                self._seen.add(h)
        return None

    def _judged(self, rec: Record) -> str | None:
        """The judge rule: the verdict into ``meta["judge"]``; "judge" when it failed the record."""
        v = self.judge(rec)
        if v is None or v.passed is None:
            reason = "no response to judge" if v is None else v.error or "no verdict"
            self.unjudged[reason] += 1
            if v is not None:
                rec.meta = dict(rec.meta, judge=v.to_meta())
            return None
        rec.meta = dict(rec.meta, judge=v.to_meta())
        self.scores[v.score] += 1
        return None if v.passed else "judge"

    def report(self) -> dict[str, Any]:
        n_rej = sum(self.rejected.values())
        judged = {} if self.judge is None else {"judge": {
            "enabled": True, "rejected": self.rejected["judge"], "judged": sum(self.scores.values()),
            "scores": {str(k): self.scores[k] for k in sorted(self.scores)},
            "unjudged": sum(self.unjudged.values()), "unjudged_reasons": dict(self.unjudged)}}
        return {
            "records_in": self.n_in,
            "kept": self.n_in - n_rej,
            "rejected": n_rej,
            "rules": {
                r: {"enabled": self.on[r], **({"fixed": self.fixed[r]} if r in FIX_RULES else {"rejected": self.rejected[r]})}
                for r in RULES
            } | judged,
            "settings": {"min_chars": self.min_chars, "max_chars": self.max_chars, "max_repeat": self.max_repeat},
        }


@dataclass
class CleanResult:
    kept: list[Record]
    rejected: list[tuple[Record, str]]
    report: dict[str, Any]


def clean(records: Iterable[Record], **options: Any) -> CleanResult:
    """Clean a collection in memory (see :class:`Cleaner` to stream)."""
    c = Cleaner(**options)
    kept, rejected = [], []
    for r in records:
        rule = c.check(r)
        if rule is None:
            kept.append(r)
        else:
            rejected.append((r, rule))
    return CleanResult(kept, rejected, c.report())


def tag_rejected(rec: Record, rule: str) -> Record:
    """The record with ``meta["rejected_by"] = rule`` (still a canonical record)."""
    rec.meta = dict(rec.meta, rejected_by=rule)
    return rec


__all__ = ["Cleaner", "CleanResult", "clean", "tag_rejected", "RULES", "FIX_RULES", "FILTER_RULES",
           "repeat_ratio", "is_na", "unfulfillable", "fix_controls", "fix_noinput", "normalise", "words_of"]

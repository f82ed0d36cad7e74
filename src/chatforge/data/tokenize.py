"""Tokenisation for training: messages -> input ids + assistant-only labels, truncation, packing.

The contract (DEVELOPERS.md): render with the chat template, then label only what the
assistant writes -- its content and the end-of-turn token after it, so the model learns
to stop. Everything else is ``-100``. The mask comes from *where the assistant text is in
the rendered string* (character spans from :mod:`chatforge.data.templates`, mapped to
tokens with the fast tokenizer's char->token table), never from token ids: on SmolLM2
pad == eos == ``<|im_end|>``, and a mask built from pad ids would silently drop the very
token that teaches the model to stop.

Why it is fast (the data bench wants >= 20k short records/s on 2 cores; Jinja alone costs
~50 us a record): for each role sequence (user, assistant), (system, user, assistant), ...
the template pieces are compiled once into a plan -- constant token ids for the special
tokens and the template text between them (SmolLM2's default system prompt is 20 tokens
of every record), and a few texts per record that hold message contents. Cutting at
special tokens is exactly what the tokenizer itself does first, so the ids equal
``apply_chat_template``'s. Those texts are tokenised by a pre-token cache when the
tokenizer is a byte-level BPE and the text plain ASCII (:class:`_PretokenBPE`, ~3x the
Rust tokenizer), else by the Rust tokenizer in one batch. Every shortcut is checked
against plain tokenisation at start-up and falls back to the general path (render,
cut, map character spans) where it does not hold; the tests compare both paths and
``apply_chat_template`` on random conversations.

Public API:

* :func:`encode_messages`, :func:`encode_prompt`, :func:`encode_prompt_response`
* :func:`truncate` (policies ``turns`` and ``drop``), :class:`TokenizeStats`
* :func:`iter_examples`, :func:`pack_examples`, :func:`build_sft_examples`, :func:`collate`
* :func:`tokenize_to_dataset` -- the large-corpus path (Arrow on disk, memory-mapped, cached)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import weakref
from bisect import bisect_left, bisect_right, insort
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Iterator

from chatforge.data.records import Conversation
from chatforge.data.templates import ChatFormat, Rendered, chat_format, get_template
from chatforge.errors import ConfigError, DataError

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "last_assistant", "all")
TRUNCATION = ("turns", "drop")
MAX_ERRORS_KEPT = 20


@dataclass
class Encoded:
    """One tokenised conversation.

    ``turn_ends[i]`` is the token index just past the i-th labelled assistant turn (its
    end-of-turn token included): the only places :func:`truncate` may cut.
    """

    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int] = field(default_factory=list)
    n_labels: int = -1  # tokens with a label (-1: not counted yet)

    def label_count(self) -> int:
        if self.n_labels < 0:
            self.n_labels = len(self.labels) - self.labels.count(IGNORE_INDEX)
        return self.n_labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def to_dict(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}


# -- the encoder ------------------------------------------------------------------------------

class Encoder:
    """Encodes conversations for one (tokenizer, template, train_on); build once, reuse.

    ``train_on``: ``assistant`` (every assistant turn), ``last_assistant`` (only the last
    one: evaluation, RM/DPO responses), ``all`` (every token; cuts still at turn ends).
    """

    def __init__(self, tokenizer: Any, template: str = "auto", train_on: str = "assistant"):
        if train_on not in TRAIN_ON:
            raise ConfigError(f"train_on={train_on!r}: expected one of {', '.join(TRAIN_ON)}")
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is None:
            raise ConfigError("chatforge needs a fast tokenizer (one with a tokenizer.json) to build label masks")
        self.template = get_template(tokenizer, template)
        self.fmt: ChatFormat = chat_format(tokenizer, self.template)
        self.train_on = train_on
        self._split, self._special_ids = _special_splitter(self.backend)
        self._special_first = sorted({c[0] for c in self._special_ids})
        self._memo: dict[str, tuple[list[int], Any]] = {}
        self._plans: dict[tuple, _Plan | None] = {}  # (roles, gen prompt) -> how to encode that shape
        self._bpe = _PretokenBPE.build(self.backend) if self._split is not None else None
        if self._split is not None:
            self._memo = self._constant_fragments()
            if not self._splitting_is_exact():
                self._split, self._memo, self._special_first, self._bpe = None, {}, [], None
                self._plans.clear()

    # rendering -------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        return self.fmt.render(messages, add_generation_prompt)

    # encoding ---------------------------------------------------------------------------------
    def encode(self, messages: list[dict]) -> Encoded:
        out = self.encode_many([messages])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt followed by the generation prompt (what a model continues)."""
        out = self.encode_many([messages], add_generation_prompt=True)[0]
        if isinstance(out, Exception):
            raise out
        return out.input_ids

    def encode_many(self, conversations: list[list[dict]],
                    add_generation_prompt: bool = False) -> list[Encoded | Exception]:
        """Batch version of :meth:`encode` (one tokenizer call for the whole batch).
        A conversation the template refuses comes back as its exception."""
        jobs: list[str] = []
        pending: list[Any] = []
        for messages in conversations:
            try:
                pending.append(self._prepare(messages, add_generation_prompt, jobs))
            except Exception as e:  # template errors (raise_exception), malformed messages
                pending.append(e)
        encs = self._encode_texts(jobs)
        return [p if isinstance(p, Exception) else p[0](p[1], encs) for p in pending]

    def encode_rendered(self, rendered: list[Rendered]) -> list[Encoded]:
        """Encode already rendered conversations (the general path)."""
        jobs: list[str] = []
        layouts = [self._fragments(r.text, jobs) for r in rendered]
        encs = self._encode_texts(jobs)
        return [self._assemble((r, frags), encs) for r, frags in zip(rendered, layouts)]

    def _encode_texts(self, texts: list[str]) -> list[Any]:
        """Tokenise special-token-free texts: plain ASCII through the pre-token cache when it
        applies, the rest in one Rust batch. Each result has ``ids`` and ``char_to_token``."""
        fast = self._bpe
        if fast is None:
            return self.backend.encode_batch(texts, add_special_tokens=False) if texts else []
        out: list[Any] = [None] * len(texts)
        rest, where = [], []
        for i, t in enumerate(texts):
            if fast.handles(t):
                out[i] = fast.encode(t)
            else:
                rest.append(t)
                where.append(i)
        if rest:
            for i, e in zip(where, self.backend.encode_batch(rest, add_special_tokens=False)):
                out[i] = e
        return out

    def _prepare(self, messages: list[dict], gen: bool, jobs: list[str]) -> tuple[Any, Any]:
        """Queue the texts to tokenise; returns (finish function, its state)."""
        if self.fmt.fast:
            roles = tuple([m["role"] for m in messages])
            key = (roles, gen)
            plan = self._plans.get(key, False)
            if plan is False:
                plan = self._plans[key] = _compile_plan(self, roles, gen) if roles else None
            if plan is not None:
                contents = [m["content"] for m in messages]
                if not self._may_hold_special(contents):
                    first = len(jobs)
                    for job in plan.jobs:
                        jobs.append("".join([contents[p] if type(p) is int else p for p in job.parts]))
                    return self._assemble_plan, (plan, contents, first)
        r = self.render(messages, gen)
        return self._assemble, (r, self._fragments(r.text, jobs))

    def _may_hold_special(self, contents: list[str]) -> bool:
        """Could a message contain a special-token string? (The tokenizer would split it out.)"""
        if self._split is None:
            return False
        for c in contents:
            for ch in self._special_first:
                if ch in c and self._split.search(c):
                    return True
        return False

    def _assemble_plan(self, state: tuple, encs: list) -> Encoded:
        plan, contents, first = state
        ids: list[int] = []
        starts: list[int] = []
        job_encs: list[Any] = []
        k = first
        for seg in plan.segments:
            starts.append(len(ids))
            if type(seg) is list:
                ids.extend(seg)
                job_encs.append(None)
            else:
                enc = encs[k]
                k += 1
                ids.extend(enc.ids)
                job_encs.append(enc)
        spans = []
        for a, b in plan.spans:
            spans.append((_marker_token(a, starts, job_encs, contents, True),
                          _marker_token(b, starts, job_encs, contents, False) + 1))
        return self._finish(ids, spans)

    def _finish(self, ids: list[int], token_spans: list[tuple[int, int]]) -> Encoded:
        if self.train_on == "all":
            return Encoded(ids, list(ids), [t1 for _, t1 in token_spans], len(ids))
        chosen = token_spans[-1:] if self.train_on == "last_assistant" else token_spans
        labels = [IGNORE_INDEX] * len(ids)
        n = done = 0
        for t0, t1 in chosen:
            labels[t0:t1] = ids[t0:t1]
            n += max(t1 - max(t0, done), 0)  # spans are in order; a shared token counts once
            done = max(done, t1)
        return Encoded(ids, labels, [t1 for _, t1 in chosen], n)

    def _fragments(self, text: str, jobs: list[str]) -> list[list]:
        """Cut ``text`` at special tokens, as the tokenizer does: [char_start, special id | -1, payload]."""
        frags: list[list] = []
        if self._split is None:
            frags.append([0, -1, len(jobs)])
            jobs.append(text)
            return frags
        pos = 0
        for m in self._split.finditer(text):
            s = m.start()
            if s > pos:
                frags.append(self._text_fragment(text, pos, s, jobs))
            frags.append([s, self._special_ids[m.group()], None])
            pos = m.end()
        if pos < len(text):
            frags.append(self._text_fragment(text, pos, len(text), jobs))
        return frags

    def _text_fragment(self, text: str, s: int, e: int, jobs: list[str]) -> list:
        piece = text[s:e]
        memo = self._memo.get(piece)
        if memo is not None:
            return [s, -1, memo]
        jobs.append(piece)
        return [s, -1, len(jobs) - 1]

    def _assemble(self, state: tuple, encs: list) -> Encoded:
        r, frags = state
        ids: list[int] = []
        char_starts: list[int] = []
        tok_starts: list[int] = []
        table: list[Any] = []  # Encoding per fragment (None for a special token)
        for cs, sid, payload in frags:
            char_starts.append(cs)
            tok_starts.append(len(ids))
            if sid >= 0:
                ids.append(sid)
                table.append(None)
            elif isinstance(payload, int):
                enc = encs[payload]
                ids.extend(enc.ids)
                table.append(enc)
            else:
                ids.extend(payload[0])
                table.append(payload[1])
        locate = _Locator(char_starts, tok_starts, table, len(ids))
        return self._finish(ids, [locate.span(s, e) for s, e in r.spans])

    # start-up checks ----------------------------------------------------------------------
    def _constant_fragments(self) -> dict[str, tuple[list[int], Any]]:
        """Text that sits between two special tokens inside a template piece never changes:
        tokenise it once (SmolLM2's default system prompt is 20 tokens of every record)."""
        pieces = [*self.fmt.start.values(), *self.fmt.sep.values(), *self.fmt.end.values(), *self.fmt.gen.values()]
        memo = {}
        for piece in pieces:
            cuts = [(m.start(), m.end()) for m in self._split.finditer(piece)]
            for (_, a), (b, _) in zip(cuts, cuts[1:]):
                if b > a and piece[a:b] not in memo:
                    enc = self.backend.encode(piece[a:b], add_special_tokens=False)
                    memo[piece[a:b]] = (enc.ids, enc)
        return memo

    def _splitting_is_exact(self) -> bool:
        from chatforge.data.templates import _verification_chats

        special = next(iter(self._special_ids), "")
        chats = _verification_chats() + [[{"role": "user", "content": f"a{special}b \n"},
                                          {"role": "assistant", "content": f"{special}\n x"}]]
        for chat in chats:
            try:
                r = self.render(chat)
            except Exception:
                continue
            want = self.backend.encode(r.text, add_special_tokens=False).ids
            if self.encode_rendered([r])[0].input_ids != want or self.encode(chat).input_ids != want:
                return False
        return True


def _special_splitter(backend: Any) -> tuple[re.Pattern | None, dict[str, int]]:
    """A regex that cuts text at added tokens exactly like the tokenizer, or None when the
    tokenizer does more than that (a normalizer, tokens that strip whitespace)."""
    added = backend.get_added_tokens_decoder()
    if backend.normalizer is not None or not added:
        return None, {}
    if any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
        return None, {}
    ids = {t.content: i for i, t in added.items()}
    # leftmost-longest, as the tokenizer's added-vocabulary matcher
    pattern = "|".join(re.escape(c) for c in sorted(ids, key=len, reverse=True))
    return re.compile(pattern), ids


# GPT-2's pre-tokenizer regex (tokenizers' ByteLevel with use_regex=True), restricted to the
# plain ASCII text it is used on: there \p{L} = [A-Za-z], \p{N} = [0-9], \s = [ \t\n], and the
# standard library's re runs it ~2x faster than the Unicode-aware regex module would.
_GPT2_SPLIT_ASCII = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")
_NOT_PLAIN_ASCII = re.compile(r"[^\t\n\x20-\x7e]")


class _PretokenBPE:
    """Byte-level BPE with a pre-token cache: 3-4x faster than the Rust tokenizer here.

    A byte-level BPE tokenizer (GPT-2 family, SmolLM2) cuts text with one regex, then runs
    BPE inside each piece independently. So ids(text) = the concatenation of ids(piece),
    and a dict from piece to ids answers almost every piece of a corpus after the first
    few thousand records; only unseen pieces go to Rust. Used only for plain ASCII text
    (tab, newline, printable), where the regex's character classes are unambiguous, and
    only after it reproduced the Rust tokenizer on probe texts.
    """

    MAX_CACHE = 200_000  # pieces (~50 MB); cleared when full

    def __init__(self, backend: Any):
        self.backend = backend
        self.cache: dict[str, list[int]] = {}
        vocab = backend.get_vocab(with_added_tokens=False)
        self.nbytes = [0] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            self.nbytes[i] = len(token)  # byte-level alphabet: one character per byte

    @classmethod
    def build(cls, backend: Any) -> "_PretokenBPE | None":
        from tokenizers import pre_tokenizers

        pre = backend.pre_tokenizer
        if (backend.normalizer is not None or not isinstance(pre, pre_tokenizers.ByteLevel)
                or pre.add_prefix_space or not pre.use_regex):
            return None
        fast = cls(backend)
        probes = ["Hello world!", "  two  spaces\n\n\nand\tTabs ", "it's they'll I'M 12345 x1y2 3.14", "a\n  b",
                  "#include <stdio.h>\nint main() { return 0; }", "end with space ", "   ", "\n", "'s'S 're", "..."]
        if any(fast.encode(p).ids != backend.encode(p, add_special_tokens=False).ids for p in probes):
            return None
        return fast

    @staticmethod
    def handles(text: str) -> bool:
        return text.isascii() and _NOT_PLAIN_ASCII.search(text) is None

    def encode(self, text: str) -> "_PyEncoding":
        pieces = _GPT2_SPLIT_ASCII.findall(text)
        got = list(map(self.cache.get, pieces))
        if None in got:
            if len(self.cache) >= self.MAX_CACHE:
                self.cache.clear()
            for k, piece in enumerate(pieces):
                if got[k] is None:
                    got[k] = self.cache[piece] = self.backend.encode(piece, add_special_tokens=False).ids
        return _PyEncoding(list(chain.from_iterable(got)), self.nbytes)


class _PyEncoding:
    """The two questions label masks ask of an encoding, answered from token byte lengths
    (ASCII only, so bytes == characters)."""

    __slots__ = ("ids", "nbytes")

    def __init__(self, ids: list[int], nbytes: list[int]):
        self.ids, self.nbytes = ids, nbytes

    def char_to_token(self, c: int) -> int | None:
        pos = 0
        for t, i in enumerate(self.ids):
            pos += self.nbytes[i]
            if pos > c:
                return t
        return None

    def token_to_chars(self, t: int) -> tuple[int, int]:
        start = sum(self.nbytes[i] for i in self.ids[:t])
        return start, start + self.nbytes[self.ids[t]]


class _Locator:
    """Maps a character span of the rendered text to the tokens that overlap it."""

    def __init__(self, char_starts: list[int], tok_starts: list[int], table: list, n_tokens: int):
        self.cs, self.ts, self.table, self.n = char_starts, tok_starts, table, n_tokens

    def span(self, s: int, e: int) -> tuple[int, int]:
        """[first, last + 1) token indices of the tokens overlapping characters [s, e)."""
        if e <= s:
            t = self._token(s, forward=True)
            return t, t
        return self._token(s, forward=True), self._token(e - 1, forward=False) + 1

    def _token(self, c: int, forward: bool) -> int:
        k = bisect_right(self.cs, c) - 1
        enc = self.table[k]
        if enc is None:  # a special token
            return self.ts[k]
        local = c - self.cs[k]
        t = enc.char_to_token(local)
        if t is None:  # a character no token claims (trimmed offsets): take the nearest one inward
            return self.ts[k] + _nearest_token(enc, local, forward)
        if not forward:  # a multi-byte character can be split over several tokens: take them all
            n = len(enc.ids)
            while t + 1 < n and enc.token_to_chars(t + 1)[0] <= local:
                t += 1
        return self.ts[k] + t


def _nearest_token(enc: Any, local: int, forward: bool) -> int:
    step, stop = (1, local + 256) if forward else (-1, max(local - 256, -1))
    for i in range(local, stop, step):
        t = enc.char_to_token(i)
        if t is not None:
            return t
    return len(enc.ids) if forward else 0


class _Job:
    """Text to tokenise for one record: literals and message contents (by index), joined."""

    def __init__(self) -> None:
        self.parts: list[str | int] = []
        self.chars = 0  # literal characters so far
        self.refs: list[int] = []  # contents so far (their lengths are only known per record)

    def marker(self, delta: int = 0) -> tuple:
        """A character position in this job: literal chars + delta + the contents before it."""
        return ("job", self, self.chars + delta, tuple(self.refs))


@dataclass
class _Plan:
    """How to encode every conversation with one role sequence, compiled once.

    ``segments`` alternate constant token ids (special tokens and template text between
    them, tokenised at compile time) and :class:`_Job` s (the text around message
    contents, tokenised per record). ``spans`` locate each assistant span's first and
    last character as markers into those segments.
    """

    segments: list[Any]
    jobs: list[_Job]
    spans: list[tuple[tuple, tuple]]


def _compile_plan(enc: Encoder, roles: tuple[str, ...], gen: bool) -> _Plan | None:
    """Walk the template pieces around symbolic contents, cutting at special tokens the
    way the tokenizer does. None when this shape needs the general path."""
    fmt = enc.fmt
    try:
        pieces = [fmt.start[roles[0]], *(fmt.sep[(a, b)] for a, b in zip(roles, roles[1:])), fmt.end[roles[-1]]]
        if gen:
            pieces[-1] += fmt.gen[roles[-1]]
    except KeyError:
        return None
    if not fmt.eot:
        return None
    segments: list[Any] = []
    cur_ids: list[int] = []
    job = _Job()
    open_ends: list[int] = []  # spans waiting for their end marker (in the next piece)
    spans: list[list] = []

    def flush() -> None:
        nonlocal cur_ids, job
        if job.refs:
            if cur_ids:
                segments.append(cur_ids)
            segments.append(job)
            cur_ids = []
        elif job.parts:  # template text only: tokenise now
            cur_ids.extend(enc.backend.encode("".join(job.parts), add_special_tokens=False).ids)
        job = _Job()

    for i, piece in enumerate(pieces):
        last_char = len(fmt.eot) - 1 if open_ends else -1  # the end of turn's last char, in this piece
        pos = 0
        items = [(m.start(), m.end(), m.group()) for m in enc._split.finditer(piece)] if enc._split else []
        for a, b, special in [*items, (len(piece), len(piece), None)]:
            if a > pos:  # a run of template text
                if pos <= last_char < a:
                    for k in open_ends:
                        spans[k][1] = job.marker(last_char - pos)
                    open_ends = []
                job.parts.append(piece[pos:a])
                job.chars += a - pos
            if special is not None:
                flush()
                if a <= last_char < b:
                    for k in open_ends:
                        spans[k][1] = ("ids", cur_ids, len(cur_ids))
                    open_ends = []
                cur_ids.append(enc._special_ids[special])
            pos = b
        if open_ends:
            return None  # the end of turn is not where the pieces said it would be
        if i < len(roles):  # the content of message i follows this piece
            if roles[i] == "assistant":
                lead = fmt.lead.get(roles[i - 1] if i else None, 0)
                if lead > job.chars:
                    return None  # the lead crosses a special token
                spans.append([job.marker(-lead), None])
                open_ends.append(len(spans) - 1)
            job.parts.append(i)
            job.refs.append(i)
    flush()
    if cur_ids:
        segments.append(cur_ids)
    jobs = [s for s in segments if isinstance(s, _Job)]
    index = {id(s): k for k, s in enumerate(segments)}

    def resolve(marker: tuple) -> tuple:
        kind, obj, *rest = marker
        return (kind, index[id(obj)], *rest)

    try:
        return _Plan(segments, jobs, [(resolve(a), resolve(b)) for a, b in spans])
    except KeyError:  # a marker into a segment that did not survive (cannot happen for sane templates)
        return None


def _marker_token(marker: tuple, starts: list[int], encs: list, contents: list[str], first: bool) -> int:
    """The token index a marker points at (``first``: the first token of a span, else the last)."""
    if marker[0] == "ids":
        return starts[marker[1]] + marker[2]
    _, seg, chars, refs = marker
    local = chars
    for r in refs:
        local += len(contents[r])
    enc = encs[seg]
    t = enc.char_to_token(local)
    if t is None:
        return starts[seg] + _nearest_token(enc, local, first)
    if not first:  # a multi-byte character can be split over several tokens: take them all
        n = len(enc.ids)
        while t + 1 < n and enc.token_to_chars(t + 1)[0] <= local:
            t += 1
    return starts[seg] + t


_ENCODERS: "weakref.WeakKeyDictionary[Any, dict[tuple[str, str], Encoder]]" = weakref.WeakKeyDictionary()


def get_encoder(tokenizer: Any, template: str = "auto", train_on: str = "assistant") -> Encoder:
    """The cached :class:`Encoder` for this tokenizer, template and ``train_on``."""
    per_tok = _ENCODERS.setdefault(tokenizer, {})
    key = (get_template(tokenizer, template), train_on)
    if key not in per_tok:
        per_tok[key] = Encoder(tokenizer, key[0], train_on)
    return per_tok[key]


def encode_messages(tokenizer: Any, messages: list[dict], template: str = "auto",
                    train_on: str = "assistant") -> Encoded:
    """Render ``messages`` and tokenise: ids + labels on assistant content and end of turn only."""
    return get_encoder(tokenizer, template, train_on).encode(messages)


def encode_prompt(tokenizer: Any, prompt_messages: list[dict], template: str = "auto") -> list[int]:
    """Prompt ids ending with the generation prompt (``<|im_start|>assistant\\n``): for chat and rollouts."""
    return get_encoder(tokenizer, template).prompt_ids(prompt_messages)


def encode_prompt_response(tokenizer: Any, prompt_messages: list[dict], response: str,
                           template: str = "auto") -> Encoded:
    """Prompt + one assistant response, labels on the response and its end of turn only
    (reward model, DPO and PPO scoring). The ids start with :func:`encode_prompt`'s ids
    whenever the tokenizer does not merge across the generation prompt's last character."""
    messages = [*prompt_messages, {"role": "assistant", "content": response}]
    return get_encoder(tokenizer, template, "last_assistant").encode(messages)


# -- truncation and statistics -------------------------------------------------------------------

@dataclass
class TokenizeStats:
    """What happened to every record on the way to training rows; nothing is dropped silently."""

    records: int = 0  # conversations seen
    examples: int = 0  # kept, whole or truncated
    truncated: int = 0  # kept after dropping trailing turns at a turn boundary
    dropped_too_long: int = 0  # even the first assistant turn does not fit (or truncation=drop)
    dropped_no_labels: int = 0  # nothing to learn: no assistant turn
    errors: int = 0  # not a conversation, or the template refused it
    tokens: int = 0  # tokens in kept examples
    label_tokens: int = 0  # of which carry a label
    rows: int = 0  # training rows (packed rows, or examples when not packing)
    row_capacity: int = 0  # rows * max_len when packing: tokens / row_capacity = packing efficiency
    first_errors: list[str] = field(default_factory=list)

    def error(self, where: str, reason: str) -> None:
        self.errors += 1
        if len(self.first_errors) < MAX_ERRORS_KEPT:
            self.first_errors.append(f"{where}: {reason}" if where else reason)

    def merge(self, other: "TokenizeStats") -> "TokenizeStats":
        for k, v in asdict(other).items():
            if k == "first_errors":
                self.first_errors.extend(v[: MAX_ERRORS_KEPT - len(self.first_errors)])
            else:
                setattr(self, k, getattr(self, k) + v)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        s = (f"{self.records} records -> {self.examples} examples ({self.truncated} truncated at a turn boundary, "
             f"{self.dropped_too_long} dropped: too long, {self.dropped_no_labels} dropped: no assistant turn, "
             f"{self.errors} errors), {self.tokens} tokens, {self.label_tokens} labelled")
        if self.row_capacity:
            s += f", {self.rows} packed rows ({self.tokens / self.row_capacity:.1%} full)"
        return s


def truncate(enc: Encoded, max_len: int, policy: str = "turns") -> tuple[Encoded | None, str]:
    """Fit an example into ``max_len`` tokens without cutting inside an assistant turn.

    Returns ``(example or None, status)``, status one of ``ok``, ``truncated``,
    ``too_long``, ``no_labels``. ``turns`` keeps the longest prefix that ends right
    after an assistant turn's end-of-turn token; if even the first assistant turn does
    not fit, the record is dropped (a cut inside it would teach a reply with no end).
    ``drop`` drops every record longer than ``max_len``.
    """
    if policy not in TRUNCATION:
        raise ConfigError(f"truncation={policy!r}: expected one of {', '.join(TRUNCATION)}")
    if not enc.turn_ends:
        return None, "no_labels"
    if len(enc) <= max_len:
        return enc, "ok"
    if policy == "drop":
        return None, "too_long"
    k = bisect_right(enc.turn_ends, max_len)
    if k == 0:
        return None, "too_long"
    cut = enc.turn_ends[k - 1]
    status = "truncated" if k < len(enc.turn_ends) else "ok"  # "ok": only template text after the last turn went
    return Encoded(enc.input_ids[:cut], enc.labels[:cut], enc.turn_ends[:k]), status


def _messages_of(rec: Any) -> list[dict]:
    if isinstance(rec, Conversation):
        return rec.messages
    if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
        return rec["messages"]
    if isinstance(rec, list):
        return rec
    kind = getattr(rec, "kind", type(rec).__name__)
    raise DataError(f"supervised fine-tuning needs conversations, got a {kind} record")


def _where(rec: Any) -> str:
    meta = getattr(rec, "meta", None) or (rec.get("meta") if isinstance(rec, dict) else None) or {}
    src, line = meta.get("source"), meta.get("line")
    return f"{src}:{line}" if src and line is not None else (src or "")


def iter_examples(records: Iterable[Any], tokenizer: Any, max_len: int, template: str = "auto",
                  train_on: str = "assistant", truncation: str = "turns", stats: TokenizeStats | None = None,
                  batch_size: int = 512) -> Iterator[Encoded]:
    """Stream conversations -> truncated examples, tokenising ``batch_size`` at a time.

    ``records``: :class:`Conversation` objects, ``{"messages": [...]}`` dicts or message
    lists. Counts go into ``stats`` (pass one in to read them afterwards).
    """
    if max_len < 2:
        raise ConfigError(f"max_len={max_len}: must be at least 2")
    if truncation not in TRUNCATION:
        raise ConfigError(f"truncation={truncation!r}: expected one of {', '.join(TRUNCATION)}")
    encoder = get_encoder(tokenizer, template, train_on)
    stats = stats if stats is not None else TokenizeStats()
    batch: list[Any] = []
    for rec in records:
        batch.append(rec)
        if len(batch) >= batch_size:
            yield from _encode_batch(encoder, batch, max_len, truncation, stats)
            batch = []
    if batch:
        yield from _encode_batch(encoder, batch, max_len, truncation, stats)


def _encode_batch(encoder: Encoder, batch: list[Any], max_len: int, truncation: str,
                  stats: TokenizeStats) -> Iterator[Encoded]:
    convs, owners = [], []
    for rec in batch:
        stats.records += 1
        try:
            convs.append(_messages_of(rec))
            owners.append(rec)
        except DataError as e:
            stats.error(_where(rec), str(e))
    for rec, enc in zip(owners, encoder.encode_many(convs)):
        if isinstance(enc, Exception):
            stats.error(_where(rec), f"chat template failed: {enc}")
            continue
        ex, status = truncate(enc, max_len, truncation)
        if ex is None:
            if status == "too_long":
                stats.dropped_too_long += 1
            else:
                stats.dropped_no_labels += 1
            continue
        stats.truncated += status == "truncated"
        stats.examples += 1
        stats.tokens += len(ex)
        stats.label_tokens += ex.label_count()
        yield ex


# -- packing -----------------------------------------------------------------------------------

def pack_examples(examples: Iterable[Encoded | dict], max_len: int, buffer: int = 20000,
         stats: TokenizeStats | None = None) -> Iterator[dict[str, list[int]]]:
    """Pack short examples into rows of at most ``max_len`` tokens.

    Best-fit decreasing over buffers of ``buffer`` examples (rows ~99% full for chat-sized
    examples). Each row carries ``position_ids`` that restart at 0 at every example, and
    the first label of every example is ``-100`` (it would otherwise be predicted from the
    previous example). Give the model these rows with ``position_ids``, *no*
    ``attention_mask`` and ``use_cache=False``: transformers then builds a block-diagonal
    causal mask from the position resets (``masking_utils.find_packed_sequence_indices``),
    so no token attends across examples -- see :func:`collate`.
    """
    buf: list[tuple[list[int], list[int]]] = []
    for ex in examples:
        ids, labels = (ex.input_ids, ex.labels) if isinstance(ex, Encoded) else (ex["input_ids"], ex["labels"])
        if len(ids) > max_len:
            raise ValueError(f"example of {len(ids)} tokens > max_len={max_len}: truncate before packing")
        buf.append((ids, labels))
        if len(buf) >= buffer:
            yield from _pack_buffer(buf, max_len, stats)
            buf = []
    if buf:
        yield from _pack_buffer(buf, max_len, stats)


def _pack_buffer(items: list[tuple[list[int], list[int]]], max_len: int,
                 stats: TokenizeStats | None) -> Iterator[dict[str, list[int]]]:
    bins: list[list[int]] = []
    caps: list[int] = []  # sorted distinct free capacities of open rows
    rows_with: dict[int, list[int]] = {}  # free capacity -> rows that have exactly that much room
    for i in sorted(range(len(items)), key=lambda i: -len(items[i][0])):
        need = len(items[i][0])
        j = bisect_left(caps, need)  # the tightest row it fits in
        if j == len(caps):
            b, free = len(bins), max_len
            bins.append([])
        else:
            free = caps[j]
            b = rows_with[free].pop()
            if not rows_with[free]:
                del rows_with[free]
                caps.pop(j)
        bins[b].append(i)
        free -= need
        if free > 0:
            if free in rows_with:
                rows_with[free].append(b)
            else:
                rows_with[free] = [b]
                insort(caps, free)
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in members:
            x, y = items[i]
            labels.extend(y)
            labels[len(ids)] = IGNORE_INDEX
            ids.extend(x)
            pos.extend(range(len(x)))
        if stats is not None:
            stats.rows += 1
            stats.row_capacity += max_len
        yield {"input_ids": ids, "labels": labels, "position_ids": pos}


def build_sft_examples(records: Iterable[Any], tokenizer: Any, max_len: int, template: str = "auto",
                       pack: bool = True, train_on: str = "assistant", truncation: str = "turns",
                       ) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """Conversations -> training examples (in memory), and what happened to each record.

    With ``pack`` the examples are packed rows (``input_ids``, ``labels``,
    ``position_ids``); otherwise one ``{input_ids, labels}`` per kept conversation.
    Feed batches of them to :func:`collate`. For corpora that do not fit comfortably in
    memory use :func:`tokenize_to_dataset`.
    """
    stats = TokenizeStats()
    examples = iter_examples(records, tokenizer, max_len, template, train_on, truncation, stats)
    if pack:
        out = list(pack_examples(examples, max_len, stats=stats))
    else:
        out = [e.to_dict() for e in examples]
        stats.rows = len(out)
    return out, stats


def collate(batch: list[dict], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Pad a batch into tensors (right padding; padded labels are -100).

    Unpacked examples -> ``input_ids``, ``labels``, ``attention_mask``.
    Packed rows -> ``input_ids``, ``labels``, ``position_ids`` and deliberately no
    ``attention_mask``: with one, transformers would use it and let examples in a row see
    each other; without it, the position resets give a block-diagonal mask. Padding in a
    packed row gets positions 0, 1, ... of its own, so it is a separate (unlabelled) block.
    ``pad_id`` is only ever an input id: labels never look at it.

    Call the model with ``use_cache=False`` for packed rows (or set
    ``model.config.use_cache = False``): transformers 5 only looks for packed sequences
    when there is no KV cache, and ``use_cache`` defaults to True even in train mode, so
    with the default every example in a row would silently attend to the ones before it
    (tests/test_tokenize.py pins this).
    """
    import torch

    packed = ["position_ids" in b for b in batch]
    if any(packed) and not all(packed):
        raise ValueError("collate: a batch mixes packed rows and plain examples")
    width = max(len(b["input_ids"]) for b in batch)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros((n, width), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        input_ids[i, :k] = torch.as_tensor(b["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.as_tensor(b["labels"], dtype=torch.long)
        if packed[0]:
            extra[i, :k] = torch.as_tensor(b["position_ids"], dtype=torch.long)
            extra[i, k:] = torch.arange(width - k)
        else:
            extra[i, :k] = 1
    key = "position_ids" if packed[0] else "attention_mask"
    return {"input_ids": input_ids, "labels": labels, key: extra}


# -- large corpora: Arrow on disk ----------------------------------------------------------------

FORMAT_VERSION = 1  # bump when the stored rows change meaning: invalidates every cache
_STATUS_KEPT = ("ok", "truncated")


def default_cache_dir() -> Path:
    """``$CHATFORGE_CACHE/datasets`` (default ``~/.cache/chatforge/datasets``)."""
    return Path(os.environ.get("CHATFORGE_CACHE", Path.home() / ".cache" / "chatforge")) / "datasets"


def hash_files(paths: Iterable[str | os.PathLike]) -> str:
    """Content hash of input files (their bytes, in order), for cache keys."""
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        h.update(b"\0file\0")
    return h.hexdigest()


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.blake2b(tokenizer.backend_tokenizer.to_str().encode(), digest_size=16)
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def tokenize_to_dataset(records: Iterable[Any], tokenizer: Any, max_len: int, *, template: str = "auto",
                        pack: bool = True, train_on: str = "assistant", truncation: str = "turns",
                        files: Iterable[str | os.PathLike] | None = None, key_extra: str = "",
                        cache_dir: str | os.PathLike | None = None, num_proc: int | None = None,
                        chunk: int = 4000) -> tuple[Any, TokenizeStats]:
    """The large-corpus path: conversations -> training rows in an Arrow file, memory-mapped.

    One streaming pass, constant memory: records are cut into chunks of ``chunk``
    conversations, each chunk is tokenised, truncated and packed (rows never span chunks)
    -- by ``num_proc`` forked worker processes when ``num_proc > 1``, overlapping with the
    reading and cleaning that produce ``records`` in this process -- and the rows are
    appended to ``rows.arrow``, opened at the end as a memory-mapped ``datasets.Dataset``.
    (Not ``datasets.map``: that needs the whole corpus written to Arrow first and reads
    it twice more, and the serial read/clean phase then leaves a core idle.)

    With ``files`` (the inputs ``records`` come from) the result is cached under
    ``cache_dir/<key>``, the key hashing the files' bytes, the tokenizer, template,
    ``max_len`` and every option (add cleaning settings etc. via ``key_extra``); a second
    call with the same key returns the cached rows without reading ``records``. Without
    ``files`` the rows go to a fresh folder under ``cache_dir`` that the caller owns.

    Returns ``(datasets.Dataset, TokenizeStats)``; columns ``input_ids``, ``labels`` and,
    packed, ``position_ids`` (int32 lists): feed batches of rows to :func:`collate`.
    """
    if truncation not in TRUNCATION or train_on not in TRAIN_ON or max_len < 2 or chunk < 1:
        raise ConfigError(f"tokenize_to_dataset: bad option (truncation={truncation!r}, train_on={train_on!r}, "
                          f"max_len={max_len}, chunk={chunk})")
    template = get_template(tokenizer, template)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    settings = dict(v=FORMAT_VERSION, template=template, max_len=max_len, pack=pack, train_on=train_on,
                    truncation=truncation, chunk=chunk if pack else None, extra=key_extra)
    key = None
    if files is not None:
        h = hashlib.blake2b(digest_size=12)
        h.update(hash_files(files).encode())
        h.update(_tokenizer_fingerprint(tokenizer).encode())
        h.update(json.dumps(settings, sort_keys=True).encode())
        key = "sft-" + h.hexdigest()
        if (root / key / "manifest.json").exists():
            return _load_cached(root / key)
    work = Path(tempfile.mkdtemp(prefix=(key or "sft-nocache") + ".tmp-", dir=root))
    try:
        from datasets.arrow_writer import ArrowWriter

        stats = TokenizeStats()
        job = (tokenizer, template, train_on, max_len, truncation, pack)
        chunks = _chunks(records, chunk, stats)
        with ArrowWriter(features=_row_features(pack), path=str(work / "rows.arrow")) as writer:
            for columns, chunk_stats in _run_chunks(chunks, job, num_proc):
                stats.merge(chunk_stats)
                if len(columns["lengths"]):
                    writer.write_table(_to_arrow(columns))
            writer.finalize()
        (work / "manifest.json").write_text(json.dumps({"files": ["rows.arrow"], "stats": stats.to_dict(),
                                                        "settings": settings}, indent=1))
        if key is None:
            return _load_cached(work)
        try:
            os.replace(work, root / key)
        except OSError:  # another process finished the same key first
            shutil.rmtree(work, ignore_errors=True)
        return _load_cached(root / key)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _load_cached(folder: Path) -> tuple[Any, TokenizeStats]:
    from datasets import Dataset, concatenate_datasets

    manifest = json.loads((folder / "manifest.json").read_text())
    parts = [Dataset.from_file(str(folder / f)) for f in manifest["files"]]
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return ds, TokenizeStats(**manifest["stats"])


def _row_features(packed: bool):
    from datasets import Features, List, Value

    cols = {"input_ids": List(Value("int32")), "labels": List(Value("int32"))}
    if packed:
        cols["position_ids"] = List(Value("int32"))
    return Features(cols)


def _chunks(records: Iterable[Any], size: int, stats: TokenizeStats) -> Iterator[list[dict]]:
    """Chunks of ``{"messages", "meta"}`` (meta: provenance only, small to ship to workers);
    records that are not conversations are counted here."""
    chunk: list[dict] = []
    for rec in records:
        try:
            messages = _messages_of(rec)
        except DataError as e:
            stats.records += 1
            stats.error(_where(rec), str(e))
            continue
        meta = getattr(rec, "meta", None) or (rec.get("meta") if isinstance(rec, dict) else None) or {}
        chunk.append({"messages": messages, "meta": {"source": meta.get("source"), "line": meta.get("line")}})
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _run_chunks(chunks: Iterator[list], job: tuple, num_proc: int | None) -> Iterator[tuple[dict, TokenizeStats]]:
    if not num_proc or num_proc <= 1:
        _worker_init(*job)
        yield from map(_work_chunk, chunks)
        return
    import multiprocessing

    # forked workers inherit the tokenizer (no re-import of transformers, no pickling)
    with multiprocessing.get_context("fork").Pool(num_proc, initializer=_worker_init, initargs=(*job, True)) as pool:
        yield from pool.imap(_work_chunk, chunks)


_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer: Any, template: str, train_on: str, max_len: int, truncation: str, pack: bool,
                 forked: bool = False) -> None:
    if forked:  # one process per core already: no Rust thread pool (and no fork warning)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(encoder=get_encoder(tokenizer, template, train_on), max_len=max_len, truncation=truncation,
                   pack=pack)


def _work_chunk(chunk: list[dict]) -> tuple[dict, TokenizeStats]:
    """Encode, truncate and (maybe) pack one chunk; rows come back as flat int32 arrays."""
    import numpy as np

    w = _WORKER
    stats = TokenizeStats()
    examples = _encode_batch(w["encoder"], chunk, w["max_len"], w["truncation"], stats)
    if w["pack"]:
        rows = list(pack_examples(examples, w["max_len"], buffer=len(chunk), stats=stats))
        names = ("input_ids", "labels", "position_ids")
    else:
        rows = [e.to_dict() for e in examples]
        stats.rows = len(rows)
        names = ("input_ids", "labels")
    lengths = np.fromiter((len(r["input_ids"]) for r in rows), dtype=np.int32, count=len(rows))
    total = int(lengths.sum())
    columns = {"lengths": lengths}
    for name in names:
        columns[name] = np.fromiter(chain.from_iterable(r[name] for r in rows), dtype=np.int32, count=total)
    return columns, stats


def _to_arrow(columns: dict) -> Any:
    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(columns["lengths"]) + 1, dtype=np.int32)
    np.cumsum(columns["lengths"], out=offsets[1:])
    offsets = pa.array(offsets)
    names = [n for n in ("input_ids", "labels", "position_ids") if n in columns]
    return pa.table({n: pa.ListArray.from_arrays(offsets, pa.array(columns[n])) for n in names})

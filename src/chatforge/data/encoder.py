"""The encoder behind :mod:`chatforge.data.tokenize`: conversation -> ids + labels, fast.

Correctness first: the label mask comes from *where the assistant text is in the rendered
string* (character spans from :mod:`chatforge.data.templates`) mapped to tokens, never
from token ids (on SmolLM2 pad == eos == ``<|im_end|>``).

Speed (the data bench wants >= 20k short records/s on 2 cores; one Jinja render alone
costs ~50 us): for each role sequence -- (user, assistant), (system, user, assistant),
... -- the template pieces are compiled once into a :class:`_Plan`: constant token ids for
the special tokens and the template text between them (SmolLM2's default system prompt
is 20 tokens of every record), and a few texts per record that hold message contents.
Cutting at special tokens is what the tokenizer itself does first, so the ids equal
``apply_chat_template``'s. Those texts go through :class:`_PretokenBPE` (a pre-token
cache, ~3x the Rust tokenizer) when the tokenizer is a byte-level BPE and the text plain
ASCII, else through the Rust tokenizer in one batch. Every shortcut is checked against
plain tokenisation at start-up and falls back to the general path (render, cut at
special tokens, map character spans) where it does not hold; tests/test_tokenize.py
compares both paths and ``apply_chat_template`` on random and real conversations.
"""

from __future__ import annotations

import re
import weakref
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from chatforge.data.templates import ChatFormat, Rendered, chat_format, get_template
from chatforge.errors import ConfigError

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "last_assistant", "all")


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

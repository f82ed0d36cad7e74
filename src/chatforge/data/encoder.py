"""The encoder behind :mod:`chatforge.data.tokenize`: conversation -> ids + labels.

Correctness first: the label mask comes from *where the assistant text is in the rendered
string* (character spans from :mod:`chatforge.data.templates`) mapped to tokens
(:mod:`chatforge.data.token_spans`), never from token ids (on SmolLM2 pad == eos ==
``<|im_end|>``).

The general path: render the conversation from the template's pieces, cut the text at
special tokens exactly as the tokenizer does first, tokenise the texts between them (the
template text that never changes, e.g. SmolLM2's 20-token default system prompt, only
once), and map the assistant spans to tokens. Two speed levers sit beside it, each in its
own module with the measurement that keeps it there:

* :mod:`chatforge.data.template_plans` -- per role sequence, the template compiled into
  constant ids and a few texts per record: no rendering, no cutting (18-24% less time);
* :mod:`chatforge.data.pretoken_cache` -- plain-ASCII texts through a pre-token -> ids
  dict instead of the Rust tokenizer (2.4-3.9x less time).

Every shortcut is checked against plain tokenisation of the rendered text at start-up;
where one does not hold, the encoder falls back to tokenising whole rendered texts in Rust.
tests/test_tokenize.py compares every path with ``apply_chat_template``.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Any

from chatforge.data.pretoken_cache import PretokenBPE
from chatforge.data.template_plans import Plan, compile_plan
from chatforge.data.templates import (ChatFormat, Rendered, _verification_chats, chat_format, get_template,
                                      supports_tools, tool_calls_as_text)
from chatforge.data.token_spans import Locator
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
        self._tokenizer = weakref.ref(tokenizer)
        self.fmt: ChatFormat = chat_format(tokenizer, self.template)
        self.train_on = train_on
        self._split, self._special_ids = _special_splitter(self.backend)
        self._special_first = sorted({c[0] for c in self._special_ids})
        self._memo: dict[str, tuple[list[int], Any]] = {}  # constant template text -> (ids, encoding)
        self._plans: dict[tuple, Plan | None] = {}  # (roles, gen prompt) -> how to encode that shape
        self._bpe: PretokenBPE | None = None
        self._native_tools: bool | None = None  # does the template render tool calls? (probed on first use)
        if self._split is not None:
            self._bpe = PretokenBPE.build(self.backend)
            self._memo = self._constant_fragments()
            if not self._splitting_is_exact():
                self._split, self._memo, self._special_first, self._bpe = None, {}, [], None
                self._plans.clear()

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        return self.fmt.render(messages, add_generation_prompt)

    # -- public calls ----------------------------------------------------------------------------
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
        jobs: list[str] = []  # texts to tokenise, shared by the whole batch
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

    # -- the two stages: queue texts per conversation, then tokenise them all ---------------------
    def _prepare(self, messages: list[dict], gen: bool, jobs: list[str]) -> tuple[Any, Any]:
        """Queue the texts to tokenise; returns (finish function, its state)."""
        for m in messages:
            if m["role"] == "tool" or m.get("tool_calls"):
                return self._prepare_tools(messages, gen, jobs)
        plan = self._plan(messages, gen)
        if plan is not None:
            contents = [m["content"] for m in messages]
            if not self._may_hold_special(contents):
                first = len(jobs)
                jobs.extend(plan.texts(contents))
                return self._assemble_plan, (plan, contents, first)
        r = self.render(messages, gen)
        return self._assemble, (r, self._fragments(r.text, jobs))

    def _prepare_tools(self, messages: list[dict], gen: bool, jobs: list[str]) -> tuple[Any, Any]:
        """Tool calls: the template's own rendering through Jinja when it has one, else the
        text convention of :func:`chatforge.data.templates.tool_calls_as_text`."""
        if self._native_tools is None:
            self._native_tools = supports_tools(self._tokenizer(), self.template)
        if not self._native_tools:
            flat = tool_calls_as_text(messages)
            return self._prepare(flat, gen, jobs)
        r = self.fmt._render_by_prefixes(messages, gen)
        return self._assemble, (r, self._fragments(r.text, jobs))

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

    def _finish(self, ids: list[int], token_spans: list[tuple[int, int]]) -> Encoded:
        """Labels on the chosen assistant token spans, -100 elsewhere."""
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

    # -- compiled plans (template_plans.py) ----------------------------------------------------
    def _plan(self, messages: list[dict], gen: bool) -> Plan | None:
        if not self.fmt.fast or not messages:
            return None
        key = (tuple([m["role"] for m in messages]), gen)
        plan = self._plans.get(key, False)
        if plan is False:
            plan = self._plans[key] = compile_plan(self.fmt, self.backend, self._split, self._special_ids, *key)
        return plan

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
        return self._finish(*plan.assemble(contents, encs[first:first + len(plan.jobs)]))

    # -- the general path: rendered text cut at special tokens -----------------------------------
    def _fragments(self, text: str, jobs: list[str]) -> list[list]:
        """Cut ``text`` at special tokens, as the tokenizer does: [char_start, special id | -1, payload]."""
        if self._split is None:
            jobs.append(text)
            return [[0, -1, len(jobs) - 1]]
        frags: list[list] = []
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
        table: list[Any] = []  # encoding per fragment (None for a special token)
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
        locate = Locator(char_starts, tok_starts, table)
        return self._finish(ids, [locate.span(s, e) for s, e in r.spans])

    # -- start-up checks ---------------------------------------------------------------------------
    def _constant_fragments(self) -> dict[str, tuple[list[int], Any]]:
        """Text that sits between two special tokens inside a template piece never changes:
        tokenise it once. On SmolLM2 (whose template adds a 20-token system prompt) this took the
        general path from 80-83 to 66-70 CPU us per conversation (AMD EPYC, Rust only, as in
        template_plans.py); the plans tokenise the same text at compile time instead."""
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
        """Do the cut at special tokens, the plans and the pre-token cache give the ids the
        tokenizer gives the whole rendered text? (Probe chats, one with special tokens inside.)"""
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


_ENCODERS: "weakref.WeakKeyDictionary[Any, dict[tuple[str, str], Encoder]]" = weakref.WeakKeyDictionary()


def get_encoder(tokenizer: Any, template: str = "auto", train_on: str = "assistant") -> Encoder:
    """The cached :class:`Encoder` for this tokenizer, template and ``train_on``."""
    per_tok = _ENCODERS.setdefault(tokenizer, {})
    key = (get_template(tokenizer, template), train_on)
    if key not in per_tok:
        per_tok[key] = Encoder(tokenizer, key[0], train_on)
    return per_tok[key]

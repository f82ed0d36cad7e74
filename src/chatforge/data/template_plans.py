"""Compiled template plans: encode a conversation without rendering it: 18-24% less CPU.

For each role sequence -- (user, assistant), (system, user, assistant), ... -- the template
pieces are compiled once into a :class:`Plan`: constant token ids for the special tokens
and the template text between them (SmolLM2's default system prompt is 20 tokens of every
record), and a few texts per record that hold the message contents. Cutting at special
tokens is what the tokenizer itself does first, so the ids equal ``apply_chat_template``'s;
the encoder checks that at start-up and tests/test_tokenize.py compares plans with the
general path (render, cut at special tokens, map character spans).

Measured on an AMD EPYC (``lscpu``: "AMD EPYC"), one thread, CPU us per conversation of
:meth:`chatforge.data.encoder.Encoder.encode_many` in batches of 512 over 2,000
conversations, a fresh encoder per run, min of 7 interleaved runs, both sides with the
pre-token cache of :mod:`chatforge.data.pretoken_cache`:

=========================================  ============  =====
SmolLM2 tokenizer + its template            general path  plans
=========================================  ============  =====
demo conversations (382 distinct, cycled)       24.0       18.9
synthetic alpaca (bench/data.py's corpus)       32.6       26.7
same, pre-token cache warm                      22.1       16.8
=========================================  ============  =====

(``tokenizer.apply_chat_template(chat, tokenize=True)``, ids only and no labels: 122-125.)
The data bench's goal, 20k records/s on 2 cores, leaves ~100 CPU us per record for reading,
cleaning, tokenising and packing together: plans give back 5-6 of them. Without the
pre-token cache the gain is 5-11 us (general path 71-75, plans 64-65).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from chatforge.data.templates import ChatFormat
from chatforge.data.token_spans import token_at


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
class Plan:
    """How to encode every conversation with one role sequence, compiled once.

    ``segments`` alternate constant token ids (special tokens and template text between
    them, tokenised at compile time) and :class:`_Job` s (the text around message
    contents, tokenised per record). ``spans`` locate each assistant span's first and
    last character as markers into those segments.
    """

    segments: list[Any]
    jobs: list[_Job]
    spans: list[tuple[tuple, tuple]]

    def texts(self, contents: list[str]) -> list[str]:
        """The texts to tokenise for one record, one per job."""
        return ["".join([contents[p] if type(p) is int else p for p in job.parts]) for job in self.jobs]

    def assemble(self, contents: list[str], encs: list[Any]) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and assistant token spans of one record from the encodings of :meth:`texts`."""
        ids: list[int] = []
        starts: list[int] = []
        seg_encs: list[Any] = []
        k = 0
        for seg in self.segments:
            starts.append(len(ids))
            if type(seg) is list:
                ids.extend(seg)
                seg_encs.append(None)
            else:
                ids.extend(encs[k].ids)
                seg_encs.append(encs[k])
                k += 1
        spans = [(_marker_token(a, starts, seg_encs, contents, True),
                  _marker_token(b, starts, seg_encs, contents, False) + 1) for a, b in self.spans]
        return ids, spans


def _marker_token(marker: tuple, starts: list[int], encs: list, contents: list[str], first: bool) -> int:
    """The token index a marker points at (``first``: the first token of a span, else the last)."""
    if marker[0] == "ids":
        return starts[marker[1]] + marker[2]
    _, seg, local, refs = marker
    for r in refs:
        local += len(contents[r])
    return starts[seg] + token_at(encs[seg], local, first)


def compile_plan(fmt: ChatFormat, backend: Any, split: re.Pattern | None, special_ids: dict[str, int],
                 roles: tuple[str, ...], gen: bool) -> Plan | None:
    """Walk the template pieces around symbolic contents, cutting at special tokens (``split``)
    the way the tokenizer does. None when this shape needs the general path."""
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
            cur_ids.extend(backend.encode("".join(job.parts), add_special_tokens=False).ids)
        job = _Job()

    for i, piece in enumerate(pieces):
        last_char = len(fmt.eot) - 1 if open_ends else -1  # the end of turn's last char, in this piece
        pos = 0
        items = [(m.start(), m.end(), m.group()) for m in split.finditer(piece)] if split else []
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
                cur_ids.append(special_ids[special])
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
        return Plan(segments, jobs, [(resolve(a), resolve(b)) for a, b in spans])
    except KeyError:  # a marker into a segment that did not survive (cannot happen for sane templates)
        return None

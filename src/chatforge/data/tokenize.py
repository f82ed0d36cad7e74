"""Tokenisation for training: messages -> input ids + assistant-only labels, truncation, packing.

The contract (DEVELOPERS.md): render with the chat template, then label only what the
assistant writes -- its content and the end-of-turn token after it, so the model learns
to stop. Everything else is ``-100``. The mask comes from *where the assistant text is in
the rendered string* (character spans from :mod:`chatforge.data.templates`, mapped to
tokens with the fast tokenizer's char->token table), never from token ids: on SmolLM2
pad == eos == ``<|im_end|>``, and a mask built from pad ids would silently drop the very
token that teaches the model to stop.

The encoder itself is :mod:`chatforge.data.encoder` (its speed levers, each with its
measurement: :mod:`chatforge.data.template_plans`, :mod:`chatforge.data.pretoken_cache`);
this module is the API the trainers use.

Public API:

* :func:`encode_messages`, :func:`encode_prompt`, :func:`encode_prompt_response`
  (:class:`Encoded`: ``input_ids``, ``labels``, ``turn_ends``; :func:`get_encoder` for batches)
* :func:`truncate` (policies ``turns`` and ``drop``), :class:`TokenizeStats`
* :func:`iter_examples`, :func:`pack_examples`, :func:`build_sft_examples`, :func:`collate`
"""

from __future__ import annotations

import gc
from bisect import bisect_left, bisect_right, insort
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Iterable, Iterator

from chatforge.data.encoder import IGNORE_INDEX, Encoded, Encoder, get_encoder
from chatforge.data.records import Conversation
from chatforge.errors import ConfigError, DataError

__all__ = ["IGNORE_INDEX", "Encoded", "Encoder", "get_encoder", "encode_messages", "encode_prompt",
           "encode_prompt_response", "TokenizeStats", "truncate", "iter_examples", "pack_examples",
           "build_sft_examples", "collate"]

TRUNCATION = ("turns", "drop")
MAX_ERRORS_KEPT = 20


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
                self.first_errors.extend(v[: max(0, MAX_ERRORS_KEPT - len(self.first_errors))])
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
    if src and meta.get("row") is not None:
        return f"{src} row {meta['row']}"
    return f"{src}:{line}" if src and line is not None else (src or "")


def iter_examples(records: Iterable[Any], tokenizer: Any, max_len: int, template: str = "auto",
                  train_on: str = "assistant", truncation: str = "turns", stats: TokenizeStats | None = None,
                  batch_size: int = 512, num_proc: int = 1) -> Iterator[Encoded]:
    """Stream conversations -> truncated examples, tokenising ``batch_size`` at a time.

    ``records``: :class:`Conversation` objects, ``{"messages": [...]}`` dicts or message
    lists. Counts go into ``stats`` (pass one in to read them afterwards). ``num_proc`` > 1
    encodes in that many forked worker processes (:mod:`chatforge.data.token_pool`) while
    this one keeps reading and packing; the examples are the same, in the same order.
    """
    if max_len < 2:
        raise ConfigError(f"max_len={max_len}: must be at least 2")
    if truncation not in TRUNCATION:
        raise ConfigError(f"truncation={truncation!r}: expected one of {', '.join(TRUNCATION)}")
    if num_proc < 1:
        raise ConfigError(f"num_proc={num_proc}: must be at least 1")
    encoder = get_encoder(tokenizer, template, train_on)
    stats = stats if stats is not None else TokenizeStats()
    if num_proc == 1:
        for owners, convs in _batches(records, batch_size, stats):
            yield from _account(owners, _encode_chunk(encoder, convs, max_len, truncation), stats)
        return
    from chatforge.data.token_pool import ordered_map

    batches = deque()  # owners of the chunks in flight, in order (their results come back in order)

    def chunks() -> Iterator[list[list[dict]]]:
        for owners, convs in _batches(records, batch_size, stats):
            batches.append(owners)
            yield convs

    work = partial(_encode_chunk_sendable, encoder, max_len=max_len, truncation=truncation)
    for sent in ordered_map(work, chunks(), num_proc):
        yield from _account(batches.popleft(), _received(sent), stats)


def _batches(records: Iterable[Any], batch_size: int,
             stats: TokenizeStats) -> Iterator[tuple[list[Any], list[list[dict]]]]:
    """(records, their message lists) ``batch_size`` at a time; non-conversations are counted errors."""
    owners: list[Any] = []
    convs: list[list[dict]] = []
    for rec in records:
        stats.records += 1
        try:
            convs.append(_messages_of(rec))
            owners.append(rec)
        except DataError as e:
            stats.error(_where(rec), str(e))
            continue
        if len(convs) >= batch_size:
            yield owners, convs
            owners, convs = [], []
    if convs:
        yield owners, convs


def _encode_chunk(encoder: Encoder, convs: list[list[dict]], max_len: int,
                  truncation: str) -> list[tuple[str, Encoded | None]]:
    """(status, example) per conversation: status ``ok``/``truncated``/``too_long``/``no_labels``,
    or the template's error message (example None)."""
    out: list[tuple[str, Encoded | None]] = []
    for enc in encoder.encode_many(convs):
        if isinstance(enc, Exception):
            out.append((f"chat template failed: {enc}", None))
        else:
            ex, status = truncate(enc, max_len, truncation)
            out.append((status, ex))
    return out


def _encode_chunk_sendable(encoder: Encoder, convs: list[list[dict]], max_len: int, truncation: str) -> list:
    """:func:`_encode_chunk` in a worker process: plain tuples to pickle back (see token_pool.py)."""
    return [(status,) if ex is None else (status, ex.input_ids, ex.labels, ex.turn_ends, ex.label_count())
            for status, ex in _encode_chunk(encoder, convs, max_len, truncation)]


def _received(sent: list) -> list[tuple[str, Encoded | None]]:
    return [(x[0], None) if len(x) == 1 else (x[0], Encoded(x[1], x[2], x[3], x[4])) for x in sent]


def _account(owners: list[Any], results: list[tuple[str, Encoded | None]],
             stats: TokenizeStats) -> Iterator[Encoded]:
    """Count every result into ``stats`` and yield the kept examples."""
    for rec, (status, ex) in zip(owners, results):
        if ex is None:
            if status == "too_long":
                stats.dropped_too_long += 1
            elif status == "no_labels":
                stats.dropped_no_labels += 1
            else:
                stats.error(_where(rec), status)
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


@contextmanager
def fewer_gc_passes() -> Iterator[None]:
    """Tokenising allocates millions of short-lived, acyclic lists; the cyclic collector's
    default thresholds then cost ~20% of the time for nothing. Raise them while we work."""
    before = gc.get_threshold()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def build_sft_examples(records: Iterable[Any], tokenizer: Any, max_len: int, template: str = "auto",
                       pack: bool = True, train_on: str = "assistant", truncation: str = "turns",
                       num_proc: int = 1) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """Conversations -> training examples (in memory), and what happened to each record.

    With ``pack`` the examples are packed rows (``input_ids``, ``labels``,
    ``position_ids``); otherwise one ``{input_ids, labels}`` per kept conversation.
    Feed batches of them to :func:`collate`. ``num_proc``: see :func:`iter_examples`.
    """
    stats = TokenizeStats()
    examples = iter_examples(records, tokenizer, max_len, template, train_on, truncation, stats, num_proc=num_proc)
    with fewer_gc_passes():
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

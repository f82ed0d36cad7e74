"""Continuous batching: many concurrent requests share one running decode batch.

``Engine.generate`` decodes the batch it is given and returns; a server that calls it per
request serialises them, so 16 concurrent streams get no more tokens per second than one.
Decoding is bound by reading the weights, and one decode step reads them once whatever the
batch size, so the scheduler keeps ONE running batch in a background thread and, between two
decode steps:

* drops the rows that finished (end-of-turn token, stop string, length) or were cancelled;
* admits waiting requests (FIFO): their prompts are prefilled together (left-padded, at most
  ``max_prefill_tokens`` padded tokens per round), each samples its first token from the
  prefill logits, and they join the running batch for the next step;
* runs one decode step for every running row and samples each row with its own settings.

Each request keeps its own :class:`SamplingConfig` and its own ``torch.Generator`` seeded from
``cfg.seed``: the per-step pipeline is the engine's (raw log-probs -> repetition penalty ->
n-gram ban -> temperature / top-k / top-p / min-p -> sample, :mod:`chatforge.generate.sampling`)
applied row by row, so a request's output is the same whether it ran alone, beside 15 others,
or through ``Engine.generate`` (greedy: same tokens; seeded: same draws). Text goes through the
engine's own per-row bookkeeping (:class:`~chatforge.generate.text.TextTracker`): a stream never
shows part of a stop string and the final text equals the engine's.

Two ways to hold the batch:

* **fast** (Llama-architecture models, where ``Engine`` uses
  :class:`~chatforge.generate.fast.FastLlamaDecoder`): one static KV cache, a rectangle
  ``[rows, width]`` with a shared write column. Newcomers are right-aligned so that their
  prompt ends at that column; when it reaches the end, the leading columns no row uses are
  dropped (:meth:`FastLlamaDecoder.compact`). Admitting rows copies the cache once (the rows
  are stacked along dim 0), as dropping them already did in the engine.
* **per-row** (any other causal LM): one ``HFDecoder`` (a ``DynamicCache``) per row, each step
  one forward per row. Correct for every model the engine decodes, and equal to the engine
  token for token, but a step costs ``rows`` forward passes: no batching gain, only the
  interleaving (every stream progresses, none waits for another to finish).

KV accounting (``max_kv_tokens``, in token slots of the cache; ``stats()["kv_bytes_per_token"]``
converts to bytes). A request reserves ``prompt + max_new_tokens`` slots. In the fast layout
every row is as wide as the widest reservation (one shared column), so a set of rows costs
``rows x max(prompt + max_new_tokens)``; the cache never grows beyond that (its width is capped
by the largest reservation among the running rows). Per-row caches cost the sum of the
reservations. A request is admitted only while the running rows plus it fit; one that can never
fit alone is refused at :meth:`Scheduler.submit` with :class:`PromptTooLong`.

Not done here: chunked prefill (a long prompt's prefill delays the running rows' next token by
its whole duration), prefix sharing between requests, beam search (``num_beams > 1`` is refused:
use ``Engine.generate``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import torch

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.generate.decoders import HFDecoder
from chatforge.generate.engine import Completion, Engine, _Row, eval_mode
from chatforge.generate.fast import FastLlamaDecoder
from chatforge.generate.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    banned_ngram_tokens,
    build_ngram_table,
    record_ngram,
    sample_next,
)

__all__ = ["Delta", "Handle", "PromptTooLong", "QueueFull", "RequestFailed", "Scheduler", "SchedulerClosed"]


class QueueFull(RuntimeError):
    """The waiting queue is full; ``retry_after``: an estimate (seconds, >= 1) of when a place frees."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class PromptTooLong(ChatforgeError, ValueError):
    """prompt + max_new_tokens exceeds the model's context or the scheduler's KV budget: it can never run."""


class SchedulerClosed(RuntimeError):
    """``submit`` after ``close`` (or after the decode thread died)."""


class RequestFailed(RuntimeError):
    """Decoding this request failed in the scheduler's thread; ``__cause__`` is the error there."""


@dataclass
class Delta:
    text: str  # new text since the last Delta (stop strings cut, partial stop held back)
    token_ids: list[int]  # tokens behind it (empty at a "cancelled" final event)
    logprobs: list[float] | None  # per token in token_ids when cfg.logprobs
    finish_reason: str | None  # None while running; final event: "stop" | "eos" | "length" | "cancelled"


# ---------------------------------------------------------------------------------------- handle
class Handle:
    """One submitted request: its stream of :class:`Delta` (blocking or asyncio) and its result.

    Every delta is kept, so any number of iterators (each from the start) and ``result()`` may
    be used, from any thread. ``"".join(d.text for d in handle) == handle.result().text``.
    """

    def __init__(self, request_id: str, prompt_tokens: int, scheduler: Scheduler):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.generated_tokens = 0
        self.done = False
        self.time_to_first_token: float | None = None
        self.submitted_at = time.monotonic()
        self._scheduler = scheduler
        self._cond = threading.Condition()
        self._deltas: list[Delta] = []
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.cancel_requested = False

    # -- consumer side
    def __iter__(self) -> Iterator[Delta]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._deltas) and not self.done:
                    self._cond.wait()
                if i >= len(self._deltas):
                    self._raise_if_failed()
                    return
                delta = self._deltas[i]
            i += 1
            yield delta

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Delta]:
        """Waits on a future that the decode thread resolves with ``call_soon_threadsafe``: the
        event loop never blocks."""
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            with self._cond:
                if i < len(self._deltas):
                    delta, waiter = self._deltas[i], None
                elif self.done:
                    self._raise_if_failed()
                    return
                else:
                    delta, waiter = None, loop.create_future()
                    self._async_waiters.append((loop, waiter))
            if waiter is not None:
                await waiter
                continue
            i += 1
            yield delta

    def result(self, timeout: float | None = None) -> Completion:
        """The completion once finished (waits); raises :class:`RequestFailed` if decoding failed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} not finished after {timeout} s")
            self._raise_if_failed()
            return self._completion

    def cancel(self) -> None:
        """Stop this request (e.g. its client disconnected): a waiting one is dropped at once, a
        running one leaves the batch before the next step. Its final Delta says "cancelled"."""
        self._scheduler._cancel(self)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RequestFailed(f"request {self.id} failed: {self._error!r}") from self._error

    # -- producer side (the decode thread, or cancel / close)
    def _push(self, delta: Delta, completion: Completion | None = None) -> None:
        with self._cond:
            if self.done:
                return
            self._deltas.append(delta)
            self.generated_tokens += len(delta.token_ids)
            if self.time_to_first_token is None and delta.token_ids:
                self.time_to_first_token = time.monotonic() - self.submitted_at
            if completion is not None:
                self._completion, self.done = completion, True
            self._notify()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if self.done:
                return
            self._error, self.done = error, True
            self._notify()

    def _notify(self) -> None:
        """Wake blocking iterators and asyncio ones (held lock)."""
        self._cond.notify_all()
        waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():  # a cancelled task's future stays cancelled
        fut.set_result(None)


# ---------------------------------------------------------------------------------------- a request
class _Request:
    """The decode thread's state of one request: the engine's row bookkeeping (tokens, text,
    stop strings, finish reason), its sampler (config, generator, penalty state)."""

    def __init__(self, handle: Handle, prompt: list[int], cfg: SamplingConfig, tokenizer, eos: set[int], device):
        self.handle = handle
        self.prompt = prompt
        self.cfg = cfg
        self.eos = eos
        self.tokenizer = tokenizer
        self.reserve = len(prompt) + cfg.max_new_tokens  # KV token slots it may need
        self.row = _Row(0, prompt, cfg.max_new_tokens, tokenizer, cfg.stop, live_text=True)
        self.gen = torch.Generator(device=device)
        if cfg.seed is not None:
            self.gen.manual_seed(cfg.seed)
        else:
            self.gen.seed()
        self.plain_greedy = cfg.greedy and cfg.repetition_penalty == 1.0 and not cfg.no_repeat_ngram_size
        self.seen: torch.Tensor | None = None  # [1, V] tokens of prompt + reply, for the repetition penalty
        if cfg.no_repeat_ngram_size:
            self.row.seq = list(prompt)
            self.row.ngrams = build_ngram_table(self.row.seq, cfg.no_repeat_ngram_size)
        self.pending: int | None = None  # the last sampled token, fed at the next step
        self.admitted_at = 0.0

    def pick(self, raw: torch.Tensor) -> int:
        """The next token from ``raw`` [1, V] fp32 logits, as ``Engine._decode`` picks it."""
        cfg, logits = self.cfg, raw
        if cfg.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(raw.shape, dtype=torch.bool, device=raw.device)
                self.seen[0, self.prompt] = True
            logits = apply_repetition_penalty(logits, self.seen, cfg.repetition_penalty)
        n = cfg.no_repeat_ngram_size
        if n:
            banned = banned_ngram_tokens(self.row.seq, n, self.row.ngrams)
            if banned:
                logits = logits.clone() if logits is raw else logits  # raw stays unmodified (log-probs)
                logits[0, list(banned)] = float("-inf")
        return int(sample_next(logits, cfg, self.gen)[0])

    def accept(self, token: int, logprob: float | None) -> Delta:
        """Record a sampled token; the Delta to stream (``finish_reason`` set when it ended the request)."""
        if self.seen is not None:
            self.seen[0, token] = True
        text = self.row.add(token, token in self.eos, logprob)
        n = self.cfg.no_repeat_ngram_size
        if n:
            self.row.seq.append(token)
            record_ngram(self.row.seq, n, self.row.ngrams)
        self.pending = token
        return Delta(text, [token], [logprob] if self.cfg.logprobs else None, self.row.finish_reason)

    def completion(self) -> Completion:
        return self.row.completion(self.tokenizer, self.cfg.stop, self.cfg.logprobs)

    def cancelled(self) -> tuple[Delta, Completion]:
        """The final event and result of a request stopped before it finished."""
        flush = self.row.text.finish()
        self.row.finish_reason = "cancelled"
        return Delta(flush, [], [] if self.cfg.logprobs else None, "cancelled"), self.completion()


def _cancelled_unstarted(cfg: SamplingConfig) -> tuple[Delta, Completion]:
    return (Delta("", [], [] if cfg.logprobs else None, "cancelled"),
            Completion([], "", [] if cfg.logprobs else None, "cancelled"))


# ---------------------------------------------------------------------------------------- batches
class _FastBatch:
    """The running rows in one :class:`FastLlamaDecoder` static cache (see the module docstring)."""

    name = "fast"

    def __init__(self, model, pad_id: int):
        self.dec = FastLlamaDecoder(model)
        self.pad_id = pad_id
        self.reserves: list[int] = []  # prompt + max_new_tokens per cache row

    @staticmethod
    def kv_need(reserves: list[int]) -> int:
        """Slots a set of rows may take: every row as wide as the widest (one shared column)."""
        return len(reserves) * max(reserves, default=0)

    def kv_used(self) -> int:
        return self.dec.rows * self.dec.width

    def add(self, prompts: list[list[int]], reserves: list[int]) -> torch.Tensor:
        logits, new = self.dec.prefill_rows(prompts, self.pad_id)
        widest = max(self.reserves + reserves)
        self.dec.add_rows(new, max_width=widest, max_position=widest)
        self.reserves += reserves
        return logits

    def step(self, tokens: list[int]) -> torch.Tensor:
        if self.dec.length >= self.dec.width:
            self.dec.compact(max_width=max(self.reserves))
        return self.dec.step(torch.tensor(tokens, device=self.dec.device))

    def keep(self, rows: list[int]) -> None:
        if not rows:
            self.reset()
            return
        self.dec.keep(torch.tensor(rows, device=self.dec.device))
        self.reserves = [self.reserves[j] for j in rows]

    def reset(self) -> None:
        self.dec.clear()
        self.reserves = []


class _PerRowBatch:
    """Fallback for models the fast decoder does not run: one ``HFDecoder`` (its own
    ``DynamicCache``) per row, one forward per row per step."""

    name = "per-row"

    def __init__(self, model, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.rows: list[tuple[HFDecoder, list[int]]] = []  # decoder, [tokens in its cache]

    @staticmethod
    def kv_need(reserves: list[int]) -> int:
        return sum(reserves)

    def kv_used(self) -> int:
        return sum(n[0] for _, n in self.rows)

    def add(self, prompts: list[list[int]], reserves: list[int]) -> torch.Tensor:
        logits, rows = [], []
        for p in prompts:
            dec = HFDecoder(self.model)
            logits.append(dec.prefill([p], self.pad_id, 1))
            rows.append((dec, [len(p)]))
        self.rows += rows  # all or none: a failed prefill leaves the batch as it was
        return torch.cat(logits)

    def step(self, tokens: list[int]) -> torch.Tensor:
        out = []
        for (dec, n), t in zip(self.rows, tokens):
            out.append(dec.step(torch.tensor([t], device=dec.device)))
            n[0] += 1
        return torch.cat(out)

    def keep(self, rows: list[int]) -> None:
        self.rows = [self.rows[j] for j in rows]

    def reset(self) -> None:
        self.rows = []


# ---------------------------------------------------------------------------------------- scheduler
class Scheduler:
    """Continuous batching over ``engine``'s model, tokenizer and end-of-turn ids.

    ``max_batch``: rows decoded together; ``max_queue``: requests waiting to be admitted
    (``submit`` raises :class:`QueueFull` beyond); ``max_kv_tokens``: KV cache slots (see the
    module docstring; default ``max_batch x`` the model's context, which never holds a request
    back); ``max_prefill_tokens``: padded prompt tokens prefilled in one round between two steps
    (a lone prompt above it is prefilled alone), which bounds how long the running rows wait.
    The fast layout is used when the engine's decoder is the fast one.
    """

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 64, max_kv_tokens: int | None = None,
                 max_prefill_tokens: int = 2048):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue),
                            ("max_prefill_tokens", max_prefill_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")
        if max_kv_tokens is not None and (not isinstance(max_kv_tokens, int) or max_kv_tokens < 2):
            raise ConfigError(f"max_kv_tokens: must be an integer >= 2 or None, got {max_kv_tokens!r}")
        self.engine = engine
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.kv_tokens_max = max_kv_tokens if max_kv_tokens is not None else max_batch * engine.max_context
        model = engine.model
        batch_type = _FastBatch if isinstance(engine.decoder, FastLlamaDecoder) else _PerRowBatch
        self._batch = batch_type(model, engine.pad_token_id)
        self._eos = set(engine.eos_token_ids)
        self._vocab = model.get_input_embeddings().num_embeddings
        self._kv_bytes = _kv_bytes_per_token(model)
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._rows: list[_Request] = []  # the running batch, aligned with the cache rows (decode thread only)
        self._admitting: list[_Request] = []  # out of the queue, not yet in the batch (under the lock)
        self._closing = False
        self._dead: BaseException | None = None
        self._ids = itertools.count(1)
        self._service_s = 1.0  # moving average of admission -> finish, for retry_after
        self._stats = dict(running=0, kv_tokens_used=0, requests_total=0, prompt_tokens_total=0,
                           generated_tokens_total=0, steps_total=0)
        self._thread = threading.Thread(target=self._run, name="chatforge-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def submit(self, prompt: list[int], cfg: SamplingConfig) -> Handle:
        """Queue a request; returns at once. Raises :class:`PromptTooLong`, :class:`QueueFull`,
        :class:`SchedulerClosed`, ``ConfigError`` (bad settings, beam search)."""
        cfg = cfg.validate().replace(stop=list(cfg.stop))  # the caller may change its config afterwards
        if cfg.num_beams > 1:
            raise ConfigError("num_beams > 1: the scheduler does not run beam search (use Engine.generate)")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ChatforgeError("the prompt is empty: at least one token is needed")
        bad = [t for t in prompt if not 0 <= t < self._vocab]
        if bad:
            raise ChatforgeError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{self._vocab - 1})")
        need = len(prompt) + cfg.max_new_tokens
        if need > self.engine.max_context:
            raise PromptTooLong(f"prompt of {len(prompt)} tokens + max_new_tokens {cfg.max_new_tokens} = {need} "
                                f"tokens: the model's context is {self.engine.max_context}")
        if self._batch.kv_need([need]) > self.kv_tokens_max:
            raise PromptTooLong(f"prompt of {len(prompt)} tokens + max_new_tokens {cfg.max_new_tokens} = {need} "
                                f"KV tokens: the scheduler's max_kv_tokens is {self.kv_tokens_max}")
        handle = Handle(f"req-{next(self._ids)}", len(prompt), self)
        req = _Request(handle, prompt, cfg, self.engine.tokenizer, self._eos, self.engine.device)
        with self._lock:
            if self._dead is not None:
                raise SchedulerClosed(f"the scheduler's decode thread failed: {self._dead!r}")
            if self._closing:
                raise SchedulerClosed("the scheduler is closed: it accepts no new requests")
            if len(self._waiting) >= self.max_queue:
                retry = max(1.0, self._service_s / max(1, self._stats["running"]))
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue {self.max_queue}): "
                                f"retry in about {retry:.0f} s", retry)
            self._waiting.append(req)
            self._stats["requests_total"] += 1
            self._stats["prompt_tokens_total"] += len(prompt)
            self._lock.notify_all()
        return handle

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats, waiting=len(self._waiting), max_batch=self.max_batch, max_queue=self.max_queue,
                        kv_tokens_max=self.kv_tokens_max, kv_bytes_per_token=self._kv_bytes, layout=self._batch.name)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; ``drain``: finish the running and queued ones first (for at
        most ``timeout`` seconds, then the rest is cancelled), else cancel them. Joins the thread."""
        with self._lock:
            self._closing = True
            if not drain:
                self._cancel_all()
            self._lock.notify_all()
        if threading.current_thread() is self._thread:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                self._cancel_all()
                self._lock.notify_all()
            self._thread.join()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=exc[0] is None)

    # ------------------------------------------------------------------ cancellation
    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            for req in self._waiting:
                if req.handle is handle:
                    self._waiting.remove(req)
                    handle._push(*_cancelled_unstarted(req.cfg))
                    return
            handle.cancel_requested = True  # running (or finished: then nothing happens)
            self._lock.notify_all()

    def _cancel_all(self) -> None:
        """(held lock) Every queued request ends now, every running one at the next step."""
        while self._waiting:
            req = self._waiting.popleft()
            req.handle._push(*_cancelled_unstarted(req.cfg))
        for req in [*self._rows, *self._admitting]:
            req.handle.cancel_requested = True

    # ------------------------------------------------------------------ the decode thread
    def _run(self) -> None:
        try:
            while True:
                cancelled = [j for j, r in enumerate(self._rows) if r.handle.cancel_requested]
                if cancelled:
                    with self._decoding():
                        self._drop(cancelled, cancelled=True)
                newcomers = self._next_admissions()
                if newcomers is None:
                    return
                with self._decoding():
                    if newcomers:
                        self._admit(newcomers)
                    if self._rows:
                        self._step()
        except BaseException as e:  # a bug in the loop itself: nobody may hang on it
            with self._lock:
                self._dead = e
                stranded = [r.handle for r in self._rows] + [r.handle for r in self._waiting]
                self._waiting.clear()
            for h in stranded:
                h._fail(e)
            self._rows = []
            raise

    @contextlib.contextmanager
    def _decoding(self) -> Iterator[None]:
        """Tensor work of one round: dropout off, no autograd (never held while idle)."""
        with eval_mode(self.engine.model), torch.inference_mode():
            yield

    def _next_admissions(self) -> list[_Request] | None:
        """The waiting requests that join now (FIFO: the head waits until it fits, nobody
        overtakes it); blocks while there is nothing to do; None: closed and drained."""
        with self._lock:
            while not self._rows and not self._waiting:
                if self._closing:
                    return None
                self._lock.wait()
            picked: list[_Request] = []
            reserves = [r.reserve for r in self._rows]
            longest = 0
            while self._waiting and len(self._rows) + len(picked) < self.max_batch:
                head = self._waiting[0]
                if head.handle.cancel_requested:  # cancelled by close(drain=False) racing with admission
                    self._waiting.popleft()
                    head.handle._push(*_cancelled_unstarted(head.cfg))
                    continue
                if self._batch.kv_need(reserves + [head.reserve]) > self.kv_tokens_max:
                    break
                padded = (len(picked) + 1) * max(longest, len(head.prompt))
                if picked and padded > self.max_prefill_tokens:
                    break
                picked.append(self._waiting.popleft())
                reserves.append(head.reserve)
                longest = max(longest, len(head.prompt))
            self._admitting = picked
            return picked

    def _admit(self, newcomers: list[_Request]) -> None:
        """Prefill the newcomers together, sample their first tokens, add them to the batch."""
        before = len(self._rows)
        try:
            logits = self._batch.add([r.prompt for r in newcomers], [r.reserve for r in newcomers])
        except Exception as e:
            with self._lock:
                self._admitting = []
            self._fail_rows(newcomers, e)
            if self._batch_rows() != before:  # the running cache may be half-changed: start afresh
                self._fail_rows(self._rows, e)
                self._rows = []
                self._batch.reset()
            return
        now = time.monotonic()
        for r in newcomers:
            r.admitted_at = now
        with self._lock:
            self._rows = self._rows + newcomers
            self._admitting = []
        self._sample(list(range(before, len(self._rows))), logits)

    def _step(self) -> None:
        """One decode step of every running row."""
        try:
            logits = self._batch.step([r.pending for r in self._rows])
        except Exception as e:  # the whole batch shared the forward: every row failed
            self._fail_rows(self._rows, e)
            self._rows = []
            self._batch.reset()
            return
        with self._lock:
            self._stats["steps_total"] += 1
        self._sample(list(range(len(self._rows))), logits)

    def _sample(self, rows: list[int], logits: torch.Tensor) -> None:
        """Pick, record and stream the next token of ``self._rows[rows]`` from ``logits`` [len(rows), V];
        finished or failed rows leave the batch."""
        reqs = [self._rows[j] for j in rows]
        raw = logits.float()
        tokens: list[int | None] = [None] * len(reqs)
        plain = [i for i, r in enumerate(reqs) if r.plain_greedy]
        if plain:
            best = (raw if len(plain) == len(reqs) else raw[plain]).argmax(-1).tolist()
            for i, t in zip(plain, best):
                tokens[i] = t
        failed: dict[int, BaseException] = {}
        for i, r in enumerate(reqs):
            if tokens[i] is None:
                try:
                    tokens[i] = r.pick(raw[i:i + 1])
                except Exception as e:  # e.g. NaN probabilities: this row only
                    failed[i] = e
        lps: dict[int, float] = {}
        want = [i for i, r in enumerate(reqs) if r.cfg.logprobs and i not in failed]
        if want:
            picked = torch.tensor([tokens[i] for i in want], device=raw.device)
            values = torch.log_softmax(raw[want], -1).gather(-1, picked[:, None])[:, 0].tolist()
            lps = dict(zip(want, values))
        leave, ends, generated = [], [], 0
        for i, r in enumerate(reqs):
            if i not in failed:
                try:
                    delta = r.accept(tokens[i], lps.get(i))
                    generated += 1
                    if delta.finish_reason is None:
                        r.handle._push(delta)
                        continue
                    ends.append((r, delta, r.completion()))
                except Exception as e:  # e.g. the tokenizer failed on this row's text
                    failed[i] = e
            leave.append(rows[i])
        with self._lock:
            self._stats["generated_tokens_total"] += generated
        self._drop(leave, cancelled=False)  # first: who sees a request end sees its slot free
        now = time.monotonic()
        for r, delta, completion in ends:
            r.handle._push(delta, completion)
            self._service_s = 0.8 * self._service_s + 0.2 * (now - r.admitted_at)
        for i, e in failed.items():
            reqs[i].handle._fail(e)

    def _drop(self, rows: list[int], cancelled: bool) -> None:
        """Take ``self._rows[rows]`` out of the batch; ``cancelled``: end their streams first."""
        if not rows:
            self._update_stats()
            return
        gone = set(rows)
        if cancelled:
            for j in rows:
                self._rows[j].handle._push(*self._rows[j].cancelled())
        keep = [j for j in range(len(self._rows)) if j not in gone]
        self._batch.keep(keep)
        self._rows = [self._rows[j] for j in keep]
        self._update_stats()

    def _fail_rows(self, reqs: list[_Request], error: BaseException) -> None:
        for r in reqs:
            r.handle._fail(error)

    def _batch_rows(self) -> int:
        b = self._batch
        return b.dec.rows if isinstance(b, _FastBatch) else len(b.rows)

    def _update_stats(self) -> None:
        with self._lock:
            self._stats["running"] = len(self._rows)
            self._stats["kv_tokens_used"] = self._batch.kv_used() if self._rows else 0


def _kv_bytes_per_token(model) -> int:
    """Bytes of K and V one token takes in the cache (all layers), from the model's config."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not (layers and heads and hidden):
        return 0
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    itemsize = next(model.parameters()).element_size()
    return 2 * layers * kv * head_dim * itemsize

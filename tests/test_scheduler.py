"""The continuous-batching scheduler: a request's output does not depend on who else runs
(greedy: same tokens alone, beside 15 others arriving at different times, and through
``Engine.generate``), per-request sampling, text and log-probs as the engine's, the bounds
(batch, queue, KV budget), cancel / close / errors, asyncio streaming, the per-row fallback.

A random tiny model with large weights gives varied, decisive greedy outputs; a steered one
(``chatforge.models.tiny.steer``) gives printable endless replies where the text matters."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from chatforge.errors import ConfigError
from chatforge.generate.engine import Engine, SamplingConfig
from chatforge.generate.fast import unsupported_reason
from chatforge.generate.scheduler import (
    PromptTooLong,
    QueueFull,
    RequestFailed,
    Scheduler,
    SchedulerClosed,
)
from chatforge.models.tiny import spicy_tiny, steer, tiny_model, tiny_tokenizer, word_token_ids

pytestmark = pytest.mark.timeout(120)  # a scheduler bug must fail, not hang the suite

EOS = 2  # <|im_end|> of the tiny tokenizer

TEXTS = ["The sky is blue. What colour is the grass?", "Hello", "Give three tips for staying healthy, please.",
         "2 + 2 = 4", "Once upon a time there was a little robot who wanted to learn to talk. It read many books.",
         "Tell me a joke about cats.", "Yes.", "Please explain photosynthesis in simple words.",
         "apple banana cherry", "Monday Tuesday", "What is 3 * 7?", "Translate the sentence into French.",
         "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again.",
         "hot cold", "Write a short poem about the sea.", "Sorry, I cannot help with that."]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def engine(tok):
    return Engine(spicy_tiny(), tok, eos_token_ids=[EOS])


@pytest.fixture(scope="module")
def chatty(tok):
    """Letters only, never an end-of-turn token: replies are printable and run to max_new_tokens."""
    never = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return Engine(steer(tiny_model(), prefer=word_token_ids(tok), never=never).eval(), tok, eos_token_ids=[EOS])


def consume(handle, n: int) -> None:
    """Wait until ``handle`` has streamed ``n`` deltas (or finished)."""
    for _, _ in zip(range(n), handle):
        pass


def greedy(n: int) -> SamplingConfig:
    return SamplingConfig(temperature=0, max_new_tokens=n)


# ---------------------------------------------------------------- a request's output does not depend on the others
def test_greedy_alone_equals_16_staggered_and_engine(engine, tok):
    prompts = [tok.encode(t) for t in TEXTS]
    cfgs = [greedy(20 + 7 * (i % 7)) for i in range(16)]  # rows leave at different steps, some run > 32 steps
    ref = [engine.generate([p], c)[0] for p, c in zip(prompts, cfgs)]
    with Scheduler(engine, max_batch=1) as alone:
        solo = [alone.submit(p, c).result() for p, c in zip(prompts, cfgs)]
    with Scheduler(engine, max_batch=16) as s:
        compactions, inserts, sizes = [], [], []
        dec = s._batch.dec
        compact, add_rows, step = dec.compact, dec.add_rows, dec.step
        dec.compact = lambda *a, **k: (compactions.append(dec.length), compact(*a, **k))[1]
        dec.add_rows = lambda new, **k: (inserts.append((dec.length, new.mask.shape[1])), add_rows(new, **k))[1]
        dec.step = lambda t: (sizes.append(len(t)), step(t))[1]
        handles = []
        for i, (p, c) in enumerate(zip(prompts, cfgs)):
            if handles:
                consume(handles[-1], 1 + i % 4)  # the next one arrives while the others are mid-reply
            handles.append(s.submit(p, c))
        batched = [h.result() for h in handles]
        stats = s.stats()
    for r, a, b in zip(ref, solo, batched):
        assert a.token_ids == r.token_ids == b.token_ids
        assert a.text == r.text == b.text and a.finish_reason == r.finish_reason == b.finish_reason
    assert compactions  # the shared column reached the end and dead columns were dropped
    assert any(L > col > 0 for col, L in inserts) and any(0 < L < col for col, L in inserts)  # shifted / not
    assert max(sizes) >= 8  # many rows really decoded together
    assert stats["requests_total"] == 16 and stats["running"] == 0 and stats["kv_tokens_used"] == 0
    assert stats["generated_tokens_total"] == sum(len(c.token_ids) for c in batched)
    assert stats["prompt_tokens_total"] == sum(map(len, prompts)) and stats["layout"] == "fast"


def test_per_row_settings_equal_the_engine_and_seeds_reproduce(engine, tok):
    """Every row its own sampler: each equals Engine.generate of that prompt with that config."""
    p = [tok.encode(t) for t in TEXTS[:8]]
    cfgs = [SamplingConfig(temperature=0, max_new_tokens=15),
            SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=15, seed=1),
            SamplingConfig(temperature=0.7, top_k=5, max_new_tokens=12, seed=2),
            SamplingConfig(temperature=0, repetition_penalty=1.5, max_new_tokens=15),
            SamplingConfig(temperature=0, no_repeat_ngram_size=2, max_new_tokens=15),
            SamplingConfig(temperature=1.2, min_p=0.2, max_new_tokens=10, seed=3),
            SamplingConfig(temperature=0.9, repetition_penalty=1.3, no_repeat_ngram_size=3, max_new_tokens=15, seed=4),
            SamplingConfig(temperature=1.0, max_new_tokens=15, seed=1)]
    with Scheduler(engine) as s:
        first = [h.result() for h in [s.submit(q, c) for q, c in zip(p, cfgs)]]
        again = [h.result() for h in [s.submit(q, c) for q, c in zip(p, cfgs)]]
        reseeded = s.submit(p[1], cfgs[1].replace(seed=99)).result()
    for q, c, a, b in zip(p, cfgs, first, again):
        assert a.token_ids == b.token_ids == engine.generate([q], c)[0].token_ids, c
    assert reseeded.token_ids != first[1].token_ids


def test_stop_strings_and_max_tokens_per_row(chatty, tok):
    prompts = [tok.encode(t) for t in TEXTS[:4]]
    texts = [c.text for c in chatty.generate(prompts, greedy(24))]
    stops = [[texts[0][5:8]], [], ["no such text", texts[2][3:6]], []]
    cfgs = [SamplingConfig(temperature=0, max_new_tokens=24, stop=stops[0]), greedy(3),
            SamplingConfig(temperature=0, max_new_tokens=24, stop=stops[2]), greedy(24)]
    with Scheduler(chatty) as s:
        handles = [s.submit(q, c) for q, c in zip(prompts, cfgs)]
        streams = [list(h) for h in handles]
        results = [h.result() for h in handles]
    for q, c, deltas, res in zip(prompts, cfgs, streams, results):
        ref = chatty.generate([q], c)[0]
        assert (res.text, res.token_ids, res.finish_reason) == (ref.text, ref.token_ids, ref.finish_reason)
        shown = ""
        for d in deltas:  # the stream only ever shows a prefix of the final text: no stop string leaks
            shown += d.text
            assert res.text.startswith(shown)
        assert shown == res.text and sum((d.token_ids for d in deltas), []) == res.token_ids
        assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
        assert deltas[-1].finish_reason == res.finish_reason
    assert [r.finish_reason for r in results] == ["stop", "length", "stop", "length"]
    assert len(results[1].token_ids) == 3 and results[0].text == texts[0][:texts[0].index(stops[0][0])]


def test_logprobs_are_the_raw_distribution(engine, tok):
    prompts = [tok.encode(t) for t in TEXTS[:3]]
    cfg = SamplingConfig(temperature=0.8, top_k=20, repetition_penalty=1.3, max_new_tokens=12, seed=5, logprobs=True)
    with Scheduler(engine) as s:
        handles = [s.submit(p, cfg) for p in prompts] + [s.submit(prompts[0], cfg.replace(logprobs=False))]
        results = [h.result() for h in handles]
        streamed = [sum((d.logprobs for d in h), []) for h in handles[:3]]
    for p, c, lps in zip(prompts, results, streamed):
        assert len(c.logprobs) == len(c.token_ids) and lps == c.logprobs
        assert c.logprobs == pytest.approx(engine.score([p], [c.token_ids])[0], abs=1e-4)
    assert results[0].logprobs == pytest.approx(engine.generate(prompts[:1], cfg)[0].logprobs, abs=1e-5)
    assert results[3].logprobs is None and all(d.logprobs is None for d in handles[3])


# ---------------------------------------------------------------- bounds
def test_cancel_frees_the_slot(chatty, tok):
    p = tok.encode("Hello")
    with Scheduler(chatty, max_batch=1) as s:
        long = s.submit(p, greedy(1500))
        consume(long, 2)
        waiting = s.submit(p, greedy(5))
        queued_behind = s.submit(p, greedy(5))
        assert s.stats()["running"] == 1 and s.stats()["waiting"] == 2
        queued_behind.cancel()  # a waiting request ends at once, without a token
        gone = queued_behind.result(timeout=5)
        assert gone.finish_reason == "cancelled" and gone.token_ids == [] and s.stats()["waiting"] == 1
        long.cancel()
        res = long.result(timeout=30)
        assert res.finish_reason == "cancelled" and 2 <= len(res.token_ids) < 1500
        assert "".join(d.text for d in long) == res.text and list(long)[-1].finish_reason == "cancelled"
        assert waiting.result(timeout=30).finish_reason == "length"  # it got the freed slot
        assert waiting.time_to_first_token is not None and waiting.time_to_first_token > 0


def test_queue_full_prompt_too_long_and_beams(chatty, tok):
    p = tok.encode("Hello")
    with Scheduler(chatty, max_batch=1, max_queue=1, max_kv_tokens=200) as s:
        with pytest.raises(PromptTooLong, match=r"2000.*100.*2100.*2048"):
            s.submit([5] * 2000, greedy(100))
        with pytest.raises(PromptTooLong, match=r"150.*60.*210.*max_kv_tokens is 200"):
            s.submit([5] * 150, greedy(60))
        with pytest.raises(ConfigError, match="beam"):
            s.submit(p, SamplingConfig(num_beams=2))
        running = s.submit(p, greedy(150))
        consume(running, 1)
        s.submit(p, greedy(5))
        with pytest.raises(QueueFull) as e:
            s.submit(p, greedy(5))
        assert e.value.retry_after >= 1
        running.cancel()


def test_kv_budget_holds_requests_back(chatty, tok):
    """Fast layout: rows x the widest reservation <= max_kv_tokens at every step; the rest waits."""
    p = tok.encode("Hello")  # 1 token + 29 new = 30 slots per request: two fit in 64, three do not
    with Scheduler(chatty, max_batch=8, max_kv_tokens=64) as s:
        seen = []
        step = s._batch.step
        s._batch.step = lambda t: (seen.append((len(t), s._batch.kv_used())), step(t))[1]
        results = [h.result() for h in [s.submit(p, greedy(29)) for _ in range(5)]]
    assert all(r.finish_reason == "length" for r in results)
    assert max(rows for rows, _ in seen) == 2 and max(kv for _, kv in seen) <= 64


def test_close_drains_or_cancels(chatty, tok):
    p = tok.encode("Hello")
    s = Scheduler(chatty, max_batch=2)
    handles = [s.submit(p, greedy(10 + i)) for i in range(5)]
    s.close(drain=True)
    assert [len(h.result(timeout=0).token_ids) for h in handles] == [10, 11, 12, 13, 14]
    with pytest.raises(SchedulerClosed, match="closed"):
        s.submit(p, greedy(3))
    s = Scheduler(chatty, max_batch=1)
    handles = [s.submit(p, greedy(1500)) for _ in range(3)]
    consume(handles[0], 1)
    s.close(drain=False)
    assert [h.result(timeout=0).finish_reason for h in handles] == ["cancelled"] * 3
    assert not s._thread.is_alive()


def test_errors_reach_every_affected_handle_and_serving_goes_on(chatty, tok):
    p = tok.encode("Hello")
    with Scheduler(chatty) as s:
        step, calls = s._batch.step, []

        def failing_once(tokens):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom")
            return step(tokens)

        s._batch.step = failing_once
        handles = [s.submit(p, greedy(20)) for _ in range(3)]
        for h in handles:
            with pytest.raises(RequestFailed, match="boom"):
                h.result(timeout=30)
            with pytest.raises(RequestFailed):
                list(h)
        assert s.submit(p, greedy(6)).result(timeout=30).token_ids == chatty.generate([p], greedy(6))[0].token_ids


# ---------------------------------------------------------------- asyncio
def test_async_iteration_does_not_block_the_loop(chatty, tok):
    p = tok.encode("Hello")

    async def main(s: Scheduler):
        ticks = [0]
        done = asyncio.Event()

        async def heartbeat():
            while not done.is_set():
                ticks[0] += 1
                await asyncio.sleep(0.001)

        async def collect(h):
            out = []
            async for d in h:
                if not out:
                    out.append(ticks[0])  # ticks seen when the first delta arrived
                out.append(d)
            return out

        beat = asyncio.create_task(heartbeat())
        first = s.submit(p, greedy(40))
        second = s.submit(tok.encode("Tell me"), greedy(8))  # waits for the only slot
        a, b = await asyncio.gather(collect(first), collect(second))
        done.set()
        await beat
        return first, a, second, b

    with Scheduler(chatty, max_batch=1) as s:
        first, a, second, b = asyncio.run(main(s))
    assert b[0] > 0  # the loop kept running while the second request waited
    assert "".join(d.text for d in a[1:]) == first.result().text
    assert [d.token_ids[0] for d in b[1:]] == second.result().token_ids


def test_handles_from_many_threads(chatty, tok):
    p = [tok.encode(t) for t in TEXTS[:6]]
    out = {}
    with Scheduler(chatty, max_batch=4) as s:
        def worker(i):
            out[i] = s.submit(p[i], greedy(8 + i)).result()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(6):
        assert out[i].token_ids == chatty.generate([p[i]], greedy(8 + i))[0].token_ids


# ---------------------------------------------------------------- models the fast decoder does not run
def tiny_gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=EOS,
                     eos_token_id=EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
        with torch.no_grad():
            for prm in model.parameters():
                if prm.dim() == 2:
                    prm.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama-fast-off"])
def test_per_row_fallback(tok, kind):
    if kind == "gpt2":
        model = tiny_gpt2(tok)
        assert unsupported_reason(model) is not None
        engine = Engine(model, tok, eos_token_ids=[EOS])
    else:
        engine = Engine(spicy_tiny(), tok, eos_token_ids=[EOS], fast=False)
    prompts = [tok.encode(t) for t in TEXTS[:6]]
    cfgs = [greedy(12 + i) for i in range(5)] + [SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)]
    with Scheduler(engine, max_batch=4) as s:
        assert s.stats()["layout"] == "per-row"
        handles = []
        for p, c in zip(prompts, cfgs):
            if handles:
                consume(handles[-1], 2)
            handles.append(s.submit(p, c))
        results = [h.result() for h in handles]
        with pytest.raises(PromptTooLong, match="context is 256" if kind == "gpt2" else "context is 2048"):
            s.submit([5] * 250 if kind == "gpt2" else [5] * 2040, greedy(10))
    for p, c, r in zip(prompts, cfgs, results):
        ref = engine.generate([p], c)[0]
        assert (r.token_ids, r.text, r.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)

"""The decoding engine: equality with ``transformers.generate``, batching, sampling, stops,
streaming, log-probs. A random tiny model with larger-than-default weights gives varied
greedy outputs (the default init makes it repeat one token); a scripted model that emits a
fixed token sequence tests text handling (stop strings, UTF-8) exactly."""

from __future__ import annotations

import types

import pytest
import torch

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.generate.engine import Engine, SamplingConfig
from chatforge.generate.text import Detokenizer, TextTracker, partial_stop_len
from chatforge.models.tiny import spicy_tiny, tiny_model, tiny_tokenizer

EOS = 2  # <|im_end|> of the tiny tokenizer (its generation_config eos)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return spicy_tiny()


def hf_greedy(model, prompt: list[int], n: int, **kw) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


PROMPTS = ["The sky is blue. What colour is the grass?", "Hello", "Give three tips for staying healthy, please.",
           "2 + 2 = 4"]


# ---------------------------------------------------------------- equality with generate
@pytest.mark.parametrize("fast", [False, True])
def test_greedy_matches_generate(model, tok, fast):
    eng = Engine(model, tok, eos_token_ids=[EOS], fast=fast)
    for text in PROMPTS:
        p = tok.encode(text)
        ref = hf_greedy(model, p, 30)
        got = eng.generate([p], SamplingConfig(temperature=0, max_new_tokens=30))[0]
        assert got.token_ids == ref
        assert got.finish_reason == ("eos" if ref[-1] == EOS else "length")


def test_greedy_matches_generate_with_penalties(tok):
    model = spicy_tiny(std=0.1)  # this one loops on a token: penalties matter
    eng = Engine(model, tok, eos_token_ids=[EOS])
    p = tok.encode(PROMPTS[0])
    plain = eng.generate([p], SamplingConfig(temperature=0, max_new_tokens=30))[0].token_ids
    for kw in ({"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}, {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3}):
        got = eng.generate([p], SamplingConfig(temperature=0, max_new_tokens=30, **kw))[0].token_ids
        assert got == hf_greedy(model, p, 30, **kw), kw
        assert got != plain
    seq = p + eng.generate([p], SamplingConfig(temperature=0, max_new_tokens=30, no_repeat_ngram_size=2))[0].token_ids
    bigrams = list(zip(seq, seq[1:]))
    assert len(bigrams) == len(set(bigrams))


@pytest.mark.parametrize("fast", [False, True])
def test_batch_of_mixed_lengths_equals_one_by_one(model, tok, fast):
    eng = Engine(model, tok, eos_token_ids=[EOS], fast=fast)
    prompts = [tok.encode(t) for t in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    cfg = SamplingConfig(temperature=0, max_new_tokens=25)
    batch = eng.generate(prompts, cfg)
    for p, b in zip(prompts, batch):
        assert b.token_ids == eng.generate([p], cfg)[0].token_ids


def test_finished_rows_leave_the_batch(model, tok):
    """Rows that finish early stop being decoded; the others continue unchanged."""
    eng = Engine(model, tok, eos_token_ids=[EOS])
    prompts = [tok.encode(t) for t in PROMPTS]
    sizes = []
    step = eng.decoder.step
    eng.decoder.step = lambda t: (sizes.append(len(t)), step(t))[1]
    short = SamplingConfig(temperature=0, max_new_tokens=5)
    out = eng.generate(prompts, short)
    assert all(len(c.token_ids) == 5 for c in out)
    assert sizes == [4] * 4
    sizes.clear()
    # a stop string that only some rows hit
    texts = [c.text for c in eng.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=12))]
    stop = texts[0][2:4]
    out = eng.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=12, stop=[stop]))
    assert out[0].finish_reason == "stop" and out[0].text == texts[0][:texts[0].index(stop)]
    assert min(sizes) < max(sizes)


@pytest.mark.parametrize("fast", [False, True])
def test_peft_wrapped_model(model, tok, fast):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(spicy_tiny(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                              lora_alpha=8))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a non-trivial adapter
    eng = Engine(lora, tok, eos_token_ids=[EOS], fast=fast)
    assert type(eng.decoder).__name__ == ("FastLlamaDecoder" if fast else "HFDecoder")
    p = tok.encode(PROMPTS[0])
    cfg = SamplingConfig(temperature=0, max_new_tokens=20, logprobs=True)
    got = eng.generate([p], cfg)[0]
    assert got.token_ids == hf_greedy(lora, p, 20)
    assert got.token_ids != hf_greedy(model, p, 20)
    assert got.logprobs == pytest.approx(eng.score([p], [got.token_ids])[0], abs=1e-4)
    with lora.disable_adapter():  # PPO's reference = adapter off
        assert eng.generate([p], cfg)[0].token_ids == hf_greedy(model, p, 20)


def test_fast_decoder_refuses_what_it_cannot_replay(tok):
    peft = pytest.importorskip("peft")
    dora = peft.get_peft_model(spicy_tiny(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert type(Engine(dora, tok).decoder).__name__ == "HFDecoder"
    with pytest.raises(ConfigError, match="DoRA"):
        Engine(dora, tok, fast=True)


# ---------------------------------------------------------------- sampling
def test_seed_reproducible_and_top_k_1_is_greedy(model, tok):
    eng = Engine(model, tok, eos_token_ids=[EOS])
    prompts = [tok.encode(t) for t in PROMPTS[:2]]
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=123)
    a = [c.token_ids for c in eng.generate(prompts, cfg)]
    b = [c.token_ids for c in eng.generate(prompts, cfg)]
    c = [c.token_ids for c in eng.generate(prompts, cfg.replace(seed=124))]
    assert a == b and a != c
    greedy = eng.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=20))
    top1 = eng.generate(prompts, SamplingConfig(temperature=1.3, top_k=1, max_new_tokens=20))
    assert [g.token_ids for g in greedy] == [t.token_ids for t in top1]


def test_filters_restrict_the_support(model, tok):
    """top-k / top-p / min-p only ever sample tokens inside their set (checked against the raw logits)."""
    eng = Engine(model, tok, eos_token_ids=[EOS])
    p = tok.encode(PROMPTS[2])
    for kw in ({"top_k": 3}, {"top_p": 0.3}, {"min_p": 0.5}):
        c = eng.generate([p], SamplingConfig(max_new_tokens=12, seed=0, logprobs=True, **kw))[0]
        seq = p + c.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, len(p) - 1:-1]
        probs = logits.softmax(-1)
        for t, row in zip(c.token_ids, probs):
            order = row.argsort(descending=True).tolist()
            if "top_k" in kw:
                assert t in order[:3]
            elif "top_p" in kw:
                before = row[order[:order.index(t)]].sum()
                assert before < 0.3 + 1e-5
            else:
                assert row[t] >= 0.5 * row.max() - 1e-6


def test_logprobs_are_the_raw_model_distribution(model, tok):
    eng = Engine(model, tok, eos_token_ids=[EOS])
    prompts = [tok.encode(t) for t in PROMPTS]
    cfg = SamplingConfig(temperature=0.7, top_k=20, repetition_penalty=1.3, max_new_tokens=15, seed=5, logprobs=True)
    ngram = SamplingConfig(temperature=0, no_repeat_ngram_size=1, max_new_tokens=15, logprobs=True)  # bans in place
    out = eng.generate(prompts, cfg) + eng.generate(prompts, ngram)
    for p, c in zip(prompts + prompts, out):
        assert len(c.logprobs) == len(c.token_ids)
        with torch.no_grad():
            logits = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1]
        ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)
        assert c.logprobs == pytest.approx(eng.score([p], [c.token_ids])[0], abs=1e-4)
    assert eng.generate(prompts[:1], cfg.replace(logprobs=False))[0].logprobs is None


def test_training_mode_is_restored(tok):
    model = spicy_tiny().train()
    Engine(model, tok).generate([tok.encode("hi")], SamplingConfig(max_new_tokens=3))
    assert model.training


def test_sampling_config_validation():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=-1)
    assert SamplingConfig(stop="###").stop == ["###"]


def test_prompt_longer_than_context(model, tok):
    eng = Engine(model, tok)
    with pytest.raises(ChatforgeError, match="context"):
        eng.generate([[5] * 3000], SamplingConfig(max_new_tokens=4))
    c = eng.generate([[5] * 2040], SamplingConfig(max_new_tokens=50, temperature=0))[0]
    assert len(c.token_ids) <= 8


def test_beam_search_matches_generate(model, tok):
    eng = Engine(model, tok, eos_token_ids=[EOS])
    p = tok.encode(PROMPTS[0])
    for lp in (1.0, -0.5):
        got = eng.generate([p], SamplingConfig(num_beams=3, length_penalty=lp, max_new_tokens=12, logprobs=True))[0]
        ref = hf_greedy(model, p, 12, num_beams=3, length_penalty=lp, early_stopping=True)
        assert got.token_ids == ref
        assert len(got.logprobs) == len(ref)


# ---------------------------------------------------------------- text: stops, streaming, UTF-8
class _ScriptCache:
    def __init__(self):
        self.ids = None

    def batch_select_indices(self, rows):
        self.ids = self.ids[rows]


class ScriptedLM(torch.nn.Module):
    """Emits ``script`` token by token after any prompt (a causal LM with a trivial cache)."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(max_position_embeddings=4096)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True, **kw):
        cache = past_key_values or _ScriptCache()
        first = cache.ids is None
        cache.ids = input_ids if first else torch.cat([cache.ids, input_ids], 1)
        done = 0 if first else cache.ids.shape[1] - cache.prompt_len
        if first:
            cache.prompt_len = input_ids.shape[1]
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        logits[:, -1, self.script[min(done, len(self.script) - 1)]] = 10.0
        return types.SimpleNamespace(logits=logits, past_key_values=cache)


def scripted(tok, text: str, eos: bool = True):
    ids = tok.encode(text) + ([EOS] if eos else [])
    return Engine(ScriptedLM(ids, len(tok)), tok, eos_token_ids=[EOS]), ids


MULTIBYTE = "héllo wörld: 日本語のテキスト 🙂🚀 naïve café ✓"


def test_detokenizer_is_utf8_safe(tok):
    ids = tok.encode(MULTIBYTE)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the test is meaningful: tokens split characters
    d = Detokenizer(tok)
    deltas = [d.add(i) for i in ids] + [d.finish()]
    assert "".join(deltas) == MULTIBYTE
    assert not any("\ufffd" in x for x in deltas)


def test_stream_reassembles_multibyte_text(tok):
    eng, ids = scripted(tok, MULTIBYTE)
    s = eng.stream([5, 6], SamplingConfig(temperature=0, max_new_tokens=200))
    deltas = list(s)
    assert "".join(deltas) == MULTIBYTE
    assert not any("\ufffd" in x for x in deltas) and len(deltas) > 5
    assert s.completion.finish_reason == "eos" and s.completion.text == MULTIBYTE
    assert s.completion.token_ids == ids


def test_stop_string_spanning_tokens(tok):
    text = "Sure, here is an answer. ### Human: more text"
    eng, ids = scripted(tok, text)
    stop = "## Hu"
    assert not any(stop in tok.decode([i]) for i in ids)  # it spans several tokens
    cfg = SamplingConfig(temperature=0, max_new_tokens=100, stop=["nothing like this", stop])
    c = eng.generate([[5]], cfg)[0]
    assert c.text == "Sure, here is an answer. #" and c.finish_reason == "stop"
    assert len(c.token_ids) < len(ids)  # decoding stopped there
    deltas = []
    c2 = eng.generate([[5]], cfg, on_delta=lambda i, d: deltas.append(d))[0]
    assert "".join(deltas) == c2.text == c.text  # the held-back "#..." never leaked


def test_stream_holds_back_a_possible_stop_prefix(tok):
    eng, _ = scripted(tok, "hello world? world!")
    s = eng.stream([5], SamplingConfig(temperature=0, max_new_tokens=100, stop=["world!"]))
    deltas = list(s)
    assert "".join(deltas) == "hello world? " == s.completion.text
    assert s.completion.finish_reason == "stop"


def test_finish_reasons(tok):
    eng, ids = scripted(tok, "The sky is blue.")
    assert eng.generate([[5]], SamplingConfig(temperature=0))[0].finish_reason == "eos"
    c = eng.generate([[5]], SamplingConfig(temperature=0, max_new_tokens=3))[0]
    assert c.finish_reason == "length" and c.token_ids == ids[:3]
    c = eng.generate([[5]], SamplingConfig(temperature=0, stop=["blue"]))[0]
    assert c.finish_reason == "stop" and c.text == "The sky is "
    c = eng.generate([[5]], SamplingConfig(temperature=0, stop=["The"]))[0]
    assert c.finish_reason == "stop" and c.text == ""


def test_text_tracker_and_partial_stop():
    assert partial_stop_len("abc ##", ["###"]) == 2
    assert partial_stop_len("abc", ["###"]) == 0
    assert partial_stop_len("x User", ["User:", "Us"]) == 4

    class CharTok:  # one "token" per character
        def decode(self, ids, skip_special_tokens=False):
            return "".join(map(chr, ids))

    t = TextTracker(CharTok(), ["STOP"])
    out = "".join(t.add(ord(ch)) for ch in "go STO go STOP x")
    assert out == "go STO go " and t.stopped


# ---------------------------------------------------------------- the real model
@pytest.mark.smollm2
@pytest.mark.parametrize("fast", [False, True])
def test_smollm2_greedy_matches_generate(fast):
    from chatforge.models.load import load

    model, tok = load("smollm2", dtype="fp32")
    eng = Engine(model, tok, fast=fast)
    p = eng.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([p])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)[0, len(p):].tolist()
    got = eng.generate([p], SamplingConfig(temperature=0, max_new_tokens=30))[0]
    assert got.token_ids == ref
    assert "Paris" in got.text


# ---------------------------------------------------------------- the C kernels vs PyTorch
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_torch(dtype):
    from chatforge.generate import kernels
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    K = kernels.load()
    if K is None:
        pytest.skip("no C compiler: the engine falls back to PyTorch")
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    def close(a, b):
        if dtype == torch.float32:
            return torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        return (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max() and (a == b).float().mean() > 0.95

    for B, N, Kd in [(1, 100, 70), (3, 576, 576), (8, 7, 33), (17, 64, 1536)]:
        x, w, b, r = rnd(B, Kd), rnd(N, Kd), rnd(N), rnd(B, N)
        assert close(K.linear(x, w), torch.nn.functional.linear(x, w))
        assert close(K.linear(x, w, b, r), r + torch.nn.functional.linear(x, w, b))
        assert close(K.linear(x, w, None, r, 0.5), r + torch.nn.functional.linear(x, w) * 0.5)  # LoRA scaling

    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(rnd(96))
    x = rnd(5, 96) * 3
    assert close(K.rmsnorm(x, norm.weight, norm.variance_epsilon), norm(x))

    B, nH, nKV, hd, T, col = 3, 6, 2, 16, 10, 4
    q, k, v = rnd(B, nH * hd), rnd(B, nKV * hd), rnd(B, nKV * hd)
    ang = torch.rand(B, 1, hd // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    ref_q, ref_k = apply_rotary_pos_emb(q.view(B, 1, nH, hd).transpose(1, 2), k.view(B, 1, nKV, hd).transpose(1, 2),
                                        cos, sin)
    kc, vc = rnd(B, nKV, T, hd), rnd(B, nKV, T, hd)
    q2 = q.clone()
    K.rope_store(q2, k, v, cos[:, 0].contiguous(), sin[:, 0].contiguous(), kc, vc, col)
    assert torch.equal(q2.view(B, nH, hd), ref_q[:, :, 0]) or (dtype == torch.float32 and close(q2.view(B, nH, hd), ref_q[:, :, 0]))
    assert close(kc[:, :, col], ref_k[:, :, 0]) and torch.equal(vc[:, :, col], v.view(B, nKV, hd))

    valid = torch.rand(B, 1, 1, T, generator=g) > 0.3
    valid[:, :, :, 0] = True
    out = K.attention(q2, kc, vc, valid, col + 1, 0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q2.view(B, nKV, nH // nKV, hd).float(), kc[:, :, :col + 1].float(), vc[:, :, :col + 1].float(),
        attn_mask=valid[:, :, :, :col + 1], scale=0.25)
    assert close(out.view(B, nKV, nH // nKV, hd), ref.to(dtype))

    gate, up = rnd(4, 50) * 3, rnd(4, 50)
    assert close(K.silu_mul(gate, up), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_layers_equal_the_per_op_path(dtype, bias):
    """The one-call decode step (``layers_*``) runs the per-op kernels in the same order: same bits,
    batch > 1 with padding, also with attention / MLP biases."""
    from chatforge.generate import kernels
    from chatforge.generate.fast import FastLlamaDecoder

    if kernels.load() is None:
        pytest.skip("no C compiler: the engine falls back to PyTorch")
    model = tiny_model(attention_bias=bias, mlp_bias=bias) if bias else spicy_tiny()
    if bias:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model = model.to(dtype).eval()
    prompts = [[5, 9, 23, 40, 7], [11, 12], [30, 31, 32]]
    outs = []
    for fused in (True, False):
        dec = FastLlamaDecoder(model, use_kernels=True)
        with torch.inference_mode():
            logits = [dec.prefill(prompts, 0, 6)]
            assert (dec._fused is not None) == (dtype in dec.kernels.DTYPES)
            if not fused:
                dec._fused = None
            for _ in range(5):
                logits.append(dec.step(logits[-1].argmax(-1)))
            dec.keep(torch.tensor([0, 2]))  # a finished row leaves the batch: buffers and cache follow
            logits.append(dec.step(logits[-1][[0, 2]].argmax(-1)))
        outs.append(torch.stack([t.float() for t in logits[:-1]]))
        outs.append(logits[-1].float())
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


class CountingKernels:
    """The compiled kernels with a count of the calls of each one (what a decode step ran)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {}

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*a, **k):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*a, **k)

        return counted


def test_kernels_pay_off_follows_the_clock(monkeypatch):
    """The verdict is the measurement's: C wins when its matrix products took less time than
    ``F.linear``'s, loses otherwise, the first (warm-up) try does not count, and the verdict is
    kept per (dtype, batch, shapes) for the process. A fake clock that only the two sides
    advance makes this exact."""
    from chatforge.generate import fast

    clock = [0.0]
    real_linear = torch.nn.functional.linear

    def side(costs: list[float]):
        """A ``linear`` that advances the clock by the next cost (the last one repeats)."""
        def linear(x, w, *a):
            clock[0] += costs.pop(0) if len(costs) > 1 else costs[0]
            return real_linear(x, w)
        return linear

    def verdict(c_costs: list[float], torch_costs: list[float], batch: int) -> bool:
        with monkeypatch.context() as m:
            m.setattr(fast, "F", types.SimpleNamespace(linear=side(torch_costs)))
            return fast.kernels_pay_off(types.SimpleNamespace(linear=side(c_costs)), weights, batch)

    monkeypatch.setattr(fast, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(fast, "_PAYS_OFF", {})
    weights = [torch.randn(8, 4), torch.randn(6, 4)]
    assert verdict([1.0], [2.0], batch=1) is True
    assert verdict([2.0], [1.0], batch=2) is False
    assert verdict([100.0, 100.0, 1.0], [2.0], batch=3) is True  # a slow first try is warm-up, left out
    assert verdict([2.0], [1.0], batch=1) is True  # measured once per process: the batch-1 verdict stays
    assert set(fast._PAYS_OFF) == {(torch.float32, b, ((8, 4), (6, 4))) for b in (1, 2, 3)}


def test_auto_kernels_follow_the_measurement(monkeypatch):
    """"auto" runs the C matrix products only where they measured faster than PyTorch on this
    machine (they lose to oneDNN on some CPUs), the C glue ops either way; CHATFORGE_KERNELS=1
    forces them. Checked by what a decode step calls, and both ways give the same logits."""
    from chatforge.generate import fast, kernels

    if kernels.load() is None:
        pytest.skip("no C compiler: the engine falls back to PyTorch")
    monkeypatch.delenv("CHATFORGE_KERNELS", raising=False)
    model = spicy_tiny().eval()
    n_layers = len(model.model.layers)

    def one_step() -> tuple[fast.FastLlamaDecoder, dict, torch.Tensor]:
        dec = fast.FastLlamaDecoder(model)
        with torch.inference_mode():
            first = dec.prefill([[5, 9, 23]], 0, 4)
            dec.kernels = spy = CountingKernels(dec.kernels)
            return dec, spy.calls, dec.step(first.argmax(-1))

    logits = {}
    for c_wins in (True, False):
        monkeypatch.setattr(fast, "kernels_pay_off", lambda *a, v=c_wins, **k: v)
        dec, calls, logits[c_wins] = one_step()
        assert dec._kernels_ok and dec._matvec_c is c_wins
        if c_wins:  # all layers in one C call, the LM head through the C matrix product
            assert calls.get("layers") == 1 and calls.get("linear", 0) >= 1
        else:  # per-layer C glue, every matrix product in PyTorch
            assert "layers" not in calls and "linear" not in calls
            assert calls.get("attention") == calls.get("rope_store") == calls.get("silu_mul") == n_layers
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)

    monkeypatch.setenv("CHATFORGE_KERNELS", "1")  # the measurement (still "PyTorch wins") is not asked
    dec, calls, _ = one_step()
    assert dec._fused is not None and calls.get("layers") == 1


def test_kernel_cache_is_keyed_by_source_flags_compiler_and_cpu(monkeypatch, tmp_path):
    """A changed C source, flag, compiler or target CPU names another library file, so a stale
    build (or one made for another CPU, which would die with an illegal instruction) is never
    loaded; the same inputs name the same file (built once, then reused)."""
    from chatforge.generate import kernels

    cc = kernels._compiler()
    if cc is None:
        pytest.skip("no C compiler: the engine falls back to PyTorch")
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path))
    base = kernels.library_path(cc)
    assert base.parent == tmp_path / "kernels" and base == kernels.library_path(cc)
    assert "__VERSION__" in kernels._target(cc)  # the compiler's version is in the key
    variants = []
    with monkeypatch.context() as m:
        m.setattr(kernels, "SOURCE", kernels.SOURCE + "\n/* edited */\n")
        variants.append(kernels.library_path(cc))
    with monkeypatch.context() as m:
        m.setattr(kernels, "FLAGS", [f for f in kernels.FLAGS if f != "-ffp-contract=off"])
        variants.append(kernels.library_path(cc))
    with monkeypatch.context() as m:
        m.setattr(kernels, "_target", lambda c: "#define __AVX2__ 1")  # another CPU behind -march=native
        variants.append(kernels.library_path(cc))
    assert len({base, *variants}) == 4

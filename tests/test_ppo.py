"""PPO / RLOO: the math against hand-computed values, then the trainer on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from chatforge.train import ppo_math as pm


# ---------------------------------------------------------------- GAE and returns
def test_gae_matches_hand_computed_values_and_ignores_padding():
    # row 0: 3 real tokens; row 1: 2 real tokens + a pad whose reward (7) and value (99) are junk
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 1.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = pm.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0, by hand (gamma*lam = 0.72):
    #   t=2: delta = 3 - 1.5 = 1.5                         A = 1.5
    #   t=1: delta = 2 + 0.9*1.5 - 1.0 = 2.35               A = 2.35 + 0.72*1.5  = 3.43
    #   t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4                A = 1.4 + 0.72*3.43  = 3.8696
    # row 1: t=1 is terminal (no bootstrap from the pad's 99): delta = 1 - 1 = 0 -> A = 0
    #   t=0: delta = 0.5 + 0.9*1.0 - 2.0 = -0.6             A = -0.6
    torch.testing.assert_close(adv, torch.tensor([[3.8696, 3.43, 1.5], [-0.6, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[4.3696, 4.43, 3.0], [1.4, 1.0, 0.0]]))


def test_gae_equals_a_plain_python_loop_and_lambda_one_is_the_discounted_return():
    """gae() against the textbook recursion written out per row in Python floats (gamma, lam
    not 1; rows of different lengths; junk in the padding that must not leak back), and with
    lam = 1, V = 0 against sum_k gamma^k r_{t+k}."""
    g = torch.Generator().manual_seed(0)
    lengths, T, gamma, lam = [7, 5, 1, 3, 0], 7, 0.9, 0.8
    rewards = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    values = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    rewards[~mask], values[~mask] = 1e6, -1e6  # padding junk

    want_adv, want_ret, want_g = (torch.zeros(len(lengths), T, dtype=torch.float64) for _ in range(3))
    for b, n in enumerate(lengths):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist()
        a = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0  # the episode ends after the last real token
            a = r[t] + gamma * next_v - v[t] + gamma * lam * a
            want_adv[b, t], want_ret[b, t] = a, a + v[t]
            want_g[b, t] = sum(gamma ** k * r[t + k] for k in range(n - t))

    adv, ret = pm.gae(rewards, values, mask.long(), gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)
    torch.testing.assert_close(pm.gae(rewards, torch.zeros_like(values), mask, gamma=gamma, lam=1.0)[0], want_g)
    torch.testing.assert_close(pm.discounted_returns(rewards, mask, gamma=gamma), want_g)


def test_shape_rewards_puts_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    r = pm.shape_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 2.0 - 0.15], [-0.2, -1.0 - 0.25, 0.0]]))


# ---------------------------------------------------------------- KL estimators
def test_kl_estimators_values():
    lp, lq = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    torch.testing.assert_close(pm.kl_k1(lp, lq), torch.tensor([math.log(2.0)]))
    # r = q/p = 0.5: k3 = (0.5 - 1) - log 0.5
    torch.testing.assert_close(pm.kl_k3(lp, lq), torch.tensor([-0.5 + math.log(2.0)]))
    torch.testing.assert_close(pm.kl_k3(lp, lp), torch.tensor([0.0]))


def test_kl_estimators_are_unbiased_under_exact_expectation():
    # E_{x~p}[k(x)] summed exactly over a categorical must equal KL(p||q) for k1 and k3
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(50, generator=g, dtype=torch.float64), 0)
    kl = (p * (p.log() - q.log())).sum()
    for est in ("k1", "k3"):
        e = (p * pm.kl_per_token(p.log(), q.log(), est)).sum()
        torch.testing.assert_close(e, kl)
    assert (pm.kl_k3(p.log(), q.log()) >= 0).all()  # k3 is never negative
    with pytest.raises(ValueError):
        pm.kl_per_token(p.log(), q.log(), "k2")  # type: ignore[arg-type]


def test_logprobs_and_entropy_from_logits():
    from chatforge.models.logprobs import entropy_from_logits, logprobs_from_logits

    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    lp = logprobs_from_logits(logits, torch.tensor([[2, 0]]))
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[0, [0, 1], [2, 0]].unsqueeze(0))
    h = entropy_from_logits(logits)
    torch.testing.assert_close(h[0, 1], torch.tensor(math.log(3.0)))
    p = torch.softmax(logits[0, 0], -1)
    torch.testing.assert_close(h[0, 0], -(p * p.log()).sum())


# ---------------------------------------------------------------- whitening
def test_masked_whiten_uses_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 1000.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w = pm.masked_whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (real - real.mean()) / real.std()
    torch.testing.assert_close(w[mask.bool()], expected, atol=1e-5, rtol=1e-5)
    assert (w[~mask.bool()] == 0).all()
    torch.testing.assert_close(pm.masked_mean(x, mask), torch.tensor(2.5))
    # shift_mean=False keeps the mean, only rescales
    w2 = pm.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(w2[mask.bool()], expected + 2.5, atol=1e-5, rtol=1e-5)


def test_running_moments_match_batch_statistics():
    rm = pm.RunningMoments()
    a, b = torch.arange(10.0), torch.arange(5.0) * 3
    rm.update(a)
    mean, std = rm.update(b)
    allx = torch.cat([a, b]).double()
    assert mean == pytest.approx(allx.mean().item())
    assert std == pytest.approx(allx.std(unbiased=False).item())


# ---------------------------------------------------------------- clipped losses
def test_policy_loss_clipping_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    old = torch.zeros(1, 4)
    logp = ratio.log().requires_grad_(True)
    out = pm.policy_loss(logp, old, adv, torch.ones(1, 4), clip=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), 0.8 (clipped), -0.5, 1.5
    torch.testing.assert_close(out.loss, torch.tensor((-1.2 + 0.8 - 0.5 + 1.5) / 4))
    torch.testing.assert_close(out.clip_frac, torch.tensor(0.5))
    out.loss.backward()
    # clipped tokens carry no gradient; unclipped: d/dlogp (-A r) / 4 = -A r / 4
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -0.5 / 4, 1.5 / 4]]))


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([[0.3, -0.1, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    out = pm.policy_loss(lp, lp.clone(), adv, mask)
    torch.testing.assert_close(out.loss, torch.tensor(-0.1))
    assert out.clip_frac.item() == 0 and out.approx_kl.item() == 0 and out.ratio_mean.item() == 1


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.0, 0.1]])
    old = torch.zeros(1, 2)
    returns = torch.tensor([[2.0, 2.0]])
    loss, frac = pm.value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: V_clip = 0.2 -> max(1.0, 3.24) = 3.24; token 1: inside the clip -> 3.61
    torch.testing.assert_close(loss, torch.tensor(0.5 * (3.24 + 3.61) / 2))
    torch.testing.assert_close(frac, torch.tensor(0.5))
    loss0, _ = pm.value_loss(values, old, returns, torch.ones(1, 2), clip=0.0)
    torch.testing.assert_close(loss0, torch.tensor(0.5 * (1.0 + 3.61) / 2))


def test_approx_kl_is_zero_for_identical_and_positive_otherwise():
    a = torch.tensor([[-1.0, -2.0]])
    m = torch.ones(1, 2)
    assert pm.approx_kl(a, a, m).item() == 0
    assert pm.approx_kl(a + 0.3, a, m).item() > 0


# ---------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller_follows_ziegler():
    c = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    v = c.update(12.0, n_steps=512)  # error 1.0 clipped to 0.2
    assert v == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))
    v2 = c.update(5.4, n_steps=1000)  # error -0.1
    assert v2 == pytest.approx(v * (1 - 0.1 * 1000 / 10000))
    st = c.state_dict()
    c2 = pm.AdaptiveKLController(0.5, target=6.0, horizon=10000)
    c2.load_state_dict(st)
    assert c2.value == c.value
    f = pm.FixedKLController(0.05)
    assert f.update(100.0, 64) == 0.05


# ---------------------------------------------------------------- RLOO
def test_rloo_leave_one_out_baseline():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    a = pm.rloo_advantages(r, k=4)
    # sample 0: baseline (2+3+6)/3 = 11/3 -> 1 - 11/3 = -8/3
    assert a[0].item() == pytest.approx(-8 / 3)
    # identity A_j = k/(k-1) (R_j - mean)
    g = r.view(2, 4)
    torch.testing.assert_close(a, (4 / 3 * (g - g.mean(-1, keepdim=True))).reshape(-1))
    torch.testing.assert_close(a.view(2, 4).sum(-1), torch.zeros(2))
    with pytest.raises(ValueError):
        pm.rloo_advantages(r, k=3)
    with pytest.raises(ValueError):
        pm.rloo_advantages(r, k=1)


# ---------------------------------------------------------------- GRPO
def test_grpo_advantages_are_group_normalised_and_dr_grpo_drops_the_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0, 2.0, 4.0, 6.0, 8.0])
    a = pm.grpo_advantages(r, k=4, eps=0.0)
    g = r.view(3, 4)
    # group 0: mean 0.25, std (unbiased) 0.5 -> sample 0: 0.75 / 0.5 = 1.5
    assert a[0].item() == pytest.approx(1.5) and a[1].item() == pytest.approx(-0.5)
    assert torch.equal(a[4:8], torch.zeros(4))  # all the same reward: nothing to learn
    torch.testing.assert_close(a[8:], (g[2] - 5.0) / g[2].std())
    dr = pm.grpo_advantages(r, k=4, scale=False)
    torch.testing.assert_close(dr, (g - g.mean(-1, keepdim=True)).reshape(-1))
    with pytest.raises(ValueError):
        pm.grpo_advantages(r, k=5)


def test_loss_aggregations_weigh_lengths_as_documented():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert pm.aggregate(x, mask, "token").item() == pytest.approx(7 / 5)        # tokens weigh alike
    assert pm.aggregate(x, mask, "seq").item() == pytest.approx((1 + 3) / 2)    # responses weigh alike
    assert pm.aggregate(x, mask, "seq_sum", 4).item() == pytest.approx((4 / 4 + 3 / 4) / 2)  # constant norm
    with pytest.raises(ValueError):
        pm.aggregate(x, mask, "nope")


# ================================================================ rule rewards
from chatforge.train import reward_fns as rf  # noqa: E402


def test_rule_rewards():
    P = [[{"role": "user", "content": "What is 17 + 25?"}], "What is 6 x 7?", [{"role": "user", "content": "hi"}]]
    assert rf.keyword(P, ["The sky is Blue.", "bluetooth", "no"], word="blue") == [1.0, 0.0, 0.0]
    assert rf.keyword(P, ["blue blue sky", "", "x"], per_word=True) == [pytest.approx(2 / 3), 0.0, 0.0]
    assert rf.length_target(P, ["a b c d", "a b", " ".join(["w"] * 12)], target=4) == [0.0, -0.5, -1.0]
    assert rf.non_repetition(P, ["a b c a b c", "a b c d", "a b"], n=3) == [0.75, 1.0, 1.0]
    assert rf.exact_answer(P, ["It is 42.", "41", "7"]) == [1.0, 0.0, 0.0]  # 17+25, 6x7, no question
    assert rf.exact_answer(P, ["no", "6 x 7 = 42", "7"]) == [0.0, 0.0, 0.0]  # the FIRST number counts
    assert rf.exact_answer(P, ["1,000", "x", "7"], answers=[1000, 3, "7"]) == [1.0, 0.0, 1.0]


# ================================================================ reward plumbing
from chatforge.errors import ChatforgeError, ConfigError  # noqa: E402
from chatforge.train import rewards as rw  # noqa: E402


def test_parse_reward_spec():
    s = rw.parse_reward_spec("fn:chatforge.train.reward_fns:keyword?word=sky&per_word=true@0.5")
    assert (s.kind, s.target, s.weight, s.options) == ("fn", "chatforge.train.reward_fns:keyword", 0.5,
                                                      {"word": "sky", "per_word": True})
    s = rw.parse_reward_spec("rm:/runs/a@b/rm")  # an '@' inside a path is not a weight
    assert (s.target, s.weight) == ("/runs/a@b/rm", 1.0)
    assert rw.parse_reward_spec("clf:some/model:POSITIVE@-2").weight == -2.0
    for bad in ("foo:x", "rm:", "fn:nomodule", "clf:modelonly", "fn:a:b@nan"):
        with pytest.raises(ConfigError):
            rw.parse_reward_spec(bad)


def test_rewards_combine_weights_whiten_clip_and_missing_eot(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def score(prompts, responses, bonus=0.0):\n    return [len(r) + bonus for r in responses]\n")
    suite = rw.build_rewards([f"fn:{f}:score?bonus=1@2", "fn:chatforge.train.reward_fns:keyword@-1"])
    P = [[{"role": "user", "content": "q"}]] * 3
    out = suite(P, ["blue", "ab", ""], [True, True, False])
    # 2 * (len + 1) - 1 * contains("blue")
    torch.testing.assert_close(out.raw, torch.tensor([2 * 5.0 - 1, 2 * 3.0, 2 * 1.0]))
    assert set(out.parts) == {"fn_score", "fn_keyword"}
    cut = rw.build_rewards([f"fn:{f}:score"], clip=2.5, missing_eot_reward=-1.0)
    torch.testing.assert_close(cut(P, ["blue", "ab", "xyz"], [True, True, False]).scores, torch.tensor([2.5, 2.0, -1.0]))
    w = rw.build_rewards([f"fn:{f}:score"], whiten=True)
    s1 = w(P, ["a", "bbb", "ccccc"]).scores
    torch.testing.assert_close(s1, torch.tensor([-1.2247, 0.0, 1.2247]), atol=1e-4, rtol=1e-4)
    st = w.state_dict()
    w(P, ["a" * 50] * 3, update_stats=False)  # evaluation does not move the statistics
    assert w.state_dict() == st
    with pytest.raises(ConfigError):
        rw.build_rewards(["fn:chatforge.train.reward_fns:nope"])
    bad = rw.build_rewards([lambda p, r: [1.0]])
    with pytest.raises(ChatforgeError):
        bad(P, ["a", "b", "c"])


def test_classifier_reward_reads_the_label_logit(tmp_path):
    from transformers import LlamaForSequenceClassification

    from chatforge.models.tiny import tiny_config, tiny_tokenizer

    cfg = tiny_config()
    cfg.num_labels, cfg.id2label, cfg.label2id = 2, {0: "NEGATIVE", 1: "POSITIVE"}, {"NEGATIVE": 0, "POSITIVE": 1}
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(cfg).eval()
    tok = tiny_tokenizer()
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    texts = ["The sky is blue.", "I like tea"]
    with torch.no_grad():
        ref = [clf(**tok([t], return_tensors="pt")).logits[0] for t in texts]
    r = rw.build_reward(f"clf:{tmp_path / 'clf'}:positive")
    got = r([[{"role": "user", "content": "x"}]] * 2, texts)
    assert got == pytest.approx([x[1].item() for x in ref], abs=1e-4)
    lp = rw.build_reward(f"clf:{tmp_path / 'clf'}:0?output=logprob")(["x", "y"], texts)
    assert lp == pytest.approx([torch.log_softmax(x, -1)[0].item() for x in ref], abs=1e-4)
    with pytest.raises(ConfigError):
        rw.build_reward(f"clf:{tmp_path / 'clf'}:NEUTRAL")


def test_reward_model_reward_matches_the_rm_scorer(tmp_path):
    from chatforge.models.heads import RewardModel, reward_pad_token
    from chatforge.models.tiny import tiny_model, tiny_tokenizer
    from chatforge.models.heads import load_scorer

    tok = tiny_tokenizer()
    pad = reward_pad_token(tok)
    torch.manual_seed(0)
    RewardModel.from_causal_lm(tiny_model(), pad_token_id=pad).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    P = [[{"role": "user", "content": "What colour is the sky?"}]] * 2
    R = ["It is blue.", "Green, obviously"]
    got = rw.build_rewards([f"rm:{tmp_path / 'rm'}"])(P, R).raw.tolist()
    want = load_scorer(tmp_path / "rm").score(P, R)
    assert got == pytest.approx(want, abs=1e-5)
    assert got[0] != pytest.approx(got[1])


# ================================================================ experience: layout and exactness
from chatforge.train import experience as xp  # noqa: E402


def _episodes(tok, n=3, seed=0):
    from chatforge.data.tokenize import encode_prompt

    prompts = [[{"role": "user", "content": c}] for c in ("Hi", "What colour is the sky today?", "Tell me a joke")]
    g = torch.Generator().manual_seed(seed)
    eps = []
    for i in range(n):
        p = prompts[i % 3]
        r = torch.randint(3, 500, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        eps.append(xp.Episode(p, encode_prompt(tok, p), r, "x", True, group=i))
    return eps


def test_policy_value_logprobs_match_a_plain_forward_of_each_sequence():
    from chatforge.models.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model().eval(), tiny_tokenizer()
    eps = _episodes(tok, 5)
    pv = xp.PolicyValue(model, None, temperature=0.7)
    b = xp.collate(eps, tok.pad_token_id)
    with torch.no_grad():
        out = pv(b, values=False)
        for i, e in enumerate(eps):
            ids = torch.tensor([e.prompt_ids + e.response_ids])
            logits = model(ids).logits[0, len(e.prompt_ids) - 1:-1] / 0.7
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(e.response_ids)[:, None])[:, 0]
            torch.testing.assert_close(out.logp[i, :len(e.response_ids)], want, atol=1e-5, rtol=1e-5)
    assert b.mask.sum().item() == sum(len(e.response_ids) for e in eps)


@pytest.mark.parametrize("bf16", [False, True])
def test_ratio_is_exactly_one_on_the_first_minibatch(bf16):
    """Old log-probs from the experience pass == new log-probs of the first update forward,
    bit for bit (same weights, same micro-batch, same padding), with grad on and off."""
    from chatforge.models.heads import ScalarHead
    from chatforge.models.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model().eval(), tiny_tokenizer()
    pv = xp.PolicyValue(model, ScalarHead(model.config.hidden_size, bias=True), 1.0)
    eps = _episodes(tok, 6)
    order = xp.minibatches(len(eps), 3, seed=1)
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else xp.nullcontext
    old, old_v = xp.teacher_forced(pv, eps, order, tok.pad_token_id, "cpu", ac)
    b = xp.collate([eps[i] for i in order[0]], tok.pad_token_id)
    with ac():
        out = pv(b, values=True)
    R = b.response.shape[1]
    assert out.logp.requires_grad
    assert torch.equal(out.logp.detach().float() * b.mask, old[order[0], :R] * b.mask)
    assert torch.equal(out.values.detach() * b.mask, old_v[order[0], :R] * b.mask)
    lp = pm.policy_loss(out.logp, old[order[0], :R], torch.randn(len(order[0]), R), b.mask)
    assert lp.ratio_mean.item() == 1.0 and lp.clip_frac.item() == 0.0


def test_sampler_logprobs_agree_with_the_teacher_forced_pass():
    from chatforge.data.tokenize import encode_prompt
    from chatforge.generate.engine import Engine, SamplingConfig
    from chatforge.models.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model().eval(), tiny_tokenizer()
    prompts = [[{"role": "user", "content": c}] for c in ("Hi", "What colour is the sky today?")]
    ids = [encode_prompt(tok, p) for p in prompts]
    eps = xp.rollout(Engine(model, tok), prompts, ids, SamplingConfig(max_new_tokens=8, seed=0, logprobs=True), k=2)
    assert [e.group for e in eps] == [0, 0, 1, 1] and eps[1].prompt == prompts[0]
    lp, _ = xp.teacher_forced(xp.PolicyValue(model), eps, [[0, 1, 2, 3]], tok.pad_token_id, "cpu", values=False)
    for i, e in enumerate(eps):
        torch.testing.assert_close(lp[i, :len(e.response_ids)], torch.tensor(e.sampler_logprobs), atol=1e-4, rtol=1e-4)


# ================================================================ the trainer on the tiny model
import json  # noqa: E402
from pathlib import Path  # noqa: E402

DEMO_PROMPTS = str(Path(__file__).resolve().parents[1] / "src/chatforge/data/demo/prompts.jsonl")
# a dense rule reward a random tiny model finds by sampling: 60 characters in 12 tokens
# needs long tokens, and each choice of a longer token is a small step up
LENGTH_REWARD = "fn:chatforge.train.reward_fns:length_target?target=60&unit=chars"


def _cfg(tmp_path, name, *over):
    from chatforge.config import load_config, parse_overrides
    from chatforge.train.ppo import PPOConfig

    over_d = parse_overrides([
        "model=tiny", f"data=[{DEMO_PROMPTS}]", f"out={tmp_path / name}", "response_len=12", "lr=3e-3",
        "kl_coef=0.01", "ppo_epochs=4", "batch_size=4", "precision=fp32", "final_eval=false", "save_every=100", *over])
    return load_config(PPOConfig, overrides={"rewards": [LENGTH_REWARD], **over_d})


def _metrics(run):
    return [json.loads(line) for line in open(Path(run) / "metrics.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize("algo,over", [("ppo", ["rollout_batch=16"]), ("rloo", ["rollout_batch=4", "samples_per_prompt=4"]),
                                       ("grpo", ["rollout_batch=4", "samples_per_prompt=4"]),
                                       ("grpo", ["rollout_batch=4", "samples_per_prompt=4", "grpo_variant=dr_grpo"])])
def test_rule_reward_rises_on_the_tiny_model(tmp_path, algo, over):
    from chatforge.train.ppo import train

    cfg = _cfg(tmp_path, algo, f"algo={algo}", "max_steps=15", *over)
    train(cfg)
    rows = _metrics(cfg.out)
    r = [row["reward"] for row in rows]
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    assert last > first + 0.1, r
    assert all(row["ratio_dev0"] == 0.0 for row in rows)  # every step: ratio exactly 1 before the first update
    assert rows[0]["kl"] == 0.0 and all(math.isfinite(row["kl"]) for row in rows)
    assert (Path(cfg.out) / "reward_kl.png").exists() and (Path(cfg.out) / "samples.jsonl").exists()
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert summary["reward_last"] > summary["reward_first"] and summary["peak_rss_mb"] > 0


def test_lora_reference_is_the_adapter_off_start_model(tmp_path):
    """After PPO with LoRA, switching the adapter off gives the start model's log-probs
    exactly, while the adapter itself has moved the policy."""
    from chatforge.models.load import load
    from chatforge.models.tiny import tiny_model, tiny_tokenizer
    from chatforge.train.ppo import train

    cfg = _cfg(tmp_path, "lora", "lora=true", "lr=1e-2", "max_steps=2", "rollout_batch=4")
    out = train(cfg)
    policy, _ = load(out)
    policy.eval()
    tok = tiny_tokenizer()
    eps = _episodes(tok, 4)
    pv = xp.PolicyValue(policy, None, 1.0)
    order = [[0, 1, 2, 3]]
    ref, _ = xp.teacher_forced(pv, eps, order, tok.pad_token_id, "cpu", values=False, ref_context=policy.disable_adapter)
    pol, _ = xp.teacher_forced(pv, eps, order, tok.pad_token_id, "cpu", values=False)
    start, _ = xp.teacher_forced(xp.PolicyValue(tiny_model().eval()), eps, order, tok.pad_token_id, "cpu", values=False)
    m = xp.response_mask(eps).bool()
    assert torch.equal(ref[m], start[m])
    assert (pol[m] - start[m]).abs().max() > 1e-3
    assert json.loads((Path(cfg.out) / "summary.json").read_text())["layout"].startswith("lora")


class Killed(Exception):
    pass


def _final_weights(run) -> dict[str, torch.Tensor]:
    """Every tensor of a run's ``model/`` (policy or adapter, and the value head)."""
    from safetensors.torch import load_file

    return {f"{f.stem}.{k}": v for f in sorted((Path(run) / "model").glob("*.safetensors"))
            for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_killed_and_resumed_run_matches_a_straight_run(tmp_path, lora):
    """PPO with a value head and the adaptive KL controller, killed at step 3 and resumed from
    the checkpoint of step 2: the same final weights (policy and value head), curves, samples
    and controller as a run that never stopped. A finished run resumed for more steps continues."""
    from chatforge.train.ppo import train

    over = ["max_steps=4", "save_every=2", "sample_every=1", "adaptive_kl=true", "kl_target=0.01", "kl_horizon=10",
            "rollout_batch=4", "ppo_epochs=2", f"lora={str(lora).lower()}"]
    train(_cfg(tmp_path, "straight", *over))

    def kill_at_3(step, model, idx):
        if step == 3:
            raise Killed

    cfg = _cfg(tmp_path, "killed", *over)
    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_3)
    ck = tmp_path / "killed" / "checkpoints" / "step-0000002"
    assert (ck / "value_head.safetensors").exists()
    beta_after_2 = json.loads((ck / "trainer_state" / "loop.json").read_text())["method"]["kl_ctl"]["value"]
    assert beta_after_2 != 0.01  # the adaptive controller moved
    train(cfg, resume=True)

    straight, resumed = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys() and any(k.startswith("value_head.") for k in straight)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    clocks = {"time", "tokens_per_s", "step_time_s", "train_min", "episodes_per_s", "time_rollout", "time_score",
              "time_update"}
    rows = _metrics(tmp_path / "killed")
    assert [{k: v for k, v in r.items() if k not in clocks} for r in rows] == \
        [{k: v for k, v in r.items() if k not in clocks} for r in _metrics(tmp_path / "straight")]
    assert rows[2]["kl_coef"] == pytest.approx(beta_after_2)  # the controller state came back
    assert [json.loads(x)["step"] for x in (tmp_path / "killed" / "samples.jsonl").read_text().splitlines()] == \
        [json.loads(x)["step"] for x in (tmp_path / "straight" / "samples.jsonl").read_text().splitlines()]

    train(_cfg(tmp_path, "killed", *over, "max_steps=5"), resume=True)
    assert [r["step"] for r in _metrics(tmp_path / "killed")] == [1, 2, 3, 4, 5]


def test_cli_ppo_end_to_end_and_errors(tmp_path, capsys):
    from chatforge.cli import main

    out = tmp_path / "cli"
    rc = main(["ppo", "--policy", "tiny", "--reward", LENGTH_REWARD, "--reward", "fn:chatforge.train.reward_fns:keyword@0.5",
               "--prompts", DEMO_PROMPTS, "--out", str(out), "--algo", "rloo", "max_steps=2", "rollout_batch=2",
               "response_len=6", "eval_prompts=3", "eval_kl_prompts=2", "precision=fp32"])
    assert rc == 0
    for f in ("metrics.jsonl", "summary.json", "reward_kl.png", "samples.jsonl", "eval.json", "config.yaml", "DONE"):
        assert (out / f).exists(), f
    assert (out / "model").is_dir()
    rows = _metrics(out)
    assert {"reward", "reward/fn_length_target", "reward/fn_keyword", "kl", "entropy", "clip_frac", "approx_kl",
            "response_len", "eot_rate", "tokens_per_s"} <= set(rows[-1])
    ev = json.loads((out / "eval.json").read_text())
    assert {"reward_policy", "reward_start", "rep_ngram_policy", "kl_eval"} <= set(ev)
    capsys.readouterr()
    assert main(["ppo", "--policy", "tiny", "--reward", "nope:x", "--prompts", DEMO_PROMPTS, "--out", str(tmp_path / "e")]) == 2
    assert "expected rm:RUN" in capsys.readouterr().err
    assert main(["ppo", "--policy", "tiny", "--reward", LENGTH_REWARD, "--prompts", DEMO_PROMPTS,
                 "--out", str(tmp_path / "e"), "--algo", "rloo", "samples_per_prompt=1"]) == 2


def test_lora_ppo_on_an_adapter_policy_publishes_a_loadable_merged_model(tmp_path):
    from chatforge.models.load import load, resolve
    from chatforge.models.tiny import tiny_lora_run
    from chatforge.train.ppo import train

    tiny_lora_run(tmp_path / "sft")
    cfg = _cfg(tmp_path, "ppo", f"model={tmp_path / 'sft'}", "lora=true", "max_steps=1", "rollout_batch=2",
               "response_len=4", "ppo_epochs=1")
    out = train(cfg)
    assert resolve(out).kind == "hf"  # merged: SFT adapter + PPO adapter in full weights
    model, _ = load(out)
    start, _ = load(tmp_path / "sft")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        a, b = model(ids).logits, start(ids).logits
    assert (a - b).abs().max() < 1.0 and not torch.equal(a, b)  # the SFT policy, moved a little by PPO
    assert (Path(out) / "value_head.safetensors").exists()


def test_gradient_checkpointing_keeps_the_ratio_exact(tmp_path):
    from chatforge.train.ppo import train

    cfg = _cfg(tmp_path, "gc", "lora=true", "gradient_checkpointing=true", "max_steps=2", "rollout_batch=4",
               "ppo_epochs=1", "precision=auto")
    train(cfg)
    rows = _metrics(cfg.out)
    assert [r["ratio_dev0"] for r in rows] == [0.0, 0.0] and rows[1]["kl"] != 0.0


@pytest.mark.parametrize("algo,lora,epochs", [("rloo", True, 1), ("ppo", False, 1), ("ppo", True, 2)],
                         ids=["rloo-lora", "ppo-full", "ppo-lora-2-epochs"])
def test_one_micro_batch_per_step_reuses_its_first_forward_as_the_old_pass(tmp_path, monkeypatch, algo, lora, epochs):
    """With every episode in one micro-batch the update's first forward gives the old
    log-probs (and values), for one PPO epoch or several: the same weights and curves as
    with the separate no-grad pass, one forward fewer per step."""
    from chatforge.train import ppo

    over = [f"algo={algo}", f"lora={str(lora).lower()}", "max_steps=3", f"ppo_epochs={epochs}", "rollout_batch=4",
            "batch_size=8" if algo == "rloo" else "batch_size=4", "samples_per_prompt=2" if algo == "rloo" else "samples_per_prompt=1"]
    calls = []
    real = ppo.fused_first_forward

    def counted(*a, **kw):
        out = real(*a, **kw)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(ppo, "fused_first_forward", counted)
    ppo.train(_cfg(tmp_path, "fused", *over))
    assert calls == [True] * 3
    monkeypatch.setattr(ppo, "fused_first_forward", lambda *a, **kw: None)
    ppo.train(_cfg(tmp_path, "separate", *over))

    a, b = _final_weights(tmp_path / "fused"), _final_weights(tmp_path / "separate")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    clocks = {"time", "tokens_per_s", "step_time_s", "train_min", "episodes_per_s", "time_rollout", "time_score",
              "time_update"}
    ra, rb = _metrics(tmp_path / "fused"), _metrics(tmp_path / "separate")
    assert [{k: v for k, v in r.items() if k not in clocks} for r in ra] == \
        [{k: v for k, v in r.items() if k not in clocks} for r in rb]
    assert all(r["ratio_dev0"] == 0.0 for r in ra)


def test_several_micro_batches_keep_the_separate_old_pass(tmp_path):
    from chatforge.train import ppo

    for epochs in (1, 2):
        cfg = _cfg(tmp_path, "x", f"ppo_epochs={epochs}")
        assert ppo.fused_first_forward(None, [], [[0, 1], [2, 3]], None, cfg, 0) is None

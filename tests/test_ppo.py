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


def test_gae_with_lambda_one_and_zero_values_is_the_discounted_return():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    g = pm.discounted_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(g, torch.tensor([[0.25, 0.5, 1.0, 0.0]]))


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
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    lp = pm.logprobs_from_logits(logits, torch.tensor([[2, 0]]))
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[0, [0, 1], [2, 0]].unsqueeze(0))
    h = pm.entropy_from_logits(logits)
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

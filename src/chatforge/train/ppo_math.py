"""The math of RLHF with PPO and RLOO, as pure tensor functions (no models, no I/O).

Shapes: per-token quantities are ``[B, T]`` over *response* tokens, right-padded; ``mask``
is ``[B, T]`` with 1 on real response tokens (prompt and padding excluded). Each row's
real tokens form a prefix ``0..len-1`` (the end-of-turn token, when sampled, is the last).
Scalar per-sequence quantities are ``[B]``. Log-probabilities and entropies of logits are
:mod:`chatforge.models.logprobs`'s (shared with every trainer and the evaluation).

Where the silent bugs of PPO for language models live, and how these functions avoid them:

* masks: every mean/variance is over real tokens only (``masked_mean``), never over pads;
* the value of the state after the last real token is 0 (the episode ends), so GAE must not
  bootstrap from a padding position's value;
* the score goes on the last *real* token, not on the last column;
* KL is measured against the frozen reference at the sampling temperature, per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]


# ---------------------------------------------------------------- masked statistics
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    # torch.where, not x * mask: a NaN/inf in a padding slot must not leak into the sum
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (along ``dim``, or over all)."""
    n = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / n.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over real tokens; padding comes back as 0.

    ``shift_mean=False`` only rescales (used for rewards, whose sign carries meaning)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


# ---------------------------------------------------------------- KL estimators
def kl_k1(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k1 = log p(x) - log p_ref(x) for x ~ p: unbiased for KL(p || p_ref), but any one
    sample may be negative. The classic RLHF penalty (Ziegler et al., InstructGPT)."""
    return logp - logp_ref


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = p_ref(x) / p(x), x ~ p (Schulman, "Approximating KL
    divergence"): unbiased too (E_p[r] = 1), and >= 0 for every sample, lower variance
    when p and p_ref are close. Computed in log space: log r = logp_ref - logp."""
    log_r = (logp_ref - logp).clamp(-20.0, 20.0)  # exp(20) ~ 5e8: bounded, still "far"
    return torch.expm1(log_r) - log_r


def kl_per_token(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    if estimator == "k1":
        return kl_k1(logp, logp_ref)
    if estimator == "k3":
        return kl_k3(logp, logp_ref)
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k3)")


def approx_kl(logp_new: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(old || new) on the tokens sampled from the old policy, k3 estimator with
    r = p_new / p_old. Drives the optional early stop of a PPO epoch."""
    return masked_mean(kl_k3(logp_old, logp_new), mask)


# ---------------------------------------------------------------- rewards
def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (0 for an empty row)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards r_t = -beta * KL_t, plus the sequence score on the last real
    token (where the episode ends). ``scores [B]``, ``kl [B, T]`` -> ``[B, T]``."""
    rewards = torch.where(mask.bool(), -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    idx = last_token_index(mask).unsqueeze(-1)
    return rewards.scatter_add(-1, idx, scores.to(rewards.dtype).unsqueeze(-1))


# ---------------------------------------------------------------- GAE
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over masked responses.

        delta_t = r_t + gamma * V_{t+1} - V_t          (V_{t+1} = 0 after the last real token)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                            (the value target)

    Padding has r = 0 and V = 0, so its advantage is 0 and it never leaks backwards into
    the last real token. Returns ``(advantages, returns)``, both 0 on padding.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_k gamma^k r_{t+k} (Monte-Carlo return; GAE with lam = 1 and V = 0)."""
    adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return adv


# ---------------------------------------------------------------- RLOO
def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024).

    ``rewards [N*k]`` are sequence rewards grouped prompt-major (the k samples of prompt i
    at ``i*k .. i*k+k-1``). The baseline of sample j is the mean of the *other* k-1 samples
    of its prompt, so it is independent of sample j and the gradient stays unbiased:

        A_j = R_j - (sum_i R_i - R_j) / (k - 1)  =  k/(k-1) * (R_j - mean_i R_i)
    """
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {k}")
    g = rewards.view(-1, k)
    baseline = (g.sum(-1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages (GRPO, Shao et al. 2024, DeepSeekMath): each of a prompt's
    ``k`` samples against its group, ``A_i = (r_i - mean_g r) / std_g r``.

    ``scale=False`` is Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): no
    division by the group's std, which up-weights prompts whose answers barely differ (too
    easy or too hard) and biases the update by question difficulty. A group whose samples all
    got the same reward has A = 0 either way: nothing to learn from it. ``[N] -> [N]``.
    """
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {k}")
    g = rewards.view(-1, k)                              # [prompts, k]
    adv = g - g.mean(-1, keepdim=True)
    if scale:
        std = g.std(-1, keepdim=True, unbiased=True)
        adv = torch.where(std > 0, adv / (std + eps), torch.zeros_like(adv))
    return adv.reshape(-1)


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str = "token", norm_len: int = 0) -> torch.Tensor:
    """A per-token loss ``[B, T]`` to a scalar.

    * ``token``: mean over every real token of the batch (PPO/RLOO here; DAPO's token-level
      mean): a long response weighs by its length.
    * ``seq``: mean over each response's tokens, then over responses (GRPO's
      ``1/|o_i| sum_t``): a short response's tokens weigh more -- the length bias Dr. GRPO names.
    * ``seq_sum``: each response's token sum divided by one constant ``norm_len`` (the
      response budget), then the mean over responses (Dr. GRPO): no length bias.
    """
    mask = mask.to(x.dtype)
    if how == "token":
        return masked_mean(x, mask)
    per_seq = (x * mask).sum(-1)
    if how == "seq":
        return (per_seq / mask.sum(-1).clamp(min=1)).mean()
    if how == "seq_sum":
        return per_seq.mean() / max(1, norm_len)
    raise ValueError(f"unknown loss aggregation {how!r}")


# ---------------------------------------------------------------- losses
@dataclass
class PolicyLossOut:
    loss: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2, agg: str = "token", norm_len: int = 0) -> PolicyLossOut:
    """PPO clipped surrogate (Schulman et al. 2017), per token:

        ratio = pi(a|s) / pi_old(a|s)
        L = agg_t max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps))

    ``agg`` (:func:`aggregate`) is the mean over tokens for PPO/RLOO, per response for GRPO.
    ``clip_frac`` is the share of tokens where the clipped branch was the active one.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = aggregate(torch.maximum(pg1, pg2), mask, agg, norm_len)
    with torch.no_grad():
        clip_frac = masked_mean((pg2 > pg1).float(), mask)
        akl = approx_kl(logp.detach(), old_logp, mask)
        ratio_mean = masked_mean(ratio.detach(), mask)
    return PolicyLossOut(loss, clip_frac, akl, ratio_mean)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (PPO2 / OpenAI baselines):

        V_clip = V_old + clip(V - V_old, -eps, eps)
        L_V = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

    Returns ``(loss, clip_frac)``; ``clip <= 0`` disables the clipping.
    """
    err = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * masked_mean(err, mask), torch.zeros((), device=values.device)
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    err_clip = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)
    with torch.no_grad():
        frac = masked_mean((err_clip > err).float(), mask)
    return loss, frac


# ---------------------------------------------------------------- KL coefficient control
class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"), eq. 2:

        e_t   = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta <- beta * (1 + K_beta * e_t),  K_beta = n_steps / horizon

    KL above the target raises beta (at most +20% per horizon's worth of episodes), below
    lowers it. ``n_steps`` is the number of episodes in the batch that measured KL_t.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL needs target > 0 and horizon > 0")
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        if not math.isfinite(current_kl):
            return self.value
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value


# ---------------------------------------------------------------- running score statistics
class RunningMoments:
    """Running mean/std of reward scores across steps (Chan et al. parallel update), for
    whitening scores with statistics that do not jump with every batch."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> tuple[float, float]:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return self.mean, self.std
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total
        return self.mean, self.std

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, st: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(st["mean"]), float(st["var"]), int(st["count"])


"""Experience making for PPO / RLOO / GRPO: roll out, score, and turn episodes into training tensors.

Kept apart from the update (``ppo.py``), OpenRLHF style: everything here runs without
gradients, and what it hands over (:class:`Experience`) is all the update needs.

One PPO step's experience, in order:

1. **Rollout** -- the policy samples a response to each prompt with the shared engine (KV
   cache, batched, stops at end-of-turn). A response cut by the length limit is
   ``finished=False``.
2. **Score** -- the reward suite scores (prompt, response text) pairs (``rewards.py``).
3. **Teacher-forced passes** -- the same episodes, in the micro-batches the first PPO epoch
   will use, through the policy (old log-probs, old values) and the reference (adapter off,
   or the frozen copy). Recomputing instead of trusting the sampler's log-probs makes the
   policy/old ratio *exactly* 1 on the first minibatch: same weights, same batch, same
   padding, same kernels. The sampler's log-probs are kept for a consistency check only.
4. **Advantages** -- PPO: per-token rewards ``-beta * KL_t`` plus the score on the last
   token, GAE with the value head, whitened. RLOO: sequence reward ``score - beta * sum_t
   KL_t``, leave-one-out baseline over the k samples of a prompt, broadcast to the tokens.

Sequence layout of a micro-batch (what :class:`PolicyValue` consumes): prompts left-padded
to a common length ``P``, responses right-padded to ``R``; positions count real tokens only
(left padding does not shift them, exactly as in the engine), so the hidden state at
``P - 1 + t`` predicts response token ``t`` -- for every row. The LM head runs on those
``R`` positions only: the 49k-vocab projection of prompt tokens is never computed.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn as nn

from chatforge.models.logprobs import backbone_and_head, entropy_from_logits, logprobs_from_logits
from chatforge.train import ppo_math as pm

Messages = list[dict[str, str]]


# ---------------------------------------------------------------- episodes
@dataclass
class Episode:
    prompt: Messages
    prompt_ids: list[int]
    response_ids: list[int]     # includes the end-of-turn token when the model ended its turn
    text: str                   # the response text, without end-of-turn
    finished: bool              # ended its turn (False: cut by the length limit)
    sampler_logprobs: list[float] | None = None
    group: int = 0              # index of the prompt it answers (RLOO groups)


def rollout(engine, prompts: Sequence[Messages], prompt_ids: Sequence[list[int]], sampling, k: int = 1
            ) -> list[Episode]:
    """``k`` sampled responses per prompt, grouped prompt-major (``i*k .. i*k+k-1``)."""
    ids = [list(p) for p in prompt_ids for _ in range(k)]
    comps = engine.generate(ids, sampling)
    eps = []
    for j, c in enumerate(comps):
        i = j // k
        eps.append(Episode(prompts[i], ids[j], list(c.token_ids), c.text, c.finish_reason != "length",
                           list(c.logprobs) if c.logprobs is not None else None, group=i))
    return eps


def sampling_config(cfg, tokenizer, seed: int, temperature: float | None = None,
                    max_new_tokens: int | None = None):
    """Engine settings for rollouts (``cfg``: a ``PPOConfig``); stop strings only when the
    end of turn is several tokens. Sampled log-probs are kept for the consistency check."""
    from chatforge.data.templates import stop_strings
    from chatforge.generate.engine import SamplingConfig

    t = cfg.temperature if temperature is None else temperature
    stops = [] if _single_token_eot(tokenizer, cfg) else stop_strings(tokenizer, cfg.template)
    return SamplingConfig(max_new_tokens=max_new_tokens or cfg.response_len, temperature=t,
                          top_k=cfg.top_k if t > 0 else 0, top_p=cfg.top_p if t > 0 else 1.0, stop=stops,
                          seed=seed, logprobs=True)


def _single_token_eot(tokenizer, cfg) -> bool:
    from chatforge.data.templates import end_of_turn

    eot = end_of_turn(tokenizer, cfg.template)
    return not eot or len(tokenizer(eot, add_special_tokens=False)["input_ids"]) == 1


# ---------------------------------------------------------------- batches
@dataclass
class Batch:
    """A micro-batch in the left-pad-prompt / right-pad-response layout."""

    input_ids: torch.Tensor       # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    position_ids: torch.Tensor    # [B, P + R]
    response: torch.Tensor        # [B, R]
    mask: torch.Tensor            # [B, R] 1 on real response tokens
    prompt_len: int               # P

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     self.response.to(device), self.mask.to(device), self.prompt_len)


def collate(episodes: Sequence[Episode], pad_id: int) -> Batch:
    P = max(len(e.prompt_ids) for e in episodes)
    R = max(len(e.response_ids) for e in episodes)
    B = len(episodes)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    resp = torch.full((B, R), pad_id, dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.long)
    for i, e in enumerate(episodes):
        p, r = e.prompt_ids, e.response_ids
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + len(r)] = torch.tensor(r)
        attn[i, P - len(p):P + len(r)] = 1
        resp[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, attn, pos, resp, mask, P)


# ---------------------------------------------------------------- the forward pass
@dataclass
class ForwardOut:
    logp: torch.Tensor                    # [B, R] log-prob of each response token
    values: torch.Tensor | None = None    # [B, R] V(s_t), the state before token t
    entropy: torch.Tensor | None = None   # [B, R] (no grad)


class PolicyValue(nn.Module):
    """Policy (and optionally value head) over response tokens, one forward for both.

    The value head reads the *policy's* last hidden state (shared trunk): no second network,
    no second forward. ``temperature`` divides the logits so that log-probs and KL are
    those of the distribution actually sampled from.

    Under DDP the trainer wraps this module (policy and value head together, so both are
    synced and checkpointed); only the update's forward goes through the wrapper, every
    other pass (old and reference log-probs, evaluation) through the plain module.
    """

    def __init__(self, model: nn.Module, value_head: nn.Module | None = None, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.temperature = temperature
        parts = backbone_and_head(model)
        if parts is None:
            raise ValueError(f"{type(model).__name__}: PPO needs a decoder body and a plain linear LM head")
        self._parts = parts  # a tuple: not registered twice as submodules

    def forward(self, b: Batch, values: bool = True, entropy: bool = False) -> ForwardOut:
        body, head = self._parts
        h = body(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                 use_cache=False).last_hidden_state
        R = b.response.shape[1]
        h = h[:, b.prompt_len - 1:b.prompt_len - 1 + R]
        logits = head(h).float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        out = ForwardOut(logprobs_from_logits(logits, b.response))
        if values and self.value_head is not None:
            out.values = self.value_head.per_token(h)
        if entropy:
            with torch.no_grad():
                out.entropy = entropy_from_logits(logits)
        return out


# ---------------------------------------------------------------- experience
@dataclass
class Experience:
    """One step's episodes and their tensors, ``[N, R]`` right-padded over responses."""

    episodes: list[Episode]
    order: list[list[int]]         # micro-batches of episode indices used by the old pass
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None
    old_values: torch.Tensor | None
    scores: torch.Tensor           # [N] the scores optimised (after whitening / penalty)
    kl: torch.Tensor               # [N, R] per-token KL estimate used in the reward
    stats: dict[str, float] = field(default_factory=dict)


def _fill(rows: list[int], part: torch.Tensor, full: torch.Tensor) -> None:
    full[rows, :part.shape[1]] = part.float().cpu()


@torch.no_grad()
def teacher_forced(pv: PolicyValue, episodes: Sequence[Episode], order: Sequence[Sequence[int]], pad_id: int,
                   device, autocast: Callable[[], ContextManager] = nullcontext, values: bool = True,
                   ref_context: Callable[[], ContextManager] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[N, R]`` log-probs (and values) of every episode, computed micro-batch by
    micro-batch in ``order`` (the update's first-epoch order: bit-identical forwards).
    ``pv`` is the plain module, not a DDP wrapper (no gradients, nothing to sync)."""
    N, R = len(episodes), max(len(e.response_ids) for e in episodes)
    logp = torch.zeros(N, R)
    vals = torch.zeros(N, R) if values else None
    ctx = ref_context or nullcontext
    for rows in order:
        b = collate([episodes[i] for i in rows], pad_id).to(device)
        with ctx(), autocast():
            out = pv(b, values=values)
        _fill(list(rows), out.logp, logp)
        if vals is not None and out.values is not None:
            _fill(list(rows), out.values, vals)
    return logp, vals


def response_mask(episodes: Sequence[Episode]) -> torch.Tensor:
    R = max(len(e.response_ids) for e in episodes)
    m = torch.zeros(len(episodes), R)
    for i, e in enumerate(episodes):
        m[i, :len(e.response_ids)] = 1
    return m


def advantages_ppo(scores: torch.Tensor, kl: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float, gamma: float, lam: float, whiten: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) from shaped per-token rewards and GAE."""
    rewards = pm.shape_rewards(scores, kl, mask, kl_coef)
    adv, ret = pm.gae(rewards, values, mask, gamma, lam)
    if whiten:
        adv = pm.masked_whiten(adv, mask)
    return adv, ret


def advantages_rloo(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, k: int,
                    whiten: bool) -> torch.Tensor:
    """Per-token advantages: the leave-one-out advantage of each sequence's KL-penalised
    reward, on every one of its tokens."""
    seq_reward = scores - kl_coef * pm.masked_sum(kl, mask, dim=1)
    adv = pm.rloo_advantages(seq_reward, k)
    if whiten:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8) if adv.numel() > 1 else adv
    return adv.unsqueeze(1) * mask


def advantages_grpo(scores: torch.Tensor, mask: torch.Tensor, k: int, scale: bool) -> torch.Tensor:
    """Per-token advantages: each sequence's group-normalised score on every one of its
    tokens. The KL to the reference is not in the reward: GRPO puts it in the loss."""
    return pm.grpo_advantages(scores, k, scale=scale).unsqueeze(1) * mask


def make_experience(pv: PolicyValue, ref_pv: PolicyValue, ref_context: Callable[[], ContextManager] | None,
                    episodes: list[Episode], scores: torch.Tensor, order: list[list[int]], *, pad_id: int,
                    device, autocast, algo: str, kl_coef: float, kl_estimator: str, gamma: float, lam: float,
                    k: int, whiten_advantages: bool, grpo_scale: bool = True,
                    first: ForwardOut | None = None) -> Experience:
    """Old log-probs / values (policy), reference log-probs, KL, advantages.

    ``first``: the update's own first forward of the single micro-batch ``order[0]`` (with
    gradients), when every episode of the step is in one micro-batch (the demo's RLOO, the
    PPO bench): before the first update the policy *is* the old policy, so its detached
    log-probs (and values) are the old ones, and the separate no-grad policy pass is
    skipped (~10 % of the demo's RLOO update time).
    """
    use_values = algo == "ppo"
    if first is None:
        old_logp, old_values = teacher_forced(pv, episodes, order, pad_id, device, autocast, values=use_values)
    else:
        if len(order) != 1:
            raise ValueError("make_experience(first=...) needs exactly one micro-batch")
        N, R = len(episodes), max(len(e.response_ids) for e in episodes)
        old_logp, old_values = torch.zeros(N, R), (torch.zeros(N, R) if use_values else None)
        _fill(list(order[0]), first.logp.detach(), old_logp)
        if old_values is not None and first.values is not None:
            _fill(list(order[0]), first.values.detach(), old_values)
    ref_logp, _ = teacher_forced(ref_pv, episodes, order, pad_id, device, autocast, values=False,
                                 ref_context=ref_context)
    mask = response_mask(episodes)
    kl = pm.kl_per_token(old_logp, ref_logp, kl_estimator) * mask  # type: ignore[arg-type]
    if use_values:
        assert old_values is not None
        old_values = old_values * mask
        adv, ret = advantages_ppo(scores, kl, old_values, mask, kl_coef, gamma, lam, whiten_advantages)
    elif algo == "grpo":
        adv, ret = advantages_grpo(scores, mask, k, grpo_scale), None
    else:
        adv, ret = advantages_rloo(scores, kl, mask, kl_coef, k, whiten_advantages), None
    kl1 = pm.masked_sum(pm.kl_k1(old_logp, ref_logp), mask, dim=1)  # sequence KL, k1 (unbiased, in nats)
    kl3 = pm.masked_sum(pm.kl_k3(old_logp, ref_logp), mask, dim=1)
    stats: dict[str, float] = {"kl": kl1.mean().item(), "kl_k3": kl3.mean().item(),
                               "kl_per_token": (pm.masked_sum(pm.kl_k1(old_logp, ref_logp), mask) / mask.sum()).item()}
    if use_values:
        stats["value_mean"] = pm.masked_mean(old_values, mask).item()
        stats["return_mean"] = pm.masked_mean(ret, mask).item()
    sampler = [(i, e.sampler_logprobs) for i, e in enumerate(episodes) if e.sampler_logprobs]
    if sampler and pv.temperature == 1.0:  # the engine's log-probs are at temperature 1
        diffs = [abs(a - b) for i, lp in sampler for a, b in zip(lp, old_logp[i, :len(lp)].tolist())]
        stats["sampler_logp_diff"] = sum(diffs) / max(1, len(diffs))
    return Experience(episodes, order, mask, old_logp, ref_logp, adv, ret, old_values, scores, kl, stats)


def minibatches(n: int, micro: int, seed: int) -> list[list[int]]:
    """A shuffled partition of ``range(n)`` into micro-batches (the last may be smaller)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + micro] for i in range(0, n, micro)]


def gather_rows(x: torch.Tensor | None, rows: list[int], R: int, device) -> torch.Tensor | None:
    return None if x is None else x[rows, :R].to(device)


def describe(exp: Experience) -> dict[str, Any]:
    """Rollout statistics for the step's log row."""
    lens = torch.tensor([len(e.response_ids) for e in exp.episodes], dtype=torch.float32)
    fin = torch.tensor([e.finished for e in exp.episodes], dtype=torch.float32)
    return {"response_len": lens.mean().item(), "eot_rate": fin.mean().item(), **exp.stats}

"""RLHF: PPO with a per-token KL penalty to the frozen starting (SFT) policy, and RLOO.

One step = experience (``experience.py``: roll out, score, old/reference log-probs,
advantages) + update (this file: a few epochs of clipped-surrogate minibatch SGD). The loop
around it (budget, logging, checkpoints with the value head and the KL controller, exact
resume, ranks that agree) is :mod:`chatforge.train.loop`'s.

* ``algo=ppo`` (Schulman et al. 2017; Ziegler et al. 2019; InstructGPT): per-token reward
  ``-beta * KL_t`` plus the score on the last token, GAE(gamma, lambda) with a value head,
  whitened advantages, clipped policy and value losses.
* ``algo=rloo`` (Ahmadian et al. 2024): k samples per prompt, each sequence's
  ``score - beta * KL`` minus the mean of the other k-1 -- no critic at all.
* ``algo=grpo`` (Shao et al. 2024, DeepSeekMath): k samples per prompt, advantage = the
  score normalised within its group (``(r - mean) / std``), the KL to the reference as a
  ``beta * k3`` term of the loss (not of the reward), the loss averaged per response.
  ``grpo_variant=dr_grpo`` (Liu et al. 2025): no std division and a length-unbiased loss
  (each response's token sum over the constant ``response_len``).

Memory layouts (``summary.json`` records ``layout`` and ``peak_rss_mb``):

* ``lora=true``: ONE frozen backbone. Policy = the LoRA adapter; reference = the same
  backbone with the adapter switched off (``model.disable_adapter()``); value = a
  :class:`~chatforge.models.heads.ScalarHead` on the policy's last hidden state (shared
  trunk: one forward gives log-probs and values). A LoRA reward model trained on the same
  base can join as another adapter (``--reward "rm:RUN?share=true"``).
* full fine-tuning: the policy + a frozen copy as reference (+ the head).

Several processes (``torchrun``): each rank rolls out its own share of the step's prompts;
policy and value head are one DDP module (:class:`~chatforge.train.experience.PolicyValue`),
whose wrapper runs only the update's forward (gradients synced); rollouts, old/reference
log-probs and evaluation use the plain module. The KL controller sees the KL of all ranks.

Levers, in the order they matter on a 2-core CPU: LoRA (no second model, small optimizer
state), bf16 autocast, the LM head only on response positions, response length
(``response_len``), ``ppo_epochs`` (each is a forward + backward over the whole batch).

Logged per step (``metrics.jsonl``, averaged over ranks; ``reward_kl.png``; ``samples.jsonl``
every ``sample_every`` steps):

* ``reward`` / ``reward_std``  weighted reward of the rollouts before whitening/penalties;
  ``score``: what was optimised; ``reward/NAME``: each component.
* ``kl``          mean over episodes of ``sum_t (log pi - log ref)`` on the sampled tokens
                  (nats per response; ``kl_k3`` the k3 estimate); ``kl_coef`` = beta.
* ``entropy``     mean per-token entropy of the policy (first epoch).
* ``clip_frac`` / ``value_clip_frac``  share of tokens where the clipped branch was active.
* ``policy_loss``, ``value_loss``, ``approx_kl`` (KL(old || new), k3), ``ratio_dev0``
  (max |log pi - log pi_old| on the first minibatch before any update: must be 0).
* ``response_len``, ``eot_rate`` (share of responses that ended their turn),
  ``tokens_per_s`` (response tokens of all ranks per second of the step), ``episodes_per_s``,
  ``episodes`` (all ranks, so far).

Debugging tips: ``ratio_dev0`` must be exactly 0 and ``kl`` 0 at step 1 (for a fresh LoRA
adapter: B = 0). A reward that rises while ``kl`` explodes and ``entropy`` collapses is
reward hacking: raise ``kl_coef`` or use ``adaptive_kl``. A falling ``eot_rate`` means the
policy learns to ramble: set ``missing_eot_reward``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn as nn

from chatforge.config import check_range
from chatforge.data.split import read_prompts, split_indices
from chatforge.errors import ConfigError, DataError
from chatforge.runs import Run, atomic_write_text
from chatforge.textstats import compare_scores, degeneration
from chatforge.train import core
from chatforge.train import experience as xp
from chatforge.train import ppo_math as pm
from chatforge.train.core import TrainConfig
from chatforge.train.loop import Checkpointer, Loop, begin, open_run, pad_id_of

Messages = list[dict[str, str]]
PLOT_KEYS = ["reward", "kl", "kl_coef", "entropy", "clip_frac", "value_loss", "response_len", "eot_rate"]


# ---------------------------------------------------------------- config
@dataclass
class PPOConfig(TrainConfig):
    """PPO / RLOO recipe. ``model`` is the starting policy and the reference (``--policy``),
    ``data`` the prompt files (``--prompts``; any record kind: its prompt part is used),
    ``eval_data`` held-out prompts for the final evaluation (default: ``eval_fraction``)."""

    algo: Literal["ppo", "rloo", "grpo"] = "ppo"
    grpo_variant: Literal["grpo", "dr_grpo"] = "grpo"  # dr_grpo: no std scaling, length-unbiased loss
    rewards: list[str] = field(default_factory=list)   # reward specs (see rewards.py); repeat to combine
    rollout_batch: int = 8             # prompts per step
    samples_per_prompt: int = 0        # k; 0 = auto: 1 for ppo, 4 for rloo / grpo
    response_len: int = 64             # max new tokens per response
    max_prompt_len: int = 256          # longer prompts keep their end (the last turn)
    temperature: float = 1.0           # rollouts; log-probs and KL are those of this distribution
    top_k: int = 0
    top_p: float = 1.0
    ppo_epochs: int = 2                # passes over each step's episodes
    batch_size: int = 4                # episodes per forward (micro-batch)
    grad_accum: int = 1                # micro-batches per optimizer step (minibatch = batch_size * grad_accum)
    lr: float = 0.0                    # 0 = auto: 1e-5 full fine-tuning, 1e-4 with LoRA
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    warmup_steps: int = 0              # in PPO steps
    clip: float = 0.2                  # policy ratio clip epsilon
    vf_clip: float = 0.2               # value clip (0 = off)
    vf_coef: float = 0.1
    value_lr: float = 0.0              # value head lr; 0 = auto: 10x lr (a fresh head must catch up fast)
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05              # beta (initial value when adaptive)
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0             # nats per response (adaptive controller)
    kl_horizon: int = 10000            # episodes
    kl_stop: float = 0.0               # stop a step's epochs when approx-KL(old||new) exceeds this (0 = off)
    whiten_advantages: bool = True
    reward_whiten: bool = False        # running mean/std of scores
    reward_clip: float = 0.0           # clip scores to [-c, c] (0 = off)
    missing_eot_reward: float | None = None  # reward of a response cut by response_len (None = off)
    reward_batch_size: int = 8
    sample_every: int = 10             # write a few rollouts to samples.jsonl every N steps
    samples_logged: int = 4
    log_every: int = 1
    save_every: int = 25
    final_eval: bool = True            # policy vs start policy on held-out prompts at the end
    eval_prompts: int = 64
    eval_temperature: float = 0.0      # 0 = greedy answers for the comparison
    eval_kl_prompts: int = 32          # held-out prompts sampled (T=1) for the final KL estimate
    judge: str = ""                    # RM for the win rate (default: the first rm: reward)
    max_eval_records: int = 200

    def validate(self) -> None:
        if self.lr == 0.0:
            self.lr = 1e-4 if self.lora else 1e-5
        if self.value_lr == 0.0:
            self.value_lr = 10 * self.lr
        if self.samples_per_prompt == 0:
            self.samples_per_prompt = 1 if self.algo == "ppo" else 4
        super().validate()
        check_range("rollout_batch", self.rollout_batch, 1, None)
        check_range("samples_per_prompt", self.samples_per_prompt, 1, 256)
        if self.algo != "ppo" and self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be >= 2 for {self.algo} (the baseline is the other samples)")
        check_range("response_len", self.response_len, 1, None)
        check_range("max_prompt_len", self.max_prompt_len, 1, None)
        check_range("temperature", self.temperature, 0, None, lo_open=True)
        check_range("top_k", self.top_k, 0, None)
        check_range("top_p", self.top_p, 0, 1, lo_open=True)
        check_range("ppo_epochs", self.ppo_epochs, 1, 100)
        check_range("clip", self.clip, 0, None, lo_open=True)
        check_range("vf_clip", self.vf_clip, 0, None)
        check_range("vf_coef", self.vf_coef, 0, None)
        check_range("value_lr", self.value_lr, 0, 1, lo_open=True)
        check_range("gamma", self.gamma, 0, 1)
        check_range("lam", self.lam, 0, 1)
        check_range("kl_coef", self.kl_coef, 0, None)
        check_range("kl_target", self.kl_target, 0, None, lo_open=True)
        check_range("kl_horizon", self.kl_horizon, 1, None)
        check_range("kl_stop", self.kl_stop, 0, None)
        check_range("reward_clip", self.reward_clip, 0, None)
        check_range("reward_batch_size", self.reward_batch_size, 1, None)
        check_range("sample_every", self.sample_every, 1, None)
        check_range("samples_logged", self.samples_logged, 0, None)
        check_range("eval_prompts", self.eval_prompts, 0, None)
        check_range("eval_temperature", self.eval_temperature, 0, None)
        check_range("eval_kl_prompts", self.eval_kl_prompts, 0, None)
        if self.missing_eot_reward is not None and not math.isfinite(self.missing_eot_reward):
            raise ConfigError("missing_eot_reward must be a finite number")
        from chatforge.train.rewards import parse_reward_spec

        for spec in self.rewards:
            parse_reward_spec(spec)

    @property
    def episodes_per_step(self) -> int:
        return self.rollout_batch * self.samples_per_prompt


# ---------------------------------------------------------------- prompts
def load_prompts(cfg: PPOConfig, log=print) -> tuple[list[Messages], list[Messages]]:
    """(train prompts, held-out prompts): ``eval_data``, else the seeded record split of
    :mod:`chatforge.data.split` (nothing held out without ``final_eval``)."""
    if not cfg.data:
        raise ConfigError("prompts: give at least one prompt file (--prompts)")
    prompts, _ = read_prompts(cfg.data, cfg.format, log)
    if cfg.eval_data:
        held, _ = read_prompts(cfg.eval_data, cfg.format, log)
    else:
        train_idx, held_idx = split_indices(len(prompts), cfg.eval_fraction if cfg.final_eval else 0.0, cfg.seed,
                                            cfg.max_eval_records)
        prompts, held = [prompts[i] for i in train_idx], [prompts[i] for i in held_idx]
    if not prompts:
        raise DataError(f"{', '.join(cfg.data)}: no usable prompts")
    return prompts, held[:cfg.max_eval_records]


def encode_prompts(tokenizer, prompts: Sequence[Messages], cfg: PPOConfig) -> list[list[int]]:
    """Chat-template ids with the generation prompt; over-long prompts keep their end."""
    from chatforge.data.tokenize import encode_prompt

    return [list(encode_prompt(tokenizer, p, cfg.template))[-cfg.max_prompt_len:] for p in prompts]


# ---------------------------------------------------------------- models
def disable_dropout(model) -> None:
    """p = 0 in every dropout layer (LoRA's too): with dropout on, the policy/old ratio
    would not be 1 even before an update, and the KL to the reference would be noise."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def new_value_head(model):
    """A zero-initialised scalar head on the policy's hidden size: V = 0 at the start, so the
    first value losses are the plain squared returns instead of noise on top of them."""
    from chatforge.models.heads import ScalarHead

    return ScalarHead(model.config.hidden_size, bias=True, init_std=0.0)


# ---------------------------------------------------------------- the update
def rank_mean(accelerator, x: float) -> float:
    """The mean of ``x`` over ranks (collective; ``x`` itself on one process)."""
    if accelerator.num_processes == 1:
        return x
    t = accelerator.reduce(torch.tensor([x], dtype=torch.float64, device=accelerator.device), reduction="sum")
    return t.item() / accelerator.num_processes


def ppo_update(pv_t, exp: xp.Experience, opt, accelerator, cfg: PPOConfig, pad_id: int, seed: int,
               beta: float = 0.0, first: xp.ForwardOut | None = None) -> dict[str, float]:
    """``ppo_epochs`` passes of clipped-surrogate SGD over the step's episodes (``beta``: the
    KL coefficient, used here by GRPO only; PPO / RLOO put the KL into the reward).

    ``pv_t`` is the prepared (under DDP: wrapped) :class:`~chatforge.train.experience.PolicyValue`,
    so its backward syncs gradients. Epoch 0 walks the micro-batches in ``exp.order`` -- the
    order the old log-probs were computed in -- so the first minibatch sees ratio == 1
    exactly. The ``kl_stop`` early stop is decided on the KL of all ranks (they stop
    together). ``first``: the forward of epoch 0's first micro-batch, already run by the
    caller (:func:`fused_first_forward`). Returns mean statistics.
    """
    dev = accelerator.device
    use_values = cfg.algo == "ppo"
    grpo = cfg.algo == "grpo"
    agg = {"grpo": "seq", "dr_grpo": "seq_sum"}[cfg.grpo_variant] if grpo else "token"
    acc_stats: dict[str, list[float]] = {}

    def add(**kv: float) -> None:
        for k, v in kv.items():
            acc_stats.setdefault(k, []).append(float(v))

    n = len(exp.episodes)
    stopped = False
    before_update = True
    for epoch in range(cfg.ppo_epochs):
        order = exp.order if epoch == 0 else xp.minibatches(n, cfg.batch_size, seed * 1000 + epoch)
        for m0 in range(0, len(order), cfg.grad_accum):
            micros = order[m0:m0 + cfg.grad_accum]
            kls = []
            for j, rows in enumerate(micros):
                b = xp.collate([exp.episodes[i] for i in rows], pad_id).to(dev)
                R = b.response.shape[1]
                mask = exp.mask[rows, :R].to(dev)
                with accelerator.no_sync(pv_t) if j < len(micros) - 1 else nullcontext():
                    if first is not None and epoch == 0 and m0 == 0 and j == 0:
                        out = first
                    else:
                        with accelerator.autocast():
                            out = pv_t(b, values=use_values, entropy=epoch == 0)
                    old = exp.old_logp[rows, :R].to(dev)
                    pl = pm.policy_loss(out.logp, old, exp.advantages[rows, :R].to(dev), mask, cfg.clip,
                                        agg, cfg.response_len)
                    loss = pl.loss
                    if grpo and beta > 0:  # GRPO: the KL to the reference in the loss, k3 per token
                        kl_t = pm.kl_k3(out.logp, exp.ref_logp[rows, :R].to(dev))
                        kl_term = pm.aggregate(kl_t, mask, agg, cfg.response_len)
                        loss = loss + beta * kl_term
                        add(kl_loss=kl_term.item())
                    if use_values:
                        vl, vclip = pm.value_loss(out.values, exp.old_values[rows, :R].to(dev),
                                                  exp.returns[rows, :R].to(dev), mask, cfg.vf_clip)
                        loss = loss + cfg.vf_coef * vl
                        add(value_loss=vl.item(), value_clip_frac=vclip.item())
                    accelerator.backward(loss / len(micros))
                if before_update:  # no optimizer step yet: new and old policy are the same weights
                    add(ratio_dev0=float(((out.logp.detach() - old).abs() * mask).max()))
                add(policy_loss=pl.loss.item(), clip_frac=pl.clip_frac.item(), approx_kl=pl.approx_kl.item())
                if out.entropy is not None:
                    add(entropy=pm.masked_mean(out.entropy, mask).item())
                kls.append(pl.approx_kl.item())
            if cfg.grad_clip > 0:
                gn = accelerator.clip_grad_norm_(pv_t.parameters(), cfg.grad_clip)
                add(grad_norm=float(gn))
            opt.step()
            opt.zero_grad(set_to_none=True)
            before_update = False
            if cfg.kl_stop > 0 and rank_mean(accelerator, sum(kls) / len(kls)) > cfg.kl_stop:
                stopped = True
                break
        if stopped:
            break
    out_stats = {k: sum(v) / len(v) for k, v in acc_stats.items()}
    out_stats["ratio_dev0"] = max(acc_stats.get("ratio_dev0", [0.0]))
    out_stats["epochs_done"] = epoch + (0 if stopped else 1)
    return out_stats


def fused_first_forward(pv_t, episodes: list[xp.Episode], order: list[list[int]], accelerator, cfg: PPOConfig,
                        pad_id: int) -> xp.ForwardOut | None:
    """The update's first forward, run before the experience is made, when every episode of
    the step is in one micro-batch: before the first optimizer step the policy *is* the old
    policy, so that forward's detached log-probs (and values) are the old ones (see
    :func:`chatforge.train.experience.make_experience`); later epochs run their own
    forwards. None with several micro-batches (the old pass must cover all of them before
    the first optimizer step).

    Measured on the demo's RLOO step (16 episodes x 40 tokens, LoRA, SmolLM2-135M, 2-core
    AMD EPYC, bf16): the update part 10.2-12.6 s -> 9.1-11.3 s (docs/results/demo.md).
    """
    if len(order) != 1:
        return None
    b = xp.collate([episodes[i] for i in order[0]], pad_id).to(accelerator.device)
    with accelerator.autocast():
        return pv_t(b, values=cfg.algo == "ppo", entropy=True)


# ---------------------------------------------------------------- evaluation
def generate_texts(model, tokenizer, prompt_ids: list[list[int]], cfg: PPOConfig, temperature: float, seed: int,
                   context=nullcontext) -> list[xp.Episode]:
    """One response per prompt (``context``: e.g. the adapter switched off); fp32 decoding."""
    from chatforge.generate.engine import Engine

    with context():
        eng = Engine(model, tokenizer)
        comps = eng.generate(prompt_ids, xp.sampling_config(cfg, tokenizer, seed, temperature))
    return [xp.Episode([], p, list(c.token_ids), c.text, c.finish_reason != "length", c.logprobs)
            for p, c in zip(prompt_ids, comps)]


def evaluate_policy(pv: xp.PolicyValue, ref_pv: xp.PolicyValue, ref_context, tokenizer, prompts: list[Messages],
                    cfg: PPOConfig, rewards, judge, pad_id: int, device, autocast=nullcontext) -> dict[str, Any]:
    """The trained policy vs the starting policy on held-out prompts (``pv``, ``ref_pv``:
    plain modules, not DDP wrappers).

    * ``win_rate``: both answer every prompt (``eval_temperature``; greedy by default), the
      judge reward model scores both, ties count half.
    * ``reward_policy`` / ``reward_start``: the training reward on the same answers.
    * ``rep_ngram_*``, ``loop_rate_*``, ``eot_rate_*``: degeneration of each side.
    * ``kl_eval``: Monte-Carlo KL(policy || start) in nats per response, responses sampled at
      the training temperature, both log-probs from the same teacher-forced pass.
    """
    model = pv.model
    ids = encode_prompts(tokenizer, prompts[:cfg.eval_prompts], cfg)
    use = prompts[:len(ids)]
    ref_model = ref_pv.model
    ours = generate_texts(model, tokenizer, ids, cfg, cfg.eval_temperature, cfg.seed)
    start = generate_texts(ref_model, tokenizer, ids, cfg, cfg.eval_temperature, cfg.seed, ref_context or nullcontext)
    out: dict[str, Any] = {"eval_prompts": len(ids)}
    for name, eps in (("policy", ours), ("start", start)):
        texts = [e.text for e in eps]
        r = rewards(use, texts, [e.finished for e in eps], update_stats=False)
        out[f"reward_{name}"] = r.raw.mean().item()
        deg = degeneration(texts, ["eos" if e.finished else "length" for e in eps])
        out[f"rep_ngram_{name}"] = deg["rep_ngram"]
        out[f"loop_rate_{name}"] = deg["loop_rate"]
        out[f"eot_rate_{name}"] = 1.0 - deg.get("no_eos_rate", 0.0)
        out[f"response_len_{name}"] = sum(len(e.response_ids) for e in eps) / max(1, len(eps))
    if judge is not None:
        s_ours = judge.score(use, [e.text for e in ours])
        s_start = judge.score(use, [e.text for e in start])
        wins = [compare_scores(a, b) for a, b in zip(s_ours, s_start)]
        out.update(win_rate=sum(wins) / len(wins), judge_score_policy=sum(s_ours) / len(s_ours),
                   judge_score_start=sum(s_start) / len(s_start))
    if cfg.eval_kl_prompts:
        kl_ids = ids[:cfg.eval_kl_prompts]
        eps = generate_texts(model, tokenizer, kl_ids, cfg, cfg.temperature, cfg.seed + 1)
        order = [list(range(i, min(i + cfg.batch_size, len(eps)))) for i in range(0, len(eps), cfg.batch_size)]
        lp, _ = xp.teacher_forced(pv, eps, order, pad_id, device, autocast, values=False)
        lr, _ = xp.teacher_forced(ref_pv, eps, order, pad_id, device, autocast, values=False, ref_context=ref_context)
        mask = xp.response_mask(eps)
        out["kl_eval"] = pm.masked_sum(lp - lr, mask, dim=1).mean().item()
    out["examples"] = [{"prompt": p[-1]["content"][:300], "policy": a.text[:400], "start": b.text[:400]}
                       for p, a, b in list(zip(use, ours, start))[:5]]
    return out


def find_judge(cfg: PPOConfig, rewards):
    """The reward model that judges the win rate: ``judge``, else the first ``rm:`` reward."""
    from chatforge.models.heads import load_scorer
    from chatforge.train.rewards import ModelReward

    if cfg.judge:
        return load_scorer(cfg.judge, batch_size=cfg.reward_batch_size)
    for _, fn, _ in rewards.parts:
        if isinstance(fn, ModelReward):
            return fn.scorer
    return None


# ---------------------------------------------------------------- the loop
def total_ppo_steps(cfg: PPOConfig, n_prompts: int, world: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_prompts / (cfg.rollout_batch * world)))


def write_samples(run: Run, step: int, exp: xp.Experience, n: int) -> None:
    if not run.is_main or n <= 0:
        return
    with open(run.path / "samples.jsonl", "a", encoding="utf-8") as f:
        for i, e in enumerate(exp.episodes[:n]):
            f.write(json.dumps({"step": step, "prompt": e.prompt[-1]["content"] if e.prompt else "",
                                "response": e.text, "score": round(float(exp.scores[i]), 4),
                                "finished": e.finished}, ensure_ascii=False) + "\n")


def forget_samples_after(run: Run, step: int) -> None:
    """On resume: drop samples of steps after the checkpoint (they are rolled out again)."""
    f = run.path / "samples.jsonl"
    if run.is_main and f.exists():
        keep = [ln for ln in f.read_text(encoding="utf-8").splitlines(keepends=True)
                if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(f, "".join(keep))


def first_and_last(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means of the first and last few logged steps of the curves worth comparing."""
    out: dict[str, float] = {}
    rows = [r for r in rows if "reward" in r]
    if rows:
        n = max(1, min(3, len(rows) // 4))
        for k in ("reward", "kl", "entropy", "response_len", "eot_rate"):
            if k in rows[0]:
                out[f"{k}_first"] = sum(r[k] for r in rows[:n]) / n
                out[f"{k}_last"] = sum(r[k] for r in rows[-n:]) / n
    return out


OnStep = Callable[[int, nn.Module, list[list[int]]], None]


def train(cfg: PPOConfig, resume: bool = False, overwrite: bool = False,
          reward_fns: Sequence[Callable] = (), on_step: OnStep | None = None) -> Path:
    """Run PPO / RLOO; returns the run folder's ``model/``. ``reward_fns`` are extra Python
    callables ``f(prompts, responses) -> list[float]`` (weight 1), for use from Python.

    ``on_step(step, policy, [prompt_indices])`` is called after every step on every rank
    with this rank's prompt indices of the step (tests hash weights or simulate a kill there).
    """
    from chatforge.generate.engine import Engine
    from chatforge.models.load import load_model, load_tokenizer
    from chatforge.models.lora import is_peft
    from chatforge.train.rewards import build_rewards

    if not cfg.rewards and not reward_fns:
        raise ConfigError("rewards: give at least one --reward (rm:RUN, fn:MODULE:FUNCTION, clf:MODEL:LABEL)")
    if (acc := begin(cfg, resume)) is None:
        return Path(cfg.out) / "model"
    say = acc.print
    tokenizer = load_tokenizer(cfg.model)
    pad_id = pad_id_of(tokenizer)
    prompts, held_out = load_prompts(cfg, log=say)
    run = open_run(acc, cfg, resume, overwrite)
    prompt_ids = encode_prompts(tokenizer, prompts, cfg)
    rank, world = acc.process_index, acc.num_processes
    say(f"{len(prompts)} train prompts, {len(held_out)} held-out prompts; {cfg.episodes_per_step} episodes per "
        f"step and rank ({cfg.algo}, k={cfg.samples_per_prompt}, {world} rank{'s' if world > 1 else ''})")

    # models: policy (+ value head); reference = adapter off (LoRA) or a frozen copy
    model = load_model(cfg.model, dtype="fp32", merge_adapter=True)  # an SFT adapter is merged: it *is* the reference
    ref_model = None
    if not cfg.lora:
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    model = core.prepare_model(model, cfg).to(acc.device)
    if cfg.lora:
        core.name_adapter_base(model, cfg.model)
    disable_dropout(model)  # old and new log-probs must come from the same function
    model.train()  # (train mode only so that gradient checkpointing, which HF runs in train mode, works)
    value_head = new_value_head(model).to(acc.device) if cfg.algo == "ppo" else None
    layout = "lora: one frozen backbone (policy = adapter, reference = adapter off)" if cfg.lora else \
        "full: policy + frozen reference copy"
    if value_head is not None:
        layout += " + value head on the policy's hidden states"

    rewards = build_rewards(list(cfg.rewards) + list(reward_fns), whiten=cfg.reward_whiten, clip=cfg.reward_clip,
                            missing_eot_reward=cfg.missing_eot_reward, onto=model if is_peft(model) else None,
                            batch_size=cfg.reward_batch_size)
    if world > 1:  # whitening statistics over every rank's scores (the same on all ranks)
        rewards.gather = lambda t: acc.gather(t.to(acc.device)).cpu()
    steps = total_ppo_steps(cfg, len(prompts), world)
    opt = core.build_optimizer(model, cfg)
    if value_head is not None:  # its own lr: a zero-initialised head must learn the return scale quickly
        opt.add_param_group({"params": list(value_head.parameters()), "lr": cfg.value_lr, "weight_decay": 0.0})
    sched = core.build_scheduler(opt, cfg, steps)
    # one prepared module for policy + value head: DDP syncs both, the checkpoint holds both
    pv_t, opt, sched = acc.prepare(xp.PolicyValue(model, value_head, cfg.temperature), opt, sched)
    pv = acc.unwrap_model(pv_t)  # attributes, rollouts, old / reference log-probs, evaluation
    ref_pv, ref_context = (pv, model.disable_adapter) if ref_model is None else \
        (xp.PolicyValue(ref_model.to(acc.device), None, cfg.temperature), None)
    kl_ctl = pm.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl \
        else pm.FixedKLController(cfg.kl_coef)

    episodes_seen, idx = 0, []
    saver = Checkpointer(acc, run, model, tokenizer, cfg,
                         extra_modules={"value_head": value_head} if value_head is not None else None)
    loop = Loop(acc, run, cfg, steps, cfg.algo, saver, scheduler=sched, show=("reward", "kl"),
                state=lambda: {"kl_ctl": kl_ctl.state_dict(), "rewards": rewards.state_dict(),
                               "episodes": episodes_seen},
                on_step=(lambda s: on_step(s, model, [list(idx)])) if on_step else None,
                plot=("reward_kl.png", PLOT_KEYS, f"{cfg.algo.upper()} on {cfg.model}"))
    state = loop.resume(resume)  # policy, value head, optimizer, scheduler, RNG, step
    if state:
        kl_ctl.load_state_dict(state["kl_ctl"])
        rewards.load_state_dict(state["rewards"])
        episodes_seen = int(state["episodes"])
        forget_samples_after(run, loop.step)
    batches = core.batch_indices(len(prompts), cfg.rollout_batch, cfg.seed, rank, world, start_batch=loop.step)
    engine = Engine(model, tokenizer)
    for step in loop:
        t_step = time.perf_counter()
        idx = next(batches)
        seed = (cfg.seed * 1_000_003 + step - 1) * world + rank
        # decoding runs in fp32: one token per row per step is latency-bound, and autocast's
        # per-op casts cost more than bf16 matmuls save (measured on SmolLM2, 2-core CPU)
        episodes = xp.rollout(engine, [prompts[i] for i in idx], [prompt_ids[i] for i in idx],
                              xp.sampling_config(cfg, tokenizer, seed), cfg.samples_per_prompt)
        t_gen = time.perf_counter() - t_step
        r = rewards([e.prompt for e in episodes], [e.text for e in episodes], [e.finished for e in episodes])
        t_score = time.perf_counter() - t_step - t_gen
        order = xp.minibatches(len(episodes), cfg.batch_size, seed * 1000)
        first = fused_first_forward(pv_t, episodes, order, acc, cfg, pad_id)
        exp = xp.make_experience(pv, ref_pv, ref_context, episodes, r.scores, order, pad_id=pad_id,
                                 device=acc.device, autocast=acc.autocast, algo=cfg.algo, kl_coef=kl_ctl.value,
                                 kl_estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=cfg.lam,
                                 k=cfg.samples_per_prompt, whiten_advantages=cfg.whiten_advantages,
                                 grpo_scale=cfg.grpo_variant == "grpo", first=first)
        upd = ppo_update(pv_t, exp, opt, acc, cfg, pad_id, seed, beta=kl_ctl.value, first=first)
        del first
        sched.step()
        beta = kl_ctl.value
        kl_ctl.update(rank_mean(acc, exp.stats["kl"]), len(episodes) * world)  # every rank: the same beta
        episodes_seen += len(episodes) * world
        dt = time.perf_counter() - t_step
        parts = {f"reward/{k}": sum(v) / len(v) for k, v in r.parts.items()} if len(r.parts) > 1 else {}
        loop.record(tokens=sum(len(e.response_ids) for e in episodes), reward=r.raw.mean().item(),
                    reward_std=r.raw.std().item() if len(episodes) > 1 else 0.0, score=r.scores.mean().item(),
                    kl_coef=beta, **parts, **xp.describe(exp), **upd, episodes_per_s=len(episodes) * world / dt,
                    time_rollout=t_gen, time_score=t_score, time_update=dt - t_gen - t_score)
        loop.note(episodes=episodes_seen)
        if step == 1 or step % cfg.sample_every == 0:
            write_samples(run, step, exp, cfg.samples_logged)

    summary: dict[str, Any] = {"algo": cfg.algo, "layout": layout, "episodes": episodes_seen,
                               "train_prompts": len(prompts), "kl_coef_final": kl_ctl.value,
                               "episodes_per_s": episodes_seen / max(loop.train_s, 1e-9)}
    summary.update(first_and_last(run.read_metrics() if acc.is_main_process else []))
    if cfg.final_eval and held_out and acc.is_main_process:
        with torch.random.fork_rng(devices=[]):
            ev = evaluate_policy(pv, ref_pv, ref_context, tokenizer, held_out, cfg, rewards, find_judge(cfg, rewards),
                                 pad_id, acc.device, acc.autocast)
        run.write_json("eval.json", ev)
        summary.update({k: v for k, v in ev.items() if k != "examples"})
        say("held-out: " + ", ".join(f"{k}={v:.3f}" for k, v in ev.items() if isinstance(v, float)))
    return loop.finish(merge=cfg.lora and core.starts_from_adapter(cfg.model), **summary)

"""Direct preference optimisation: DPO (sigmoid), conservative DPO (label smoothing), IPO.

The practical alternative to RM + PPO: the policy is pushed to raise the log-likelihood of
the chosen response relative to the rejected one, *measured against a frozen reference*
(the starting SFT policy), with no reward model and no sampling in the loop.

The step is in the open below (:func:`train`); set-up comes from :mod:`chatforge.train.core`,
the loop (budget, cadence, checkpoints, exact resume) from :mod:`chatforge.train.loop`, records
and the held-out split from :mod:`chatforge.data.split` (the reward model's rule: same files,
``eval_fraction`` and ``seed`` -> same held-out records, written to ``split.json``).

Data: ``Preference`` records, and ``Ranking`` records expanded to their (better, worse)
pairs (``Ranking.ordered_pairs``: K(K-1)/2 without ties, none between tied responses),
tokenised by :mod:`chatforge.data.pairs`. Pairs whose two responses are identical or empty
(before or after truncation to ``max_len``) teach nothing and are reported and skipped. A
ranking marked "all answers unacceptable" (``chatforge label``) is used for the order among
the bad answers (``unacceptable=keep``, default) or skipped (``drop``), counted either way:
the reward model's rule (:func:`chatforge.data.prefs.ranked_responses`).

Sequence log-probability: ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)`` over the response
tokens and its end-of-turn (labels from ``data.tokenize.encode_prompt_response``), summed,
not averaged, for every loss (also IPO; TRL length-normalises IPO, we do not).

Reference log-probs are computed ONCE before training and cached in the run folder
(``ref_logps.pt``, tensors and a fingerprint only: read with ``weights_only=True``): full
fine-tuning scores the data with the frozen initial policy, LoRA with the adapter-off backbone
(``model.disable_adapter()``). So there is never a second model in memory while training --
the main memory lever vs TRL's resident reference copy. ``max_minutes`` budgets the loop's
training time; this one-off pass is outside it (``reference_time_s`` in the summary).

Levers (in the order they matter on a 2-core CPU): bf16 autocast (``precision``), LoRA
(``lora=true``), chosen + rejected after ONE copy of the prompt in one row (``share_prompt``,
:mod:`chatforge.train.shared_prompt`: 1.7x per step on hh-rlhf), the LM head applied only to
response positions, length-sorted batches for the reference and eval passes, gradient
checkpointing (memory, not speed).

Logged metrics (``metrics.jsonl``; train values are means over the last ``log_every``
optimizer steps, ``eval_*`` over the held-out pairs; ``lr``, ``grad_norm``, ``tokens_per_s``
from the loop):

* ``loss``: the DPO/IPO loss.
* ``acc``: implicit reward accuracy, the share of pairs whose chosen reward beats the rejected
  one. Ties count HALF (a policy equal to its reference scores exactly 0.5, chance; TRL counts
  ties as wrong, which reads 0.0 at step 0).
* ``margin``: mean ``r_chosen - r_rejected`` with the implicit reward
  ``r = beta * (log pi(y|x) - log ref(y|x))``; ``chosen_reward`` / ``rejected_reward`` the two.
* ``chosen_logp`` / ``rejected_logp``: policy sequence log-probs. Both usually fall during DPO
  (the rejected faster); a collapsing chosen log-prob with a rising margin is the known failure
  mode (lower ``lr`` / raise ``beta``).
* ``kl``: KL(policy || reference) on held-out prompts: responses sampled from the policy
  (temperature 1), mean over prompts of ``sum_t (log pi - log ref)`` over the sampled tokens
  (an unbiased Monte-Carlo estimate of the sequence KL; noisy with few prompts).
* ``win_rate`` (summary, when ``judge`` names a reward model): share of held-out prompts where
  the reward model scores the policy's greedy response above the starting policy's (ties half).

Debugging tips: at step 0 ``loss == log 2`` (sigmoid) and ``acc == 0.5`` and ``kl == 0``
exactly up to bf16 noise -- anything else means the reference cache does not match the
policy (wrong template, wrong model). A ``kl`` rising without ``eval_acc`` rising means
the policy is drifting, not learning the preference.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.config import check_range
from chatforge.data.pairs import DataReport, PairExample, encode_pair, expand_pairs
from chatforge.data.prefs import where_of
from chatforge.data.split import read_prompts, read_records, split_indices, split_note, unique_prompts
from chatforge.errors import ConfigError, DataError
from chatforge.models.logprobs import hidden_and_head, logprobs_from_logits
from chatforge.runs import Run
from chatforge.train import core
from chatforge.train.core import TrainConfig
from chatforge.train.loop import Checkpointer, Loop, begin, open_run, pad_id_of
from chatforge.train.shared_prompt import model_mask, pair_batch, share_prompt_ok


# ---------------------------------------------------------------- config
@dataclass
class DPOConfig(TrainConfig):
    """DPO recipe. ``model`` is the policy to start from (and the reference): usually an SFT
    run folder; the CLI calls it ``--policy``."""

    policy: str = ""                   # alias of `model` (wins when set)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    unacceptable: Literal["keep", "drop"] = "keep"  # rankings marked "all answers unacceptable"
    beta: float = 0.1                  # KL strength: sigmoid temperature / IPO target margin 1/(2 beta)
    label_smoothing: float = 0.0       # conservative DPO: assumed share of flipped labels (sigmoid only)
    lr: float = 0.0                    # 0 = auto: 5e-6 full fine-tuning, 5e-5 with LoRA
    batch_size: int = 4                # pairs per micro-batch (one row of prompt + chosen + rejected each)
    grad_accum: int = 2
    ref_batch_size: int = 16           # pairs per forward in the no-grad reference / eval passes
    eval_prompts: list[str] = field(default_factory=list)  # prompt files for KL / judge (default: eval pairs' prompts)
    kl_prompts: int = 8                # held-out prompts sampled for the KL estimate (0 = off)
    kl_max_new_tokens: int = 64
    judge: str = ""                    # reward model (run folder) for the final win rate vs the start policy
    judge_prompts: int = 64
    judge_max_new_tokens: int = 96
    share_prompt: bool = True          # chosen + rejected in one row after ONE copy of the prompt (shared_prompt.py)

    def validate(self) -> None:
        if self.policy:
            self.model = self.policy
        self.policy = self.model
        if self.lr == 0.0:
            self.lr = 5e-5 if self.lora else 5e-6  # resolved here so config.yaml records it
        super().validate()
        check_range("beta", self.beta, 0, None, lo_open=True)
        check_range("label_smoothing", self.label_smoothing, 0, 0.5, hi_open=True)
        if self.loss == "ipo" and self.label_smoothing > 0:
            raise ConfigError("label_smoothing applies to the sigmoid loss only (not ipo)")
        check_range("ref_batch_size", self.ref_batch_size, 1, None)
        check_range("kl_prompts", self.kl_prompts, 0, None)
        check_range("kl_max_new_tokens", self.kl_max_new_tokens, 1, None)
        check_range("judge_prompts", self.judge_prompts, 1, None)
        check_range("judge_max_new_tokens", self.judge_max_new_tokens, 1, None)


# ---------------------------------------------------------------- the losses
def dpo_loss(pol_chosen_logp: torch.Tensor, pol_rejected_logp: torch.Tensor,
             ref_chosen_logp: torch.Tensor, ref_rejected_logp: torch.Tensor, beta: float,
             loss: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards (rewards detached) from sequence log-probs.

    With h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)):

    * sigmoid (DPO, Rafailov et al. 2023):  L = -log sigmoid(beta * h)
      -- the Bradley-Terry likelihood of the preference under the implicit reward
      r(y) = beta * log(pi(y)/ref(y)).
    * label smoothing eps (conservative DPO): the label is wrong with probability eps,
      L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); its optimum is a finite
      margin, so the policy stops pushing once it is confident enough.
    * ipo (Azar et al. 2023):  L = (h - 1/(2 beta))^2 -- regresses the log-ratio gap to a
      fixed target instead of driving it to infinity, which is what over-fits DPO on
      deterministic preferences.

    Returns ``(loss[B], chosen_rewards[B], rejected_rewards[B])``.
    """
    chosen_ratio = pol_chosen_logp - ref_chosen_logp
    rejected_ratio = pol_rejected_logp - ref_rejected_logp
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        # logsigmoid is the numerically stable log(sigmoid(x)) (no overflow for |x| large)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"loss: {loss!r} is not one of sigmoid, ipo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair correctness: 1 if the chosen reward is higher, 0 if lower, 0.5 on a tie (so a
    policy identical to its reference is at chance, 0.5, rather than 0)."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


# ---------------------------------------------------------------- data
def load_pairs(cfg: DPOConfig, tokenizer, run: Run | None = None, log=print
               ) -> tuple[list[PairExample], list[PairExample], DataReport]:
    """Read, split by record (a ranking's pairs stay on one side), expand, tokenise.

    Without ``eval_data`` the split is :func:`chatforge.data.split.split_indices` (the reward
    model's: same seed and fraction -> same held-out records), written to ``split.json`` /
    ``heldout.jsonl`` in the run folder so evaluation can use exactly those prompts.
    """
    from chatforge.data.records import write_jsonl

    if not cfg.data:
        raise ConfigError("data: give at least one preference or ranking file")
    report = DataReport()
    records, report.read_errors = read_records(cfg.data, cfg.format, log)
    if cfg.eval_data:
        eval_records, errors = read_records(cfg.eval_data, cfg.format, log)
        report.read_errors += errors
    else:
        train_idx, held_idx = split_indices(len(records), cfg.eval_fraction, cfg.seed)
        eval_records = [records[i] for i in held_idx]
        if run is not None and run.is_main:
            run.write_json("split.json", split_note(cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed,
                                                    len(records), held_idx))
            write_jsonl(eval_records, run.path / "heldout.jsonl")
        records = [records[i] for i in train_idx]
    sets = []
    for recs in (records, eval_records):
        out = []
        for pair in expand_pairs(recs, report, cfg.unacceptable):
            ex = encode_pair(tokenizer, pair, cfg.max_len, cfg.template)
            if isinstance(ex, str):
                report.skip(ex, where_of(pair.meta))
            else:
                out.append(ex)
        sets.append(out)
    train, held_out = sets
    report.pairs = len(train) + len(held_out)
    if not train:
        raise DataError(f"{', '.join(cfg.data)}: no usable preference pairs ({'; '.join(report.lines())})")
    return train, held_out, report


def fingerprint(*sets: list[PairExample]) -> str:
    """Hash of every token and label: the reference cache is valid only for this exact data."""
    h = hashlib.sha256()
    for s in sets:
        for ex in s:
            for seq in (ex.prompt_ids, ex.chosen_ids, ex.chosen_labels, ex.rejected_ids, ex.rejected_labels):
                h.update(torch.tensor(seq, dtype=torch.int32).numpy().tobytes())
                h.update(b"|")
        h.update(b"#")
    return h.hexdigest()


# ---------------------------------------------------------------- sequence log-probs
class SequenceLogps(nn.Module):
    """``forward(**shared_prompt.build_batch(...)) -> (logps[n_seq], tokens[n_seq])``: summed
    log-probabilities of the scored tokens of each sequence.

    The LM head runs only on the hidden states that predict a scored token, so the
    vocabulary projection (49k x 576 on SmolLM2) of prompt and padding positions is never
    computed. A module (not a function) so accelerate/DDP wrap the whole computation.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, src_row, src_pos, target, seq, n_seq):
        h, head = hidden_and_head(self.model, input_ids=input_ids, position_ids=position_ids,
                                  attention_mask=model_mask(self.model, attention_mask))
        h = h[src_row, src_pos]                                               # [n_scored, d] (or logits)
        tok_logp = logprobs_from_logits(head(h) if head is not None else h, target)  # [n_scored]
        n = int(n_seq)
        logps = torch.zeros(n, dtype=torch.float32, device=input_ids.device).index_add(0, seq, tok_logp)
        return logps, torch.bincount(seq, minlength=n)


@torch.no_grad()
def score_pairs(scorer: SequenceLogps, pairs: list[PairExample], batch_size: int, pad_id: int,
                autocast=nullcontext, desc: str | None = None, share_prompt: bool | None = None) -> torch.Tensor:
    """``[N, 2]`` (chosen, rejected) sequence log-probs, no grad, eval mode, batches of
    similar length (sorted) so little padding is computed. Order of ``pairs`` is kept."""
    from tqdm.auto import tqdm

    if share_prompt is None:
        share_prompt = share_prompt_ok(scorer.model)
    was_training = scorer.training
    scorer.eval()
    out = torch.zeros(len(pairs), 2)
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    device = next(scorer.parameters()).device
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        b = {k: v.to(device) for k, v in pair_batch([pairs[i] for i in idx], pad_id, share_prompt).items()}
        with autocast():
            logps, _ = scorer(**b)
        logps = logps.float().cpu()
        out[idx, 0], out[idx, 1] = logps[:len(idx)], logps[len(idx):]
    scorer.train(was_training)
    return out


@contextmanager
def reference_of(model, cfg: DPOConfig) -> Iterator[nn.Module]:
    """The reference policy without keeping a second model for training: under LoRA the
    adapter-off backbone; for full fine-tuning the starting weights re-read from ``cfg.model``
    for the duration of the block only (KL / judge evaluation, never inside the step)."""
    from chatforge.models.lora import is_peft

    if is_peft(model):
        with model.disable_adapter():
            yield model
        return
    ref = load_policy(cfg.model).to(next(model.parameters()).device).eval()
    try:
        yield ref
    finally:
        del ref


def load_policy(name: str):
    """The starting policy. A LoRA-adapter SFT run is merged, so that it is the reference
    (the adapter-off backbone of a fresh DPO adapter would otherwise be the *base* model)."""
    from chatforge.models.load import load_model

    return load_model(name, dtype="fp32", merge_adapter=True)


def reference_logps(model, cfg: DPOConfig, sets: dict[str, list[PairExample]], pad_id: int, accelerator,
                    cache: Path | None, needed: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Reference log-probs ``[N, 2]`` of the pairs of each set, computed once and cached in
    the run folder (a resumed run reads them back); entries never needed stay NaN.

    ``needed`` (set name -> pair indices; default: all) limits the work to the pairs the
    planned steps and evaluations will actually visit -- with ``max_steps`` below one epoch
    nothing is spent on pairs training never reaches. Call before any optimizer step: for
    full fine-tuning ``model`` IS the reference then. Ranks score strided shards, gathered.
    The cache holds only a string and tensors, so it loads with ``weights_only=True``.
    """
    from chatforge.models.lora import is_peft

    fp = fingerprint(*sets.values())
    out = {name: torch.full((len(pairs), 2), float("nan")) for name, pairs in sets.items()}
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved.get("fingerprint") == fp:
            out.update(saved["logps"])
    needed = needed if needed is not None else {name: list(range(len(pairs))) for name, pairs in sets.items()}
    todo = {name: [i for i in idx if torch.isnan(out[name][i]).any()] for name, idx in needed.items()}
    if not any(todo.values()):
        return out
    rank, world = accelerator.process_index, accelerator.num_processes
    scorer = SequenceLogps(model)
    with model.disable_adapter() if is_peft(model) else nullcontext():
        for name, idx in todo.items():
            shard = idx[rank::world]
            part = score_pairs(scorer, [sets[name][i] for i in shard], cfg.ref_batch_size, pad_id,
                               accelerator.autocast, share_prompt=None if cfg.share_prompt else False,
                               desc=f"reference log-probs ({name})" if accelerator.is_main_process else None)
            pieces = [(shard, part)]
            if world > 1:
                from accelerate.utils import gather_object

                pieces = gather_object(pieces)
            for sh, pt in pieces:
                if sh:
                    out[name][sh] = pt
    if cache is not None and accelerator.is_main_process:
        tmp = cache.with_suffix(".tmp")
        torch.save({"fingerprint": fp, "logps": out}, tmp)
        tmp.replace(cache)
    return out


def planned_pairs(n: int, cfg: DPOConfig, steps: int, world: int) -> list[int]:
    """Every training pair index the ``steps`` optimizer steps will visit (all ranks)."""
    seen: set[int] = set()
    for rank in range(world):
        it = core.batch_indices(n, cfg.batch_size, cfg.seed, rank, world)
        for _ in range(steps * cfg.grad_accum):
            seen.update(next(it))
            if len(seen) == n:
                return list(range(n))
    return sorted(seen)


# ---------------------------------------------------------------- evaluation
def pair_metrics(pol: torch.Tensor, ref: torch.Tensor, cfg: DPOConfig) -> dict[str, float]:
    """Loss / accuracy / margin / rewards / log-probs of ``[N, 2]`` policy and reference log-probs."""
    losses, rc, rr = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], cfg.beta, cfg.loss, cfg.label_smoothing)
    return {"loss": losses.mean().item(), "acc": reward_accuracy(rc, rr).mean().item(),
            "margin": (rc - rr).mean().item(), "chosen_reward": rc.mean().item(),
            "rejected_reward": rr.mean().item(), "chosen_logp": pol[:, 0].mean().item(),
            "rejected_logp": pol[:, 1].mean().item()}


def sample(model, tokenizer, prompts: list[list[dict[str, str]]], cfg: DPOConfig, max_new_tokens: int,
           temperature: float) -> list[tuple[list[int], list[int], str]]:
    """(prompt ids, response ids, response text) per prompt, from the shared engine (fixed seed)."""
    from chatforge.data.tokenize import encode_prompt
    from chatforge.generate.engine import Engine, SamplingConfig

    prompt_ids = [encode_prompt(tokenizer, p, cfg.template)[-max(1, cfg.max_len - max_new_tokens):] for p in prompts]
    was_training = model.training
    model.eval()
    comps = Engine(model, tokenizer).generate(prompt_ids, SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, seed=cfg.seed))
    model.train(was_training)
    return [(p, list(c.token_ids), c.text) for p, c in zip(prompt_ids, comps)]


def kl_to_reference(model, tokenizer, prompts, cfg: DPOConfig) -> dict[str, float]:
    """Monte-Carlo KL(pi || ref) = E_{y ~ pi}[log pi(y|x) - log ref(y|x)] on held-out prompts.

    Both log-probs are recomputed by the same teacher-forced pass (``Engine.score``, not
    taken from the sampler), so bf16/KV-cache rounding does not show up as a spurious KL.
    """
    from chatforge.generate.engine import Engine

    samples = [s for s in sample(model, tokenizer, prompts, cfg, cfg.kl_max_new_tokens, 1.0) if s[1]]
    if not samples:
        return {}
    ids, responses = [p for p, _, _ in samples], [r for _, r, _ in samples]
    pol = torch.tensor([sum(lp) for lp in Engine(model, tokenizer).score(ids, responses)])
    with reference_of(model, cfg) as ref:
        ref_lp = torch.tensor([sum(lp) for lp in Engine(ref, tokenizer).score(ids, responses)])
    n_tok = sum(len(r) for r in responses)
    return {"kl": (pol - ref_lp).mean().item(), "kl_per_token": ((pol - ref_lp).sum() / n_tok).item(),
            "sample_len": n_tok / len(samples)}


def judge_win_rate(model, tokenizer, prompts, cfg: DPOConfig) -> dict[str, float]:
    """Reward-model-judged win rate of the trained policy vs the starting policy: both answer
    the same held-out prompts greedily, the RM ``cfg.judge`` scores both (ties count half)."""
    from chatforge.models.heads import load_reward_model, score_texts

    prompts = prompts[:cfg.judge_prompts]
    ours = sample(model, tokenizer, prompts, cfg, cfg.judge_max_new_tokens, 0.0)
    with reference_of(model, cfg) as ref:
        theirs = sample(ref, tokenizer, prompts, cfg, cfg.judge_max_new_tokens, 0.0)
    rm, rm_tok = load_reward_model(cfg.judge, device=str(next(model.parameters()).device))
    rm_tok = rm_tok or tokenizer
    s_ours = torch.tensor(score_texts(rm, rm_tok, prompts, [t for _, _, t in ours]))
    s_theirs = torch.tensor(score_texts(rm, rm_tok, prompts, [t for _, _, t in theirs]))
    del rm
    return {"win_rate": reward_accuracy(s_ours, s_theirs).mean().item(), "judge_prompts": len(prompts),
            "judge_score_policy": s_ours.mean().item(), "judge_score_start": s_theirs.mean().item()}


# ---------------------------------------------------------------- the loop
PLOT_KEYS = ["loss", "eval_acc", "eval_margin", "chosen_logp", "rejected_logp", "kl"]
OnStep = Callable[[int, nn.Module, list[list[int]]], None]


def train(cfg: DPOConfig, resume: bool = False, overwrite: bool = False, on_step: OnStep | None = None) -> Path:
    """Run DPO; returns the run folder's ``model/``.

    ``on_step(step, model, micro_batch_indices)`` is called after every optimizer step on
    every rank (tests hash weights or simulate a kill there).
    """
    from chatforge.models.load import load_tokenizer

    if (acc := begin(cfg, resume, check=(cfg.judge,) if cfg.judge else ())) is None:
        return Path(cfg.out) / "model"
    say = acc.print
    run = open_run(acc, cfg, resume, overwrite)

    # data
    tokenizer = load_tokenizer(cfg.model)
    pad_id = pad_id_of(tokenizer)
    train_set, eval_set, report = load_pairs(cfg, tokenizer, run, log=say)
    for line in report.lines():
        say(line)
    prompts = (read_prompts(cfg.eval_prompts, cfg.format, say)[0] if cfg.eval_prompts
               else unique_prompts(e.prompt for e in eval_set))
    say(f"{len(train_set)} train pairs, {len(eval_set)} held-out pairs, {len(prompts)} held-out prompts")

    # model, reference cache (before any update: the model is the reference now; outside the budget)
    model = core.prepare_model(load_policy(cfg.model), cfg).to(acc.device)
    if cfg.lora:
        core.name_adapter_base(model, cfg.model)
    steps = core.total_steps(cfg, len(train_set), acc.num_processes)
    n_eval = min(len(eval_set), cfg.max_eval_records)
    t_ref = time.perf_counter()
    ref = reference_logps(model, cfg, {"train": train_set, "eval": eval_set[:n_eval]}, pad_id, acc,
                          run.path / "ref_logps.pt",
                          needed={"train": planned_pairs(len(train_set), cfg, steps, acc.num_processes),
                                  "eval": list(range(n_eval))})
    t_ref = time.perf_counter() - t_ref

    share = cfg.share_prompt and share_prompt_ok(model)
    opt = core.build_optimizer(model, cfg)
    sched = core.build_scheduler(opt, cfg, steps)
    scorer, opt, sched = acc.prepare(SequenceLogps(model), opt, sched)
    plain_scorer = acc.unwrap_model(scorer)

    def evaluate(final: bool) -> dict[str, float]:
        """Rank 0: the first ``max_eval_records`` held-out pairs, and the KL on held-out prompts."""
        m: dict[str, float] = {}
        if not acc.is_main_process:
            return m
        if n_eval:
            pol = score_pairs(plain_scorer, eval_set[:n_eval], cfg.ref_batch_size, pad_id, acc.autocast,
                              share_prompt=share)
            m.update({f"eval_{k}": v for k, v in pair_metrics(pol, ref["eval"], cfg).items()})
        if cfg.kl_prompts and prompts:
            m.update(kl_to_reference(model, tokenizer, prompts[:cfg.kl_prompts], cfg))
        return m

    seen: list[list[int]] = []
    loop = Loop(acc, run, cfg, steps, "dpo", Checkpointer(acc, run, model, tokenizer, cfg), evaluate=evaluate,
                scheduler=sched, show=("loss", "acc"),
                on_step=(lambda s: on_step(s, model, [list(ix) for ix in seen])) if on_step else None,
                plot=("dpo.png", PLOT_KEYS, f"DPO ({cfg.loss}, beta={cfg.beta})"))
    loop.resume(resume)  # weights, optimizer, scheduler, RNG, step
    batches = core.batch_indices(len(train_set), cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes,
                                 start_batch=loop.step * cfg.grad_accum)
    scorer.train()
    for _ in loop:
        seen[:] = [next(batches) for _ in range(cfg.grad_accum)]
        stats: list[dict[str, float]] = []
        tokens = 0
        for j, idx in enumerate(seen):
            batch = [train_set[i] for i in idx]
            b = {k: v.to(acc.device) for k, v in pair_batch(batch, pad_id, share).items()}
            with acc.no_sync(scorer) if j < len(seen) - 1 else nullcontext():
                logps, _ = scorer(**b)                                   # [2n]: chosen of each pair, then rejected
                n = len(idx)
                ref_b = ref["train"][idx].to(acc.device)                 # [n, 2]; planned_pairs computed these
                losses, _, _ = dpo_loss(logps[:n], logps[n:], ref_b[:, 0], ref_b[:, 1], cfg.beta, cfg.loss,
                                        cfg.label_smoothing)
                acc.backward(losses.mean() / cfg.grad_accum)
            stats.append(pair_metrics(torch.stack([logps[:n], logps[n:]], 1).detach(), ref_b, cfg))
            tokens += sum(len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids) for ex in batch)
        gnorm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        means = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}  # over the micro-batches
        loop.record(tokens=tokens, grad_norm=float(gnorm), **means)

    summary = {"reference_time_s": round(t_ref, 1), "data": report.to_dict(), "train_pairs": len(train_set),
               "pairs_seen": loop.step * cfg.batch_size * cfg.grad_accum * acc.num_processes,
               "eval_pairs": n_eval, "heldout_pairs": len(eval_set), "cpu_time_s": round(time.process_time(), 1)}
    if cfg.judge and prompts and acc.is_main_process:
        summary.update(judge_win_rate(model, tokenizer, prompts, cfg))
        say(f"win rate vs the starting policy ({summary['judge_prompts']} prompts, judge {cfg.judge}): "
            f"{summary['win_rate']:.3f}")
    return loop.finish(merge=cfg.lora and core.starts_from_adapter(cfg.model), **summary)

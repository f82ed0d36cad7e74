"""Reward model from human preferences: pairwise (Bradley-Terry), K-wise (InstructGPT) and
listwise (Plackett-Luce) losses, on ``Preference`` and ``Ranking`` records.

Model: a causal LM's backbone + a scalar head read at the end-of-turn token of
prompt (chat template) + response (:mod:`chatforge.models.heads`); full fine-tuning or LoRA.

Data. Each record becomes a *group*: its responses best -> worst (a ``Preference`` is a
group of 2, a ``Ranking`` of K). ``loss=pairwise`` expands every group into its K(K-1)/2
(better, worse) pairs, each an independent sample -- what TRL / OpenRLHF / DeepSpeed-Chat
do. ``loss=kwise`` / ``listwise`` scores the K responses of a group in the same step, so
each ranking counts once (InstructGPT: treating the pairs as independent samples
over-fits, because every response then appears in K-1 samples of an epoch). Empty
responses are dropped and contradictory ones (the same text in two places of one order)
refuse the record, reported (:func:`chatforge.data.prefs.ranked_responses`).

Ties (``Ranking.tiers``, e.g. from ``chatforge label``): tied responses make no pair --
``pairwise`` does not expand one, ``kwise`` masks it (a tied pair contributes nothing),
``listwise`` uses tier groups (Breslow's treatment of ties in the Cox / Plackett-Luce
likelihood: every response of a tier is picked from the same set, itself and all responses
of its tier or worse, so tied responses compete on equal terms and no order between them is
assumed; without ties it is exactly Plackett-Luce). A ranking whose responses are all tied
is skipped. ``unacceptable`` (keep | drop): a ranking marked "all answers unacceptable" is
trained on for the order among the bad answers (keep, default) or skipped (drop); both are
counted in the data report (under ``kept`` or ``skipped``: ``all answers unacceptable (order kept|dropped)``). Prompts are truncated from the left to ``max_len``, responses never: a pair
whose response alone does not fit is skipped (and counted).

Held-out split: by record, fixed seed (``eval_fraction``, 0.2; :mod:`chatforge.data.split`):
``split.json`` (indices into the records as read, in file order), ``heldout.jsonl`` and
``train.jsonl`` (canonical records) are written into the run folder, so DPO / PPO / eval use
exactly the same prompts.

The step is in the open below (:func:`train`); set-up comes from :mod:`chatforge.train.core`,
the loop (budget, cadence, checkpoints, exact resume) from :mod:`chatforge.train.loop`.

Logged metrics (``metrics.jsonl``; train values averaged over ``log_every`` steps):

* ``loss``, ``acc`` (train pairwise accuracy, ties half), ``margin`` (mean r_better - r_worse)
* ``eval_acc``   held-out pairwise accuracy over every (better, worse) pair of every record
* ``eval_margin``, ``eval_score_mean`` / ``eval_score_std`` (all held-out responses),
  ``eval_best_mean`` / ``eval_worst_mean`` (rewards of the first / last response of a group)
* ``eval_top1``, ``eval_tau``  rankings with K >= 3 only: share whose best response gets the
  highest reward; mean Kendall tau-a between the reward order and the human order
* ``eval_loss``  the training loss on the held-out groups
* ``lr``, ``grad_norm``, ``tokens_per_s``, ``step_time_s``, ``train_min`` (the loop's); the
  curves go to ``accuracy.png``, the step-0 evaluation to ``summary.json`` as ``*_before``

Evaluation runs on rank 0: before training (``eval_at_start``, the untrained head's chance
baseline), every ``eval_every`` steps on the first ``max_eval_records`` held-out records, and
at the end on all of them. ``max_minutes`` budgets *training* time as the loop counts it
(:mod:`chatforge.train.loop`: the steps only; set-up, evaluation and checkpoints excluded),
so runs with different losses compare at equal compute; ``budget_clock=cpu`` counts CPU time
instead of wall time, the same compute however busy a shared machine is.

Levers on a 2-core CPU: bf16 autocast (``precision``), length-sorted forward chunks
(``forward_chunk``: padding is nearly half the compute of a random hh-rlhf batch), ``max_len`` (hh-rlhf dialogues are
mostly short: 256 keeps 76% whole, and the prompt is cut from the left, not the response),
``freeze_layers`` (no backward through the frozen bottom), LoRA (``lora=true``, ~10x larger
lr; backward still runs through every layer), gradient checkpointing (memory only).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.config import check_range
from chatforge.data.prefs import SkipReport, ranked_responses, where_of
from chatforge.data.records import write_jsonl
from chatforge.data.split import read_records, split_indices, split_note
from chatforge.errors import ConfigError, DataError
from chatforge.models.heads import RewardModel, encode_for_reward, pad_batch, reward_pad_token, score_ids
from chatforge.runs import Run
from chatforge.train import core
from chatforge.train.core import TrainConfig
from chatforge.train.loop import Checkpointer, Loop, begin, open_run

PLOT_KEYS = ["acc", "eval_acc", "loss", "eval_loss", "margin", "eval_tau"]


# ---------------------------------------------------------------- config
@dataclass
class RMConfig(TrainConfig):
    """Reward-model recipe; ``model`` is the backbone to start from (an SFT run, smollm2, ...)."""

    loss: Literal["pairwise", "kwise", "listwise"] = "pairwise"
    unacceptable: Literal["keep", "drop"] = "keep"  # rankings marked "all answers unacceptable"
    margin: float = 0.0             # pairwise / kwise: require r_better - r_worse >= margin
    center_coef: float = 0.0        # reward centring: + coef * mean over groups of (mean reward)^2
    eval_fraction: float = 0.2      # held out by record (fixed seed) when eval_data is empty
    split_seed: int = -1            # seed of that split; -1 = `seed` (vary `seed` alone to re-run on the same split)
    max_eval_records: int = 200     # periodic evals use this many held-out records (0 = all); the final eval all
    eval_batch_size: int = 16       # sequences per no-grad forward
    forward_chunk: int = 2          # sequences per forward, length-sorted (less padding); 0 = all at once
    max_len: int = 512
    batch_size: int = 4             # groups per micro-batch: pairs (pairwise) or rankings (kwise/listwise)
    grad_accum: int = 2
    lr: float = 0.0                 # 0 = auto: 1e-5 full fine-tuning, 1e-4 LoRA
    eval_every: int = 100
    freeze_layers: int = 0          # full fine-tuning: freeze embeddings + this many bottom layers (speed lever)

    def validate(self) -> None:
        if self.lr == 0.0:
            self.lr = 1e-4 if self.lora else 1e-5  # resolved here so config.yaml records it
        super().validate()
        check_range("margin", self.margin, 0, None)
        check_range("center_coef", self.center_coef, 0, None)
        check_range("max_eval_records", self.max_eval_records, 0, None)
        check_range("eval_batch_size", self.eval_batch_size, 1, None)
        check_range("freeze_layers", self.freeze_layers, 0, None)
        check_range("forward_chunk", self.forward_chunk, 0, None)
        if self.freeze_layers and self.lora:
            raise ConfigError("freeze_layers is for full fine-tuning; with lora=true the backbone is frozen already")
        if self.loss == "listwise" and self.margin > 0:
            raise ConfigError("margin applies to the pairwise and kwise losses, not listwise")


# ---------------------------------------------------------------- the losses
def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry: mean over pairs of -log sigmoid(r_c - r_r - m).

    P(chosen > rejected) = sigmoid(r_c - r_r) under the BT model; the margin m (Llama 2)
    asks for a gap of at least m before the loss flattens. logsigmoid is the stable form.
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def kwise_loss(scores: torch.Tensor, mask: torch.Tensor | None = None, margin: float = 0.0,
               tiers: torch.Tensor | None = None) -> torch.Tensor:
    """InstructGPT's K-wise loss: each ranking contributes the *mean* over its ordered pairs
    of -log sigmoid(s_i - s_j - m), i ranked above j; then mean over rankings.

    ``scores`` (B, K) ordered best -> worst; ``mask`` (B, K) marks real responses (variable K,
    padded at the end); ``tiers`` (B, K) their tiers (None: strict, K(K-1)/2 pairs): a tied
    pair is masked out, it contributes nothing. Averaging per ranking makes every ranking
    weigh the same, whatever its K -- the pairs of one ranking are not independent samples.
    """
    b, k = scores.shape
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.bool()
    diff = scores[:, :, None] - scores[:, None, :]                       # [b, i, j] = s_i - s_j
    if tiers is None:
        above = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu(1)  # i < j: i ranked better
    else:
        t = tiers.to(scores.device)
        above = t[:, :, None] < t[:, None, :]                             # [b, i, j]: i in a better tier
    valid = above & mask[:, :, None] & mask[:, None, :]
    losses = -F.logsigmoid(diff - margin) * valid
    per_ranking = losses.sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)
    return per_ranking.mean()


def listwise_loss(scores: torch.Tensor, mask: torch.Tensor | None = None,
                  tiers: torch.Tensor | None = None) -> torch.Tensor:
    """Plackett-Luce: mean over rankings of -log P(human order | scores).

    P(order) = prod_i exp(s_i) / sum_{j >= i} exp(s_j): the best response is picked from all
    K, the second from the remaining K-1, ... So -log P = sum_i (logsumexp_{j>=i} s_j - s_i).
    For K = 2 it is exactly the pairwise loss. Masked (padding) slots get a score of -1e4,
    i.e. probability 0, which keeps the suffix logsumexp finite (no NaN gradients).

    With ``tiers`` (B, K) ties use tier groups (Breslow): response i is picked from every
    response of its tier or worse, -log P = sum_i (logsumexp_{j: tier_j >= tier_i} s_j - s_i),
    so tied responses share one pick set and no order between them is assumed. Without ties
    that set is {j >= i}: the same loss.
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.bool()
    s = scores.float().masked_fill(~mask, -1e4)
    if tiers is None:
        pick_lse = torch.logcumsumexp(s.flip(-1), -1).flip(-1)           # [b, i] = logsumexp_{j>=i} s_j
    else:
        t = tiers.to(scores.device)
        pool = (t[:, None, :] >= t[:, :, None]) & mask[:, None, :]        # [b, i, j]: j in i's pick set
        pick_lse = s[:, None, :].masked_fill(~pool, -1e4).logsumexp(-1)   # [b, i]
    nll = ((pick_lse - s) * mask).sum(-1)
    return nll.mean()


def centering_penalty(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean over groups of (mean reward of the group)^2 (Eisenstein et al. 2023): pins the
    reward's free offset near 0 so PPO sees O(1) rewards. (TRL's center_rewards_coefficient
    penalises (r_c + r_r)^2, i.e. 4x this for pairs.)"""
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    m = mask.float()
    mean = (scores * m).sum(-1) / m.sum(-1).clamp(min=1)
    return (mean ** 2).mean()


def rm_loss(scores: torch.Tensor, mask: torch.Tensor, cfg: RMConfig, tiers: torch.Tensor | None = None
            ) -> torch.Tensor:
    """The configured loss on a (B, K) score matrix (pairwise: K == 2, never tied)."""
    if cfg.loss == "pairwise":
        loss = pairwise_loss(scores[:, 0], scores[:, 1], cfg.margin)
    elif cfg.loss == "kwise":
        loss = kwise_loss(scores, mask, cfg.margin, tiers)
    else:
        loss = listwise_loss(scores, mask, tiers)
    if cfg.center_coef > 0:
        loss = loss + cfg.center_coef * centering_penalty(scores, mask)
    return loss


# ---------------------------------------------------------------- metrics
def group_metrics(groups: Sequence[Sequence[float]], tiers: Sequence[Sequence[int] | None] | None = None
                  ) -> dict[str, float]:
    """Accuracy and ranking agreement of rewards for groups ordered best -> worst.

    Pairwise accuracy counts every (better, worse) pair the human order states (tied
    responses make none; ties in *reward* count half); top-1 and Kendall's tau-a
    ((concordant - discordant) / stated pairs) only over groups with K >= 3, where they say
    more than the accuracy does. ``tiers``: per group its tiers, or None (a strict order).
    """
    correct = pairs = 0.0
    margins: list[float] = []
    top1: list[float] = []
    taus: list[float] = []
    for gi, g in enumerate(groups):
        t = (tiers[gi] if tiers is not None else None) or list(range(len(g)))
        conc = disc = n = 0
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                if t[i] >= t[j]:
                    continue  # tied: no pair
                n += 1
                d = g[i] - g[j]
                margins.append(d)
                conc += d > 0
                disc += d < 0
                correct += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
                pairs += 1
        if len(g) >= 3 and n:
            taus.append((conc - disc) / n)
            best = max(range(len(g)), key=g.__getitem__)  # the highest reward is in the best tier, above the rest
            top1.append(float(t[best] == t[0] and all(g[best] > x for x, tx in zip(g, t) if tx != t[0])))
    flat = [x for g in groups for x in g]
    out: dict[str, float] = {}
    if pairs:
        out["acc"] = correct / pairs
        out["margin"] = sum(margins) / len(margins)
        out["pairs"] = pairs
    if flat:
        mean = sum(flat) / len(flat)
        out["score_mean"] = mean
        out["score_std"] = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat))
        out["best_mean"] = sum(g[0] for g in groups) / len(groups)
        out["worst_mean"] = sum(g[-1] for g in groups) / len(groups)
    if taus:
        out["tau"] = sum(taus) / len(taus)
        out["top1"] = sum(top1) / len(top1)
        out["rankings"] = len(taus)
    return out


# ---------------------------------------------------------------- data
@dataclass
class Group:
    """One record's responses, tokenised, best -> worst."""

    ids: list[list[int]]
    record: int          # index of the record in the read order (see split.json)
    where: str = ""
    tiers: list[int] | None = None  # one per response (equal = tied); None: a strict order

    def tier_list(self) -> list[int]:
        return self.tiers if self.tiers is not None else list(range(len(self.ids)))


@dataclass
class DataReport(SkipReport):
    """What happened to the input; usable items are response groups (one per record)."""

    groups: int = 0
    unit: ClassVar[str] = "groups"


def build_groups(records: Sequence[Any], indices: Sequence[int], tokenizer, max_len: int, template: str,
                 report: DataReport, keep_long: bool = False, unacceptable: str = "keep") -> list[Group]:
    """Tokenise each usable record into a :class:`Group` (rule: :func:`ranked_responses`).

    ``keep_long=False`` (training): a response longer than ``max_len`` skips the record.
    ``keep_long=True`` (evaluation): it is scored on its last ``max_len`` tokens, as
    ``chatforge score`` would, so the held-out set does not depend on ``max_len``.
    """
    groups = []
    for i in indices:
        rec = records[i]
        report.records += 1
        ranked = ranked_responses(rec, report, unacceptable)
        if ranked is None:
            continue
        enc = [encode_for_reward(tokenizer, rec.prompt, t, max_len, template) for t in ranked.texts]
        if not keep_long and not all(fits for _, fits in enc):
            report.skip(f"response longer than max_len={max_len}", where_of(rec.meta))
            continue
        ids = [e for e, _ in enc]
        tier_of: dict[tuple[int, ...], int] = {}
        if any(tier_of.setdefault(tuple(x), t) != t for x, t in zip(ids, ranked.tiers)):
            report.skip(f"identical after truncation to max_len={max_len}", where_of(rec.meta))
            continue
        strict = ranked.tiers == list(range(len(ids)))
        groups.append(Group(ids, i, where_of(rec.meta), None if strict else ranked.tiers))
        report.groups += 1
    return groups


def expand_to_pairs(groups: Sequence[Group]) -> list[Group]:
    """Every (better, worse) pair of every group as its own 2-group (pairwise training);
    tied responses make none."""
    out = []
    for g in groups:
        t = g.tier_list()
        for i in range(len(g.ids)):
            for j in range(i + 1, len(g.ids)):
                if t[i] < t[j]:
                    out.append(Group([g.ids[i], g.ids[j]], g.record, g.where))
    return out


def load_data(cfg: RMConfig, tokenizer, run: Run | None = None, log=print
              ) -> tuple[list[Group], list[Group], DataReport]:
    """Read, split by record (:mod:`chatforge.data.split`), write the split into the run
    folder (rank 0), tokenise."""
    if not cfg.data:
        raise ConfigError("data: give at least one preference or ranking file")
    report = DataReport()
    records, report.read_errors = read_records(cfg.data, cfg.format, log)
    split_seed = cfg.seed if cfg.split_seed < 0 else cfg.split_seed
    if cfg.eval_data:
        train_idx, held_idx = list(range(len(records))), []
        eval_records, errors = read_records(cfg.eval_data, cfg.format, log)
        report.read_errors += errors
        eval_idx = list(range(len(eval_records)))
    else:
        train_idx, held_idx = split_indices(len(records), cfg.eval_fraction, split_seed)
        eval_records, eval_idx = records, held_idx
    if run is not None and run.is_main:
        run.write_json("split.json", split_note(cfg.data, cfg.eval_data, cfg.eval_fraction, split_seed,
                                                len(records), held_idx))
        write_jsonl([eval_records[i] for i in eval_idx], run.path / "heldout.jsonl")
        write_jsonl([records[i] for i in train_idx], run.path / "train.jsonl")
    train = build_groups(records, train_idx, tokenizer, cfg.max_len, cfg.template, report,
                         unacceptable=cfg.unacceptable)
    held = build_groups(eval_records, eval_idx, tokenizer, cfg.max_len, cfg.template, report, keep_long=True,
                        unacceptable=cfg.unacceptable)
    if not train:
        raise DataError(f"{', '.join(cfg.data)}: no usable preference or ranking records "
                        f"({'; '.join(report.lines())})")
    log(f"data: {len(train)} train groups, {len(held)} held-out groups (from {', '.join(cfg.eval_data or cfg.data)})")
    return train, held, report


# ---------------------------------------------------------------- batching / scoring
@dataclass
class Batch:
    """The sequences of some groups as length-sorted, right-padded chunks, and where each
    sequence's score lands in the (B, Kmax) matrix of its group."""

    input_ids: list[torch.Tensor]
    attention_mask: list[torch.Tensor]
    slot: torch.Tensor        # flat index into (B, Kmax), in chunk order
    group_mask: torch.Tensor  # (B, Kmax) real responses
    tokens: int
    tiers: torch.Tensor | None = None  # (B, Kmax) when some group has ties; None: every order strict


def make_batch(groups: Sequence[Group], pad_id: int, chunk: int = 0) -> Batch:
    """Sort the sequences by length and cut them into chunks of ``chunk`` (0 = one chunk):
    on hh-rlhf a random batch of 8 padded to its longest computes +47% pad tokens, sorted
    chunks of 2 only +5%."""
    kmax = max(len(g.ids) for g in groups)
    seqs = [(s, gi * kmax + k) for gi, g in enumerate(groups) for k, s in enumerate(g.ids)]
    seqs.sort(key=lambda x: len(x[0]))
    step = chunk if chunk > 0 else len(seqs)
    ids, masks = [], []
    for c in range(0, len(seqs), step):
        i, m = pad_batch([s for s, _ in seqs[c:c + step]], pad_id)
        ids.append(i)
        masks.append(m)
    gmask = torch.zeros(len(groups), kmax, dtype=torch.bool)
    for gi, g in enumerate(groups):
        gmask[gi, :len(g.ids)] = True
    return Batch(ids, masks, torch.tensor([sl for _, sl in seqs]), gmask, sum(len(s) for s, _ in seqs),
                 tier_matrix(groups, kmax))


def tier_matrix(groups: Sequence[Group], kmax: int) -> torch.Tensor | None:
    """(B, Kmax) tiers (padding slots: a tier of their own, masked anyway); None when no group has ties."""
    if all(g.tiers is None for g in groups):
        return None
    return torch.tensor([g.tier_list() + [10**6] * (kmax - len(g.ids)) for g in groups])


def to_matrix(flat_scores: torch.Tensor, slot: torch.Tensor, gmask: torch.Tensor) -> torch.Tensor:
    """Scatter per-sequence scores into the (B, Kmax) matrix (padding slots 0, masked)."""
    m = torch.zeros(gmask.numel(), dtype=flat_scores.dtype, device=flat_scores.device)
    m = m.index_put((slot.to(flat_scores.device),), flat_scores)
    return m.view(gmask.shape)


@torch.no_grad()
def evaluate_groups(rm: RewardModel, groups: Sequence[Group], cfg: RMConfig, pad_id: int,
                    autocast=nullcontext) -> dict[str, float]:
    """Score every held-out response (length-sorted batches), then :func:`group_metrics`
    and the training loss on the held-out groups."""
    if not groups:
        return {}
    seqs = [s for g in groups for s in g.ids]
    with autocast():
        flat = score_ids(rm, seqs, pad_id, cfg.eval_batch_size)
    scores, k = [], 0
    for g in groups:
        scores.append(flat[k:k + len(g.ids)])
        k += len(g.ids)
    m = group_metrics(scores, [g.tiers for g in groups])
    kmax = max(len(g) for g in scores)
    mat = torch.tensor([s + [0.0] * (kmax - len(s)) for s in scores])
    mask = torch.tensor([[True] * len(s) + [False] * (kmax - len(s)) for s in scores])
    tiers = tier_matrix(groups, kmax)
    if cfg.loss == "pairwise":  # the pairwise loss over each group's pairs, as in training
        pairs = (kwise_loss(mat, mask, cfg.margin, tiers) if kmax > 2 or tiers is not None
                 else pairwise_loss(mat[:, 0], mat[:, 1], cfg.margin))
        m["loss"] = pairs.item()
    else:
        m["loss"] = rm_loss(mat, mask, cfg, tiers).item()
    return {f"eval_{k}": v for k, v in m.items()}


# ---------------------------------------------------------------- the loop
def build_model(cfg: RMConfig, pad_id: int) -> RewardModel:
    """Backbone of ``cfg.model`` (an SFT LoRA run is merged first) -> LoRA / grad-ckpt -> head."""
    from chatforge.models.load import load_model

    lm = core.prepare_model(load_model(cfg.model, dtype="fp32", merge_adapter=True), cfg)
    rm = RewardModel.from_causal_lm(lm, pad_token_id=pad_id)
    if cfg.freeze_layers:
        rm.freeze_bottom(cfg.freeze_layers)
    rm.train_info = {"template": cfg.template, "max_len": cfg.max_len, "loss": cfg.loss, "base": cfg.model}
    return rm


OnStep = Callable[[int, nn.Module, list[list[int]]], None]


def train(cfg: RMConfig, resume: bool = False, overwrite: bool = False, on_step: OnStep | None = None) -> Path:
    """Train a reward model; returns the run folder's ``model/``.

    ``on_step(step, model, micro_batch_indices)`` is called after every optimizer step on
    every rank (tests record data sharding, hash weights, or simulate a kill there).
    """
    from chatforge.models.load import load_tokenizer

    if (acc := begin(cfg, resume)) is None:
        return Path(cfg.out) / "model"
    say = acc.print
    run = open_run(acc, cfg, resume, overwrite)
    tokenizer = load_tokenizer(cfg.model)
    pad_id = reward_pad_token(tokenizer)
    train_set, eval_set, report = load_data(cfg, tokenizer, run, log=say)
    for line in report.lines():
        say(line)
    samples = expand_to_pairs(train_set) if cfg.loss == "pairwise" else train_set
    say(f"{len(samples)} training samples ({'pairs' if cfg.loss == 'pairwise' else 'groups'}, loss={cfg.loss})")

    rm = build_model(cfg, pad_id).to(acc.device)
    n_train = sum(p.numel() for p in rm.parameters() if p.requires_grad)
    say(f"trainable parameters: {n_train:,} of {sum(p.numel() for p in rm.parameters()):,}")
    steps = core.total_steps(cfg, len(samples), acc.num_processes)
    opt = core.build_optimizer(rm, cfg)
    sched = core.build_scheduler(opt, cfg, steps)
    model, opt, sched = acc.prepare(rm, opt, sched)

    def evaluate(final: bool) -> dict[str, float]:
        """Rank 0 only; periodic evaluations on the first max_eval_records held-out records."""
        groups = eval_set if final or not cfg.max_eval_records else eval_set[:cfg.max_eval_records]
        if not acc.is_main_process or not groups:
            return {}
        return evaluate_groups(acc.unwrap_model(model), groups, cfg, pad_id, acc.autocast)

    seen: list[list[int]] = []
    loop = Loop(acc, run, cfg, steps, f"rm ({cfg.loss})", Checkpointer(acc, run, rm, tokenizer, cfg),
                evaluate=evaluate, scheduler=sched, show=("loss", "acc"),
                on_step=(lambda s: on_step(s, rm, [list(ix) for ix in seen])) if on_step else None,
                plot=("accuracy.png", PLOT_KEYS, f"reward model ({cfg.loss})"))
    loop.resume(resume)  # weights, optimizer, scheduler, RNG, step
    batches = core.batch_indices(len(samples), cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes,
                                 start_batch=loop.step * cfg.grad_accum)
    model.train()
    for _ in loop:
        seen[:] = [next(batches) for _ in range(cfg.grad_accum)]
        stats: dict[str, float] = {}
        tokens = 0
        for micro, ix in enumerate(seen):
            group = [samples[i] for i in ix]
            b = make_batch(group, pad_id, cfg.forward_chunk)
            gmask = b.group_mask.to(acc.device)
            with acc.no_sync(model) if micro < cfg.grad_accum - 1 else nullcontext():
                flat = model([t.to(acc.device) for t in b.input_ids], [t.to(acc.device) for t in b.attention_mask])
                scores = to_matrix(flat.float(), b.slot, gmask)                 # (B, Kmax), best -> worst
                loss = rm_loss(scores, gmask, cfg, b.tiers)
                acc.backward(loss / cfg.grad_accum)
            tokens += b.tokens
            g = group_metrics([scores[i, gmask[i]].tolist() for i in range(len(ix))], [x.tiers for x in group])
            m = {"loss": loss.item(), "acc": g["acc"], "margin": g["margin"], "score_mean": g["score_mean"]}
            for k, v in m.items():
                stats[k] = stats.get(k, 0.0) + v / cfg.grad_accum
        gnorm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loop.record(tokens=tokens, grad_norm=float(gnorm) if gnorm is not None else None, **stats)

    epochs = loop.step * cfg.batch_size * cfg.grad_accum * acc.num_processes / max(1, len(samples))
    return loop.finish(loss_fn=cfg.loss, epochs_done=round(epochs, 3), train_groups=len(train_set),
                       train_samples=len(samples), eval_groups=len(eval_set), data=report.to_dict())

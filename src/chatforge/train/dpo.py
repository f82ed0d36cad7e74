"""Direct preference optimisation: DPO (sigmoid), conservative DPO (label smoothing), IPO.

The practical alternative to RM + PPO: the policy is pushed to raise the log-likelihood of
the chosen response relative to the rejected one, *measured against a frozen reference*
(the starting SFT policy), with no reward model and no sampling in the loop.

Data: ``Preference`` records, and ``Ranking`` records expanded to their K(K-1)/2
(better, worse) pairs. Pairs whose two responses are identical or empty (before or after
truncation to ``max_len``) teach nothing and are reported and skipped.

Sequence log-probability: ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)`` over the response
tokens and its end-of-turn (labels from ``data.tokenize.encode_prompt_response``), summed,
not averaged, for every loss (also IPO; TRL length-normalises IPO, we do not).

Reference log-probs are computed ONCE before training and cached in the run folder
(``ref_logps.pt``): full fine-tuning scores the data with the frozen initial policy, LoRA
with the adapter-off backbone (``model.disable_adapter()``). So there is never a second
model in memory while training -- the main memory lever vs TRL's resident reference copy.

Levers (in the order they matter on a 2-core CPU): bf16 autocast (``precision``), LoRA
(``lora=true``), chosen + rejected in ONE forward (concatenated along the batch), the LM
head applied only to response positions (the 49k-vocab projection of prompt tokens is never
computed), length-sorted batches for the reference and eval passes, gradient checkpointing
(memory, not speed).

Logged metrics (``metrics.jsonl``; train values are means over the last ``log_every``
optimizer steps, ``eval_*`` over the held-out pairs):

* ``loss``                      the DPO/IPO loss.
* ``acc``                       implicit reward accuracy: share of pairs whose chosen reward
                                beats the rejected one. Ties count HALF (so a policy equal to
                                its reference scores exactly 0.5, chance; TRL counts ties as
                                wrong, which reads 0.0 at step 0).
* ``margin``                    mean ``r_chosen - r_rejected`` with the implicit reward
                                ``r = beta * (log pi(y|x) - log ref(y|x))``.
* ``chosen_reward`` / ``rejected_reward``  the two rewards themselves.
* ``chosen_logp`` / ``rejected_logp``      policy sequence log-probs. Both usually fall
                                during DPO (the rejected faster); a collapsing chosen
                                log-prob with a rising margin is the known failure mode
                                (lower ``lr`` / raise ``beta``).
* ``kl``                        KL(policy || reference) on held-out prompts: responses sampled
                                from the policy (temperature 1), mean over prompts of
                                ``sum_t (log pi - log ref)`` over the sampled tokens (an unbiased
                                Monte-Carlo estimate of the sequence KL; noisy with few prompts).
* ``win_rate`` (summary, when ``judge`` names a reward model)  share of held-out prompts
                                where the reward model scores the policy's greedy response above
                                the starting policy's (ties count half).

Debugging tips: at step 0 ``loss == log 2`` (sigmoid) and ``acc == 0.5`` and ``kl == 0``
exactly up to bf16 noise -- anything else means the reference cache does not match the
policy (wrong template, wrong model). A ``kl`` rising without ``eval_acc`` rising means
the policy is drifting, not learning the preference.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.config import check_range
from chatforge.data.prefs import SkipReport, ordered_responses, where_of
from chatforge.data.records import Preference, prompt_of
from chatforge.errors import ConfigError, DataError
from chatforge.runs import Run, plot_curves
from chatforge.train import core
from chatforge.train.core import TrainConfig

IGNORE = -100


# ---------------------------------------------------------------- config
@dataclass
class DPOConfig(TrainConfig):
    """DPO recipe. ``model`` is the policy to start from (and the reference): usually an SFT
    run folder; the CLI calls it ``--policy``."""

    policy: str = ""                   # alias of `model` (wins when set)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
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
    share_prompt: bool = True          # chosen + rejected in one row after ONE copy of the prompt (see build_batch)

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
@dataclass
class PairExample:
    """One tokenised pair: the (identically truncated) prompt once, and the two responses.

    ``*_ids`` are the response tokens (text + end-of-turn); ``*_labels`` the same ids, or
    IGNORE for a token that is not scored.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    prompt: list[dict[str, str]] = field(default_factory=list)
    where: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class DataReport(SkipReport):
    """What happened to the input; usable items are preference pairs."""

    pairs: int = 0
    unit: ClassVar[str] = "pairs"


def expand_pairs(records: list, report: DataReport) -> list[Preference]:
    """Preferences as they are, rankings as their K(K-1)/2 pairs (best first); records the
    reward model would refuse (other kinds, empty or tied responses) are reported and
    dropped by the same rule (:func:`chatforge.data.prefs.ordered_responses`)."""
    pairs: list[Preference] = []
    for rec in records:
        report.records += 1
        texts = ordered_responses(rec, report)
        if texts is None:
            continue
        if isinstance(rec, Preference):
            pairs.append(rec)
            continue
        pairs += [Preference(rec.prompt, {"role": "assistant", "content": texts[i]},
                             {"role": "assistant", "content": texts[j]}, dict(rec.meta, pair=[i, j]))
                  for i in range(len(texts)) for j in range(i + 1, len(texts))]
    return pairs


def _split_at_labels(ids: list[int], labels: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, response labels): the prompt is everything before the first
    label, the response ends at the last label (a template's trailing newline after the
    end-of-turn is dropped: nothing after the last scored token can change its probability)."""
    scored = [i for i, l in enumerate(labels) if l != IGNORE]
    if not scored:
        return ids, [], []
    first, last = scored[0], scored[-1] + 1
    return ids[:first], ids[first:last], labels[first:last]


def encode_pair(tokenizer, pair: Preference, max_len: int, template: str = "auto") -> PairExample | str:
    """Tokenise both sides; returns the example, or the reason it must be skipped.

    Over-long pairs: each response keeps at least ``max_len // 2`` tokens (its head), the
    prompt keeps its *end* (the last turn matters most), identically for both sides; each
    of prompt + chosen and prompt + rejected is then at most ``max_len`` tokens.
    """
    from chatforge.data.tokenize import encode_prompt_response

    ec = encode_prompt_response(tokenizer, pair.prompt, pair.chosen["content"], template)
    er = encode_prompt_response(tokenizer, pair.prompt, pair.rejected["content"], template)
    p, c, cl = _split_at_labels(list(ec.input_ids), list(ec.labels))
    p2, r, rl = _split_at_labels(list(er.input_ids), list(er.labels))
    if not c or not r:
        return "empty response after tokenisation"
    if p != p2:  # templates are prefix-stable; if one is not, share the common prefix only
        n = next((i for i, (a, b) in enumerate(zip(p, p2)) if a != b), min(len(p), len(p2)))
        if n == 0:
            return "chosen and rejected do not share a prompt after tokenisation"
        c, cl = p[n:] + c, [IGNORE] * (len(p) - n) + cl
        r, rl = p2[n:] + r, [IGNORE] * (len(p2) - n) + rl
        p = p[:n]
    budget = max(max_len - len(p), max_len // 2)
    c, cl, r, rl = c[:budget], cl[:budget], r[:budget], rl[:budget]
    keep = max(1, max_len - max(len(c), len(r)))
    p = p[len(p) - keep:] if keep < len(p) else p
    if all(l == IGNORE for l in cl) or all(l == IGNORE for l in rl):
        return "empty response after tokenisation"
    if c == r:
        return f"identical after truncation to max_len={max_len}"
    return PairExample(p, c, cl, r, rl, pair.prompt, where_of(pair.meta))


def read_records(paths: list[str], fmt: str | None) -> tuple[list, list]:
    """All records and read errors of ``paths`` (missing/unusable files raise DataError)."""
    from chatforge.data.readers import read_file

    records, errors = [], []
    for path in paths:
        if not Path(path).exists():
            raise DataError(f"{path}: no such file")
        res = read_file(path, format=fmt, on_error="skip")
        records += list(res.records)
        errors += list(res.errors)
    return records, errors


def load_pairs(cfg: DPOConfig, tokenizer, run: Run | None = None, log=print
               ) -> tuple[list[PairExample], list[PairExample], DataReport]:
    """Read, split by record (a ranking's pairs stay on one side), expand, tokenise.

    Without ``eval_data`` the split is the reward model's (``train.rm.split_indices``: same
    seed and fraction -> same held-out records), written to ``split.json`` /
    ``heldout.jsonl`` in the run folder so evaluation can use exactly those prompts.
    """
    from chatforge.data.records import write_jsonl
    from chatforge.train.rm import split_indices

    if not cfg.data:
        raise ConfigError("data: give at least one preference or ranking file")
    report = DataReport()
    records, errors = read_records(cfg.data, cfg.format)
    report.read_errors = len(errors)
    for e in errors[:3]:
        log(f"  unreadable: {e}")
    if cfg.eval_data:
        eval_records, eval_errors = read_records(cfg.eval_data, cfg.format)
        report.read_errors += len(eval_errors)
    else:
        train_idx, held_idx = split_indices(len(records), cfg.eval_fraction, cfg.seed)
        eval_records = [records[i] for i in held_idx]
        records = [records[i] for i in train_idx]
        if run is not None and run.is_main:
            run.write_json("split.json", {"data": list(cfg.data), "seed": cfg.seed, "eval_fraction": cfg.eval_fraction,
                                          "records": len(records) + len(eval_records), "heldout": held_idx,
                                          "note": "indices into the records of `data` as read, in file order"})
            write_jsonl(eval_records, run.path / "heldout.jsonl")
    sets = []
    for recs in (records, eval_records):
        out = []
        for pair in expand_pairs(recs, report):
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


def read_prompts(paths: list[str], fmt: str | None) -> list[list[dict[str, str]]]:
    """Prompt messages of every record in ``paths`` (any kind), de-duplicated, in order."""
    records, _ = read_records(paths, fmt)
    return unique_prompts(prompt_of(r) for r in records)


def unique_prompts(prompts) -> list[list[dict[str, str]]]:
    seen, out = set(), []
    for p in prompts:
        key = tuple((m["role"], m["content"]) for m in p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


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
# A "row" of a batch is a prompt followed by one or more response segments; every segment
# sees the prompt and itself, never another segment, and its positions continue from the end of
# the prompt. So [prompt | chosen | rejected] in ONE row computes the shared prompt once --
# the same numbers as two separate sequences [prompt | chosen] and [prompt | rejected], for
# ~40% fewer tokens on hh-rlhf (prompts are ~3x longer than responses).
Segment = tuple[list[int], list[int], int]  # (ids, labels, index of the sequence it scores)
Row = tuple[list[int], list[Segment]]


def pair_rows(batch: list[PairExample], share_prompt: bool = True) -> list[Row]:
    """Rows for a batch of pairs; sequence i is chosen of pair i, B + i rejected of pair i."""
    n = len(batch)
    if share_prompt:
        return [(ex.prompt_ids, [(ex.chosen_ids, ex.chosen_labels, i), (ex.rejected_ids, ex.rejected_labels, n + i)])
                for i, ex in enumerate(batch)]
    return [(ex.prompt_ids, [(ex.chosen_ids, ex.chosen_labels, i)]) for i, ex in enumerate(batch)] + \
        [(ex.prompt_ids, [(ex.rejected_ids, ex.rejected_labels, n + i)]) for i, ex in enumerate(batch)]


def build_batch(rows: list[Row], pad_id: int, mask: str = "4d") -> dict[str, torch.Tensor]:
    """Tensors for :class:`SequenceLogps`: right-padded ``input_ids`` and ``position_ids``,
    the attention mask, and for every scored token where its prediction is read
    (``src_row``, ``src_pos``), what it must predict (``target``) and whose sum it joins (``seq``).

    ``mask="4d"``: a boolean [N, 1, T, T] mask (True = may attend) encoding the segment
    structure; ``"2d"``: a plain padding mask, valid only for one segment per row.
    """
    T = max(len(p) + sum(len(s[0]) for s in segs) for p, segs in rows)
    N = len(rows)
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    pos = torch.zeros((N, T), dtype=torch.long)
    seg = torch.full((N, T), -1, dtype=torch.long)  # -1 pad, 0 prompt, k >= 1 segment k
    src_row, src_pos, target, seq = [], [], [], []
    n_seq = 0
    for i, (prompt, segs) in enumerate(rows):
        if not prompt:
            raise ValueError("every row needs at least one prompt token (it predicts the first response token)")
        P = len(prompt)
        ids[i, :P] = torch.tensor(prompt)
        pos[i, :P] = torch.arange(P)
        seg[i, :P] = 0
        start = P
        for k, (s_ids, s_labels, s_index) in enumerate(segs, 1):
            L = len(s_ids)
            ids[i, start:start + L] = torch.tensor(s_ids, dtype=torch.long)
            pos[i, start:start + L] = torch.arange(P, P + L)
            seg[i, start:start + L] = k
            for j, lab in enumerate(s_labels):
                if lab != IGNORE:
                    src_row.append(i)
                    src_pos.append(P - 1 if j == 0 else start + j - 1)
                    target.append(lab)
                    seq.append(s_index)
            n_seq = max(n_seq, s_index + 1)
            start += L
    out = {"input_ids": ids, "position_ids": pos, "src_row": torch.tensor(src_row, dtype=torch.long),
           "src_pos": torch.tensor(src_pos, dtype=torch.long), "target": torch.tensor(target, dtype=torch.long),
           "seq": torch.tensor(seq, dtype=torch.long), "n_seq": torch.tensor(n_seq)}
    real = seg >= 0
    if mask == "2d":
        if any(len(segs) > 1 for _, segs in rows):
            raise ValueError("a 2d mask cannot separate several segments in one row")
        out["attention_mask"] = real.long()
        return out
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal & real[:, :, None] & real[:, None, :] & ((k == 0) | (k == q))
    allowed |= torch.eye(T, dtype=torch.bool)  # padding attends to itself: no all-masked (NaN) rows
    out["attention_mask"] = allowed[:, None]
    return out


def pair_batch(batch: list[PairExample], pad_id: int, share_prompt: bool = True) -> dict[str, torch.Tensor]:
    return build_batch(pair_rows(batch, share_prompt), pad_id, "4d" if share_prompt else "2d")


def backbone_and_head(model) -> tuple[nn.Module, nn.Module] | None:
    """The transformer body and LM head, when logits are a plain linear map of the last
    hidden state (Llama, Qwen, Mistral, GPT-2, ...); None -> use the full forward."""
    from chatforge.models.lora import is_peft

    base = model.get_base_model() if is_peft(model) else model
    if getattr(base.config, "final_logit_softcapping", None):
        return None
    try:
        body, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if body is None or body is base or not isinstance(head, nn.Linear):
        return None
    return body, head


class SequenceLogps(nn.Module):
    """``forward(**build_batch(...)) -> (logps[n_seq], tokens[n_seq])``: summed
    log-probabilities of the scored tokens of each sequence.

    The LM head runs only on the hidden states that predict a scored token, so the
    vocabulary projection (49k x 576 on SmolLM2) of prompt and padding positions is never
    computed. A module (not a function) so accelerate/DDP wrap the whole computation.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.parts = backbone_and_head(model)

    def forward(self, input_ids, position_ids, attention_mask, src_row, src_pos, target, seq, n_seq):
        mask = attention_mask
        if mask.dim() == 4 and getattr(self.model.config, "_attn_implementation", "sdpa") == "eager":
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min)  # eager attention adds the mask to the scores
        kw = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False)
        if self.parts is not None:
            body, head = self.parts
            logits = head(body(**kw).last_hidden_state[src_row, src_pos])
        else:
            logits = self.model(**kw).logits[src_row, src_pos]
        tok_logp = -F.cross_entropy(logits.float(), target, reduction="none")
        n = int(n_seq)
        logps = torch.zeros(n, dtype=torch.float32, device=input_ids.device).index_add(0, seq, tok_logp)
        tokens = torch.zeros(n, dtype=torch.long, device=input_ids.device).index_add(0, seq, torch.ones_like(seq))
        return logps, tokens


def share_prompt_ok(model) -> bool:
    """The segment mask needs an attention that takes a custom 4-D mask (sdpa, eager)."""
    from chatforge.models.lora import is_peft

    base = model.get_base_model() if is_peft(model) else model
    return getattr(base.config, "_attn_implementation", None) in ("sdpa", "eager")


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
    """
    from chatforge.models.lora import is_peft

    fp = fingerprint(*sets.values())
    out = {name: torch.full((len(pairs), 2), float("nan")) for name, pairs in sets.items()}
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=False)
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


def response_logps(model, samples: list[tuple[list[int], list[int], str]], cfg: DPOConfig, pad_id: int,
                   autocast=nullcontext) -> torch.Tensor:
    """Sequence log-prob of each sampled response under ``model`` (teacher forced)."""
    scorer = SequenceLogps(model).eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(samples), cfg.ref_batch_size):
        rows = [(p, [(r, r, j)]) for j, (p, r, _) in enumerate(samples[i:i + cfg.ref_batch_size])]
        b = {k: v.to(device) for k, v in build_batch(rows, pad_id, "2d").items()}
        with torch.no_grad(), autocast():
            out.append(scorer(**b)[0].float().cpu())
    return torch.cat(out)


def kl_to_reference(model, tokenizer, prompts, cfg: DPOConfig, pad_id: int, autocast=nullcontext) -> dict[str, float]:
    """Monte-Carlo KL(pi || ref) = E_{y ~ pi}[log pi(y|x) - log ref(y|x)] on held-out prompts.

    Both log-probs are recomputed by the same teacher-forced pass (not taken from the
    sampler), so bf16/KV-cache rounding does not show up as a spurious KL.
    """
    samples = [s for s in sample(model, tokenizer, prompts, cfg, cfg.kl_max_new_tokens, 1.0) if s[1]]
    if not samples:
        return {}
    pol = response_logps(model, samples, cfg, pad_id, autocast)
    with reference_of(model, cfg) as ref:
        ref_lp = response_logps(ref, samples, cfg, pad_id, autocast)
    n_tok = sum(len(r) for _, r, _ in samples)
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


def train(cfg: DPOConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Run DPO; returns the run folder's ``model/``."""
    from tqdm.auto import tqdm

    from chatforge.models.load import check_model_exists, load_tokenizer

    check_model_exists(cfg.model)
    if cfg.judge:
        check_model_exists(cfg.judge)
    acc = core.setup_accelerator(cfg)
    run = Run(cfg.out, resume=resume, overwrite=overwrite, is_main=acc.is_main_process)
    run.write_config(cfg)
    say = acc.print

    # data
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set, eval_set, report = load_pairs(cfg, tokenizer, run, log=say)
    for line in report.lines():
        say(line)
    prompts = read_prompts(cfg.eval_prompts, cfg.format) if cfg.eval_prompts else unique_prompts(e.prompt for e in eval_set)
    say(f"{len(train_set)} train pairs, {len(eval_set)} held-out pairs, {len(prompts)} held-out prompts")

    # model, reference cache (before any update: the model is the reference now)
    model = core.prepare_model(load_policy(cfg.model), cfg).to(acc.device)
    if cfg.lora:
        core.name_adapter_base(model, cfg.model)
    steps = core.total_steps(cfg, len(train_set), acc.num_processes)
    n_eval = min(len(eval_set), cfg.max_eval_records)
    t_ref = time.time()
    ref = reference_logps(model, cfg, {"train": train_set, "eval": eval_set[:n_eval]}, pad_id, acc,
                          run.path / "ref_logps.pt",
                          needed={"train": planned_pairs(len(train_set), cfg, steps, acc.num_processes),
                                  "eval": list(range(n_eval))})
    t_ref = time.time() - t_ref

    # optimizer, schedule, resume
    scorer = SequenceLogps(model)
    share = cfg.share_prompt and share_prompt_ok(model)
    opt = core.build_optimizer(model, cfg)
    sched = core.build_scheduler(opt, cfg, steps)
    scorer, opt, sched = acc.prepare(scorer, opt, sched)
    step = 0
    if resume:
        state = core.resume_from(run, acc, model, opt, sched)
        if state is not None:
            step = state["step"]
            say(f"resumed from {state['checkpoint']} at step {step}")
            if step < steps and acc.is_main_process:
                (run.path / "DONE").unlink(missing_ok=True)  # finished before; not any more
    batches = core.batch_indices(len(train_set), cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes,
                                 start_batch=step * cfg.grad_accum)

    def evaluate() -> dict[str, float]:
        with torch.random.fork_rng(devices=[]):  # sampling must not shift the training RNG stream
            return _evaluate()

    def _evaluate() -> dict[str, float]:
        """The first ``max_eval_records`` held-out pairs, and the KL on held-out prompts."""
        m = {}
        if n_eval:
            pol = score_pairs(acc.unwrap_model(scorer), eval_set[:n_eval], cfg.ref_batch_size, pad_id, acc.autocast,
                              share_prompt=share)
            m.update({f"eval_{k}": v for k, v in pair_metrics(pol, ref["eval"], cfg).items()})
        if cfg.kl_prompts and prompts:
            m.update(kl_to_reference(model, tokenizer, prompts[:cfg.kl_prompts], cfg, pad_id, acc.autocast))
        return m

    t0 = time.time()
    # the budget is training time: the one-off reference pass (cached, ~25 min for 1,847 hh-rlhf pairs on a
    # loaded 2-core CPU) must not eat it, as it did once (1 step in "10 minutes"); as the RM's budget
    deadline = t0 + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    window: list[dict[str, float]] = []
    last_eval: dict[str, float] = {}
    if step == 0 and acc.is_main_process:
        last_eval = evaluate()
        run.log(0, **last_eval)
    tokens, t_window = 0, time.time()
    bar = tqdm(total=steps, initial=step, desc="dpo", disable=not acc.is_main_process)
    scorer.train()
    while step < steps:
        stats: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            idx = next(batches)
            batch = [train_set[i] for i in idx]
            b = {k: v.to(acc.device) for k, v in pair_batch(batch, pad_id, share).items()}
            ctx = acc.no_sync(scorer) if micro < cfg.grad_accum - 1 else nullcontext()
            with ctx:
                logps, _ = scorer(**b)
                n = len(idx)
                ref_b = ref["train"][idx].to(acc.device)  # planned_pairs guarantees these were computed
                losses, rc, rr = dpo_loss(logps[:n], logps[n:], ref_b[:, 0], ref_b[:, 1], cfg.beta, cfg.loss,
                                          cfg.label_smoothing)
                acc.backward(losses.mean() / cfg.grad_accum)
            tokens += sum(len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids) for ex in batch)
            m = {"loss": losses.mean().item(), "acc": reward_accuracy(rc, rr).mean().item(),
                 "margin": (rc - rr).mean().item(), "chosen_reward": rc.mean().item(),
                 "rejected_reward": rr.mean().item(), "chosen_logp": logps[:n].mean().item(),
                 "rejected_logp": logps[n:].mean().item()}
            for k, v in m.items():
                stats[k] = stats.get(k, 0.0) + v / cfg.grad_accum
        gnorm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if gnorm is not None:
            stats["grad_norm"] = float(gnorm)
        window.append(stats)
        out_of_time = time.time() > deadline
        if step % cfg.log_every == 0 or step == steps or out_of_time:
            row = {k: sum(w[k] for w in window if k in w) / len(window) for k in window[0]}
            dt = time.time() - t_window
            row.update(lr=sched.get_last_lr()[0], tokens_per_s=core.tokens_per_second(tokens, dt),
                       step_time_s=dt / len(window))
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.2f}")
            run.log(step, **row)
            window, tokens, t_window = [], 0, time.time()
        if step % cfg.eval_every == 0 or step == steps or out_of_time:
            if acc.is_main_process:
                last_eval = evaluate()
                run.log(step, **last_eval)
                say(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items()))
            t_window = time.time()  # evaluation time is not training time
        if step % cfg.save_every == 0 and step < steps and not out_of_time:
            core.save_checkpoint(run, step, acc, model, tokenizer, opt, sched, keep_last=cfg.keep_last)
            t_window = time.time()  # nor is checkpointing
        if out_of_time:
            say(f"max_minutes={cfg.max_minutes} reached at step {step}/{steps}; stopping")
            break
    bar.close()
    train_s = time.time() - t0

    summary: dict[str, Any] = {"train_time_s": round(train_s, 1), "reference_time_s": round(t_ref, 1),
                               "planned_steps": steps, "data": report.to_dict(), "train_pairs": len(train_set),
                               "pairs_seen": step * cfg.batch_size * cfg.grad_accum * acc.num_processes,
                               "eval_pairs": n_eval, "heldout_pairs": len(eval_set),
                               "cpu_time_s": round(time.process_time(), 1), **last_eval}
    if cfg.judge and prompts and acc.is_main_process:
        summary.update(judge_win_rate(model, tokenizer, prompts, cfg))
        say(f"win rate vs the starting policy ({summary['judge_prompts']} prompts, judge {cfg.judge}): "
            f"{summary['win_rate']:.3f}")
    if acc.is_main_process:
        plot_curves(run.read_metrics(), PLOT_KEYS, run.path / "dpo.png", title=f"DPO ({cfg.loss}, beta={cfg.beta})")
    return core.finish(run, acc, model, tokenizer, step, merge=cfg.lora and core.starts_from_adapter(cfg.model),
                       **summary)

"""Supervised fine-tuning (full or LoRA): conversations -> a model that answers like them.

The step is in the open below (:func:`train_sft`); set-up (accelerator, optimizer,
schedule, sharded batch order) comes from :mod:`chatforge.train.core`, the loop (budget,
cadence, checkpoints, exact resume) from :mod:`chatforge.train.loop`, the CPU levers from
:mod:`chatforge.train.levers`.

Data: ``Conversation`` records from any supported file. Tokenised by
:func:`chatforge.data.tokenize.build_sft_examples`: labels on assistant content and its
end-of-turn token only (``train_on``), examples packed into rows of ``max_len`` tokens
(``pack``) with position ids that restart per example (block-diagonal attention, so
packed examples never see each other). The held-out split is made by *record*, with a
fixed seed, before tokenisation.

Loss: the mean cross-entropy over label tokens of the whole optimizer step -- every
micro-batch of the gradient accumulation and every rank -- i.e. token-weighted: a long
answer counts by its tokens, and the gradient is the same whatever ``grad_accum`` and
the number of processes are (each micro-batch contributes ``sum(ce) / N_step``, where
``N_step`` is the label-token count of the global step, all-reduced before the forwards).
Averaging per micro-batch instead would weight a 10-token answer like a 300-token one.

Levers, in the order they matter on a 2-core CPU (measured by ``bench/sft.py``):

* **bf16 compute weights** (``bf16_weights``, on when bf16 is the precision): the model
  computes with bf16 weights; fp32 master weights and fp32 optimizer state live beside
  them (:class:`~chatforge.train.levers.MasterWeights`; one process or DDP: under FSDP /
  DeepSpeed their own mixed precision applies). Autocast would instead re-cast every fp32 weight on
  every forward and cast every weight gradient back. Under LoRA the frozen base simply
  is bf16 (no master needed) and the adapter computes in bf16 from fp32 masters too (else
  peft casts every adapted activation to fp32).
* **grouped attention** (``attention``, :func:`~chatforge.train.levers.grouped_attention`): on CPU, eager attention
  with the GQA query heads folded into one matmul per kv head runs fwd+bwd ~2x faster than
  the SDPA flash kernel, whose backward is slow here (~15-20% of a SmolLM2 step at 256
  tokens). It keeps T^2 probabilities per head, so ``auto`` uses it up to 1024 tokens.
* **fused AdamW** (``core.build_optimizer``): one kernel over all parameters instead of a
  dozen per-tensor passes.
* **LM head on label positions only**: the 49k x 576 vocabulary projection and its
  cross-entropy run only on positions that predict a label (~60% of tokens on
  instruction data), never on prompts or padding.
* **packing** (``pack``): rows ~99% full, so no compute on padding.
* LoRA (``lora``) skips weight gradients of the frozen base; gradient checkpointing saves
  memory, not time.

Logged metrics (``metrics.jsonl``): ``loss`` (token-weighted train CE of each step, averaged
over the last ``log_every`` steps), ``lr``, ``tokens_per_s`` (real, non-pad tokens of all ranks per
second of training), ``grad_norm`` (before clipping), ``step_time_s``; ``eval_loss`` and
``eval_ppl`` = exp(eval_loss) on the held-out rows every ``eval_every`` steps, before
training (step 0) and at the end.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.config import check_range
from chatforge.data.split import read_records, split_records
from chatforge.errors import ConfigError, DataError
from chatforge.models.logprobs import backbone_and_head
from chatforge.train import core, levers
from chatforge.train.core import TrainConfig
from chatforge.train.loop import Checkpointer, Loop, begin, open_run, pad_id_of

IGNORE = -100
PLOT_KEYS = ["loss", "eval_loss", "lr", "tokens_per_s", "grad_norm"]
ATTENTION = ("auto", "grouped", "model", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


# ---------------------------------------------------------------- config
@dataclass
class SFTConfig(TrainConfig):
    """SFT recipe. Defaults fit SmolLM2-135M on a 2-core CPU: 4 packed rows of 512 tokens
    x 4 accumulation steps = ~8k tokens per optimizer step."""

    lr: float = 0.0                    # 0 = auto: 2e-4 with LoRA, 2e-5 full fine-tuning
    grad_accum: int = 4
    pack: bool = True                  # pack examples into rows of max_len (block-diagonal attention)
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    truncation: Literal["turns", "drop"] = "turns"  # too long: cut at an assistant turn end, or drop
    eval_batch_size: int = 8           # rows per forward in evaluation
    bf16_weights: bool = True          # with bf16: bf16 compute weights + fp32 master (see module doc)
    attention: str = "auto"            # training attention: auto (grouped on CPU), grouped, model (its own), sdpa, eager

    def validate(self) -> None:
        if self.lr == 0.0:
            self.lr = 2e-4 if self.lora else 2e-5  # resolved here so config.yaml records it
        super().validate()
        check_range("eval_batch_size", self.eval_batch_size, 1, None)
        if self.attention not in ATTENTION:
            raise ConfigError(f"attention={self.attention!r}: expected one of {', '.join(ATTENTION)}")


# ---------------------------------------------------------------- data
@dataclass
class SFTData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    report: dict[str, Any]


def load_data(cfg: SFTConfig, tokenizer, log: Callable[[str], None] = print) -> SFTData:
    """Read, split by record, tokenise (+pack). Zero usable training rows -> DataError."""
    from chatforge.data.tokenize import build_sft_examples

    if not cfg.data:
        raise ConfigError("data: give at least one conversation file (--data FILE)")
    records, errors = read_records(cfg.data, cfg.format, log)
    if cfg.eval_data:
        eval_records, eval_errors = read_records(cfg.eval_data, cfg.format, log)
        eval_records = eval_records[:cfg.max_eval_records]
        errors += eval_errors
    else:
        records, eval_records, _ = split_records(records, cfg.eval_fraction, cfg.seed, cfg.max_eval_records)
    kw = dict(template=cfg.template, pack=cfg.pack, train_on=cfg.train_on, truncation=cfg.truncation)
    train, st = build_sft_examples(records, tokenizer, cfg.max_len, **kw)
    held, est = build_sft_examples(eval_records, tokenizer, cfg.max_len, **kw) if eval_records else ([], None)
    log(f"train: {st.summary()}")
    if est is not None:
        log(f"eval:  {est.summary()}")
    if not train:
        why = "; ".join(st.first_errors[:2]) or st.summary()
        raise DataError(f"{', '.join(cfg.data)}: no usable training conversations ({why})")
    report = {"read_errors": errors, "train": st.to_dict(), "eval": est.to_dict() if est else None}
    report["train"].pop("first_errors", None)
    if report["eval"]:
        report["eval"].pop("first_errors", None)
    return SFTData(train, held, report)


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens the loss sees (a label at position t is predicted from position t-1)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# ---------------------------------------------------------------- model pieces
class TokenLoss(nn.Module):
    """``forward(batch) -> (sum of CE over label tokens, number of label tokens)``.

    The LM head runs only on hidden states that predict a label. A module (not a
    function), so DDP wraps the whole computation and syncs its gradients.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.parts = backbone_and_head(model)  # None -> full forward (soft-capped logits, ...)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        targets = labels[:, 1:]
        keep = targets != IGNORE
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if self.parts is not None:
            body, head = self.parts
            logits = head(body(**kw).last_hidden_state[:, :-1][keep])
        else:
            logits = self.model(**kw).logits[:, :-1][keep]
        ce = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return ce, keep.sum()


def set_base_name(model, name: str) -> None:
    """Record a base that chatforge (and, for real paths, plain peft) can load again:
    the resolved directory for ``smollm2``/paths, the name itself for ``tiny``."""
    from chatforge.models.load import resolve

    r = resolve(name)
    if r.kind == "tiny" or r.kind == "hub":
        base = r.path
    elif r.kind == "gguf":
        base = str(Path(r.path, r.gguf_file or "").resolve())
    else:
        base = str(Path(r.path if r.kind == "hf" else name).resolve())
    model.config._name_or_path = base
    model.name_or_path = base  # what peft writes into adapter_config.json


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_rows(loss_fn: TokenLoss, rows: list[dict], batch_size: int, pad_id: int, accelerator) -> dict[str, float]:
    """Token-weighted held-out CE and perplexity; each rank takes a strided shard."""
    from chatforge.data.tokenize import collate

    if not rows:
        return {}
    was = loss_fn.training
    loss_fn.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = rows[rank::world]
    tot = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), batch_size):
        b = {k: v.to(accelerator.device) for k, v in collate(mine[i:i + batch_size], pad_id).items()}
        with accelerator.autocast():
            ce, n = loss_fn(**b)
        tot += torch.tensor([float(ce), float(n)], dtype=torch.float64)
    if world > 1:
        tot = accelerator.reduce(tot.to(accelerator.device), reduction="sum").cpu()
    loss_fn.train(was)
    loss = (tot[0] / tot[1]).item() if tot[1] > 0 else float("nan")
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}




# ---------------------------------------------------------------- the loop
OnStep = Callable[[int, nn.Module, list[list[int]]], None]


def train_sft(cfg: SFTConfig, resume: bool = False, overwrite: bool = False, on_step: OnStep | None = None) -> Path:
    """Run supervised fine-tuning; returns the run folder's ``model/``.

    ``on_step(step, model, micro_batch_indices)`` is called after every optimizer step on
    every rank (tests record data sharding, hash weights, or simulate a kill there).
    """
    from chatforge.data.tokenize import collate
    from chatforge.models.load import load_model, load_tokenizer
    from chatforge.models.lora import trainable_parameters

    if (acc := begin(cfg, resume)) is None:
        return Path(cfg.out) / "model"
    say = acc.print
    tokenizer = load_tokenizer(cfg.model)
    pad_id = pad_id_of(tokenizer)
    data = load_data(cfg, tokenizer, log=say)
    run = open_run(acc, cfg, resume, overwrite)
    say(f"{len(data.train)} train rows, {len(data.eval)} held-out rows of <= {cfg.max_len} tokens")

    # model: fp32 master weights; LoRA / gradient checkpointing
    model = load_model(cfg.model, dtype="fp32", merge_adapter=True)  # an adapter run is merged first
    set_base_name(model, cfg.model)
    model = core.prepare_model(model, cfg)
    n_train, n_total = trainable_parameters(model)
    say(f"model {cfg.model}: {n_total / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M trainable"
        f"{' (LoRA)' if cfg.lora else ''}; precision "
        f"{'fp32' if acc.mixed_precision == 'no' else acc.mixed_precision}")  # accelerate says "no" for fp32
    model.to(acc.device)
    model.train()

    # precision: bf16 compute weights (fp32 masters) instead of re-casting under autocast
    masters = None
    if cfg.bf16_weights and acc.mixed_precision == "bf16" and not core.is_sharded(acc):
        levers.cast_frozen(model, torch.bfloat16)  # a LoRA base: bf16, no master needed
        masters = levers.MasterWeights(list(model.parameters()))  # the trained weights (all, or the adapter)
    steps = core.total_steps(cfg, len(data.train), acc.num_processes)
    opt = core.build_optimizer(model, cfg)
    sched = core.build_scheduler(opt, cfg, steps)
    loss_fn, opt, sched = acc.prepare(TokenLoss(model), opt, sched)  # DDP over the whole loss computation
    plain_loss = acc.unwrap_model(loss_fn)
    weights_ctx = masters.as_master if masters is not None else nullcontext

    def evaluate(final: bool) -> dict[str, float]:
        return evaluate_rows(plain_loss, data.eval, cfg.eval_batch_size, pad_id, acc) if data.eval else {}

    rank, world = acc.process_index, acc.num_processes
    seen: list[list[int]] = []
    loop = Loop(acc, run, cfg, steps, "sft", Checkpointer(acc, run, model, tokenizer, cfg, weights_ctx=weights_ctx),
                evaluate=evaluate, scheduler=sched, show=("loss", "tokens_per_s"),
                on_step=(lambda s: on_step(s, model, [list(ix) for ix in seen])) if on_step else None,
                plot=("loss.png", PLOT_KEYS, f"SFT {cfg.model}{' (LoRA)' if cfg.lora else ''}"))
    loop.resume(resume)  # weights, optimizer, scheduler, RNG (into the fp32 masters)
    if masters is not None:
        masters.refresh()
    batches = core.batch_indices(len(data.train), cfg.batch_size, cfg.seed, rank, world,
                                 start_batch=loop.step * cfg.grad_accum)
    with levers.attention_for_training(model, cfg.attention, acc.device, cfg.max_len):
        for _ in loop:
            # the step's micro-batches, and the label-token count of the whole (global) step
            seen[:] = [next(batches) for _ in range(cfg.grad_accum)]
            micro = [{k: v.to(acc.device) for k, v in collate([data.train[i] for i in ix], pad_id).items()}
                     for ix in seen]
            real_tokens = sum(len(data.train[i]["input_ids"]) for ix in seen for i in ix)  # not pad (pad == eos)
            counts = torch.tensor([sum(label_count(b) for b in micro)], dtype=torch.float64)
            if world > 1:
                counts = acc.reduce(counts.to(acc.device), reduction="sum").cpu()
            n_step = max(1.0, counts[0].item())
            ce_step = 0.0
            for j, b in enumerate(micro):
                last_micro = j == len(micro) - 1 and masters is None  # masters reduce their fp32 grads themselves
                with nullcontext() if last_micro else acc.no_sync(loss_fn):
                    ce, _ = loss_fn(**b)
                    # DDP averages gradients over ranks: scale by world so the result is sum(ce)/N_step
                    acc.backward(ce * (world / n_step))
                ce_step += float(ce.detach())
                if masters is not None:
                    masters.collect_grads()
            if masters is not None:
                masters.to_master()
            gnorm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if masters is not None:
                masters.to_compute()
            # loss: this rank's CE sum over the global label count; summed (not averaged) over ranks
            loop.record(tokens=real_tokens, loss=ce_step / n_step * world, grad_norm=float(gnorm))

    summary: dict[str, Any] = {"train_rows": len(data.train), "eval_rows": len(data.eval),
                               "trainable_params": n_train, "total_params": n_total, "data": data.report}
    rows = run.read_metrics() if acc.is_main_process else []
    train_rows = [r for r in rows if "loss" in r]
    summary["train_loss"] = train_rows[-1]["loss"] if train_rows else None
    with weights_ctx():
        return loop.finish(**summary)

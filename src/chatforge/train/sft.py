"""Supervised fine-tuning (full or LoRA): conversations -> a model that answers like them.

The loop is in the open below (:func:`train_sft`); the shared pieces (accelerator,
optimizer, schedule, sharded batch order, atomic checkpoints, exact resume) come from
:mod:`chatforge.train.core`.

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
  them (:class:`MasterWeights`). Autocast would instead re-cast every fp32 weight on
  every forward and cast every weight gradient back. Under LoRA the frozen base simply
  is bf16 (no master needed) and the adapter computes in bf16 from fp32 masters too (else
  peft casts every adapted activation to fp32).
* **grouped attention** (``attention``, :func:`grouped_attention`): on CPU, eager attention
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

Logged metrics (``metrics.jsonl``): ``loss`` (token-weighted train CE over the last
``log_every`` steps), ``lr``, ``tokens_per_s`` (real, non-pad tokens of all ranks per
second of training), ``grad_norm`` (before clipping), ``step_time_s``; ``eval_loss`` and
``eval_ppl`` = exp(eval_loss) on the held-out rows every ``eval_every`` steps, before
training (step 0) and at the end.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.config import check_range
from chatforge.errors import ConfigError, DataError
from chatforge.runs import Run, plot_curves
from chatforge.train import core
from chatforge.train.core import TrainConfig

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
    eval_before: bool = True           # held-out loss of the starting model (step 0)
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


def read_records(paths: list[str], fmt: str | None, log: Callable[[str], None]) -> tuple[list[Any], int]:
    """All records of ``paths`` and the number of unreadable items (first ones printed)."""
    from chatforge.data.readers import read_files

    records, errors = [], 0
    for res in read_files(paths, format=fmt):
        records.extend(res.records)
        errors += len(res.errors)
        for e in res.errors[:3]:
            log(f"  unreadable: {e.where()}: {e.reason}")
        if res.errors:
            log(f"{res.file}: {len(res.records)} records, {len(res.errors)} unreadable items")
    return records, errors


def split_records(records: list[Any], fraction: float, max_eval: int, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``fraction`` of the records (at most ``max_eval``), chosen with ``seed``."""
    import numpy as np

    n_eval = min(max_eval, int(round(fraction * len(records))))
    if n_eval <= 0 or len(records) < 2:
        return records, []
    n_eval = min(n_eval, len(records) - 1)
    held = set(np.random.default_rng(seed).permutation(len(records))[:n_eval].tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


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
        records, eval_records = split_records(records, cfg.eval_fraction, cfg.max_eval_records, cfg.seed)
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
def backbone_and_head(model) -> tuple[nn.Module, nn.Module] | None:
    """The transformer body and the LM head when logits are a plain linear map of the last
    hidden state (Llama, Qwen, Mistral, ...); None -> fall back to the full forward."""
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


class TokenLoss(nn.Module):
    """``forward(batch) -> (sum of CE over label tokens, number of label tokens)``.

    The LM head runs only on hidden states that predict a label. A module (not a
    function), so DDP wraps the whole computation and syncs its gradients.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.parts = backbone_and_head(model)

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


class MasterWeights:
    """bf16 compute weights with an fp32 master copy, for full fine-tuning.

    The parameters keep their identity (the optimizer, DDP and ``save_pretrained`` see the
    same ``nn.Parameter`` objects); only ``.data`` is switched between the bf16 compute
    tensor (forward/backward) and the fp32 master tensor (optimizer step, checkpoints).
    Gradients are accumulated in fp32 after every micro-batch, so accumulation loses
    nothing to bf16 rounding.
    """

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype = torch.bfloat16):
        self.params = [p for p in params if p.requires_grad and p.dtype == torch.float32]
        self.master = [p.data for p in self.params]
        self.compute = [m.to(dtype) for m in self.master]
        self.grads: list[torch.Tensor | None] = [None] * len(self.params)
        self.use_compute()

    def use_compute(self) -> None:
        for p, c in zip(self.params, self.compute):
            p.data = c

    def use_master(self) -> None:
        for p, m in zip(self.params, self.master):
            p.data = m

    def collect_grads(self) -> None:
        """After a backward: move the bf16 grads into the fp32 accumulators."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = self.grads[i]
            if g is None:
                self.grads[i] = p.grad.float()
            else:
                g.add_(p.grad)
            p.grad = None

    def to_master(self) -> None:
        """Before clipping and the optimizer step: fp32 weights, fp32 grads -- averaged over
        the ranks here, in fp32 (the loop runs every micro-batch under ``no_sync``: DDP
        would only reduce what is still in ``.grad`` at the last one)."""
        import torch.distributed as dist

        self.use_master()
        grads = [g if g is not None else torch.zeros_like(m) for g, m in zip(self.grads, self.master)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for h in [dist.all_reduce(g, async_op=True) for g in grads]:
                h.wait()
            for g in grads:
                g.div_(world)
        for p, g in zip(self.params, grads):
            p.grad = g
        self.grads = [None] * len(self.params)

    def to_compute(self) -> None:
        """After the optimizer step: refresh the bf16 copies from the updated masters."""
        for p, c, m in zip(self.params, self.compute, self.master):
            c.copy_(m)
            p.grad = None
        self.use_compute()

    @contextmanager
    def as_master(self) -> Iterator[None]:
        """fp32 weights for the duration (checkpoints save the master copy)."""
        self.use_master()
        try:
            yield
        finally:
            self.use_compute()


def cast_frozen(model, dtype: torch.dtype) -> int:
    """Cast frozen floating-point parameters (a LoRA base) to ``dtype``; returns how many."""
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


GROUPED = "chatforge_grouped"
GROUPED_MAX_LEN = 1024


def grouped_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention for training on CPU, without ``repeat_kv``.

    The ``g`` query heads that share a key/value head (GQA: 9 query, 3 kv heads on
    SmolLM2) become ``g * T`` rows of ONE matmul against that kv head, so K and V are never
    copied g times, and the backward is two plain bf16 matmuls per layer. On this CPU the
    fwd+bwd is ~2x faster than the SDPA flash kernel at T=256. The additive mask
    (``eager_mask``: 0 / -inf, block-diagonal for packed rows) is shared by the g heads.
    """
    b, h, t, d = query.shape
    hk, s = key.shape[1], key.shape[2]
    g = h // hk
    scores = torch.matmul(query.reshape(b, hk, g * t, d), key.transpose(2, 3)) * scaling
    scores = scores.view(b, hk, g, t, s)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, -s:].to(scores.dtype)
    # softmax in the compute dtype: the kernel accumulates in fp32 and its bf16 output is the
    # ONE tensor saved for both backward passes (an fp32 softmax would keep a second, 2x larger copy)
    probs = F.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs.view(b, hk, g * t, s), value)
    return out.view(b, h, t, d).transpose(1, 2).contiguous(), None


def register_grouped_attention() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(GROUPED, grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED, eager_mask)


@contextmanager
def attention_for_training(model, kind: str, device: torch.device, max_len: int = 512) -> Iterator[None]:
    """Switch the model to the training attention for the block, then back (so saved
    configs and later inference keep the model's own implementation).

    ``auto`` picks the grouped attention on CPU for rows up to ``GROUPED_MAX_LEN`` tokens:
    it keeps the bf16 probabilities (``batch * heads * T^2`` values per layer) for the
    backward, ~0.5 GB for SmolLM2 at 4 x 512, which grows as T^2; longer rows keep sdpa.
    """
    from chatforge.models.lora import is_peft

    base = model.get_base_model() if is_peft(model) else model
    before = getattr(base.config, "_attn_implementation", None)
    fits = device.type == "cpu" and before in ("sdpa", "eager") and max_len <= GROUPED_MAX_LEN
    want = {"auto": GROUPED if fits else None,
            "grouped": GROUPED, "model": None}.get(kind, kind)
    if want is None or want == before:
        yield
        return
    if want == GROUPED:
        register_grouped_attention()
    base.set_attn_implementation(want)
    try:
        yield
    finally:
        base.set_attn_implementation(before)


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
def evaluate(loss_fn: TokenLoss, rows: list[dict], batch_size: int, pad_id: int, accelerator) -> dict[str, float]:
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
def finished(out: Path, cfg: SFTConfig) -> bool:
    """A run that completed its plan. One stopped by ``max_minutes`` (or resumed with a
    larger ``max_steps``) is not: ``--resume`` continues it."""
    import json

    if not (out / "DONE").exists() or not (out / "summary.json").exists():
        return False
    s = json.loads((out / "summary.json").read_text())
    return not s.get("stopped_early") and (cfg.max_steps == 0 or s.get("steps", 0) >= cfg.max_steps)


def train_sft(cfg: SFTConfig, resume: bool = False, overwrite: bool = False,
              on_step: Callable[[int, list[list[int]], nn.Module], None] | None = None) -> Path:
    """Run supervised fine-tuning; returns the run folder's ``model/``.

    ``on_step(step, micro_batch_indices, model)`` is called after every optimizer step
    on every rank (tests use it to record data sharding, hash weights, or simulate a kill
    by raising).
    """
    from tqdm.auto import tqdm

    from chatforge.data.tokenize import collate
    from chatforge.models.load import check_model_exists, load_model, load_tokenizer
    from chatforge.models.lora import trainable_parameters

    # quick failures first: model, data, options -- before any weights are loaded
    check_model_exists(cfg.model)
    if resume and finished(Path(cfg.out), cfg):
        print(f"{cfg.out} is finished (DONE); nothing to resume")
        return Path(cfg.out) / "model"
    acc = core.setup_accelerator(cfg)
    say = acc.print
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = load_data(cfg, tokenizer, log=say)
    run = Run(cfg.out, resume=resume, overwrite=overwrite, is_main=acc.is_main_process)
    if resume and acc.is_main_process:
        (run.path / "DONE").unlink(missing_ok=True)  # running again: not done until finish()
    run.write_config(cfg)
    say(f"{len(data.train)} train rows, {len(data.eval)} held-out rows of <= {cfg.max_len} tokens")

    # model: fp32 master weights; LoRA / gradient checkpointing
    model = load_model(cfg.model, dtype="fp32", merge_adapter=True)  # an adapter run is merged first
    set_base_name(model, cfg.model)
    model = core.prepare_model(model, cfg)
    n_train, n_total = trainable_parameters(model)
    say(f"model {cfg.model}: {n_total / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M trainable"
        f"{' (LoRA)' if cfg.lora else ''}; precision {acc.mixed_precision}")
    model.to(acc.device)
    model.train()

    steps = core.total_steps(cfg, len(data.train), acc.num_processes)
    opt = core.build_optimizer(model, cfg)
    sched = core.build_scheduler(opt, cfg, steps)
    step = 0
    if resume:  # weights, optimizer, scheduler, RNG -- into the fp32 model, before any cast
        state = core.resume_from(run, acc, model, opt, sched)
        if state is not None:
            step = state["step"]
            say(f"resumed from {state['checkpoint']} at step {step}")

    # precision: bf16 compute weights (fp32 masters) instead of re-casting under autocast
    masters = None
    if cfg.bf16_weights and acc.mixed_precision == "bf16":
        cast_frozen(model, torch.bfloat16)  # a LoRA base: bf16, no master needed
        masters = MasterWeights([p for p in model.parameters()])  # the trained weights (all, or the adapter)
    loss_fn = acc.prepare(TokenLoss(model))  # DDP over the whole loss computation when distributed
    plain_loss = acc.unwrap_model(loss_fn)
    master_ctx = masters.as_master if masters is not None else nullcontext

    def checkpoint(at: int) -> None:
        with master_ctx():
            core.save_checkpoint(run, at, acc, model, tokenizer, opt, sched, keep_last=cfg.keep_last)

    rank, world = acc.process_index, acc.num_processes
    batches = core.batch_indices(len(data.train), cfg.batch_size, cfg.seed, rank, world,
                                 start_batch=step * cfg.grad_accum)
    scope = ExitStack()  # training attention for the loop; the model's own again for saving and after
    scope.enter_context(attention_for_training(model, cfg.attention, acc.device, cfg.max_len))
    deadline = run.start + 60 * cfg.max_minutes if cfg.max_minutes else math.inf  # set-up counts too
    first_eval: dict[str, float] = next(  # a resumed run keeps its step-0 evaluation
        ({k: r[k] for k in ("eval_loss", "eval_ppl")} for r in run.read_metrics()
         if r.get("step") == 0 and "eval_loss" in r), {}) if acc.is_main_process else {}
    last_eval: dict[str, float] = {}
    if step == 0 and cfg.eval_before and data.eval:
        first_eval = last_eval = evaluate(plain_loss, data.eval, cfg.eval_batch_size, pad_id, acc)
        run.log(0, **last_eval)
        say(f"before training: eval_loss={last_eval['eval_loss']:.4f} eval_ppl={last_eval['eval_ppl']:.2f}")

    bar = tqdm(total=steps, initial=step, desc="sft", disable=not acc.is_main_process, dynamic_ncols=True)
    window = {"ce": 0.0, "n": 0, "tokens": 0, "steps": 0, "gnorm": 0.0}
    t_window = time.time()
    train_time, train_tokens = 0.0, 0
    stopped_early = False
    while step < steps:
        # the step's micro-batches, and the label-token count of the whole (global) step
        idx = [next(batches) for _ in range(cfg.grad_accum)]
        micro = [{k: v.to(acc.device) for k, v in collate([data.train[i] for i in ix], pad_id).items()} for ix in idx]
        real_tokens = sum(len(data.train[i]["input_ids"]) for ix in idx for i in ix)  # not pad (pad == eos here)
        counts = torch.tensor([sum(label_count(b) for b in micro), real_tokens], dtype=torch.float64)
        if world > 1:
            counts = acc.reduce(counts.to(acc.device), reduction="sum").cpu()
        n_step = max(1.0, counts[0].item())
        ce_step = 0.0
        for j, b in enumerate(micro):
            last_micro = j == len(micro) - 1 and masters is None  # masters reduce their fp32 grads themselves
            sync = nullcontext() if last_micro else acc.no_sync(loss_fn)
            with sync:
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
        step += 1
        if world > 1:
            ce_step = acc.reduce(torch.tensor([ce_step], dtype=torch.float64, device=acc.device), reduction="sum").item()
        window["ce"] += ce_step
        window["n"] += n_step
        window["tokens"] += int(counts[1].item())
        window["steps"] += 1
        window["gnorm"] += float(gnorm)
        bar.update(1)

        out_of_time = time.time() > deadline
        if world > 1:  # every rank stops at the same step, or the collectives hang
            flag = torch.tensor([float(out_of_time)], device=acc.device)
            out_of_time = bool(acc.reduce(flag, reduction="sum").item() > 0)
        last = step == steps or out_of_time
        if step % cfg.log_every == 0 or last:
            dt = time.time() - t_window
            train_time += dt
            train_tokens += window["tokens"]
            row = run.log(step, loss=window["ce"] / max(1, window["n"]), lr=sched.get_last_lr()[0],
                          tokens_per_s=core.tokens_per_second(window["tokens"], dt),
                          grad_norm=window["gnorm"] / window["steps"], step_time_s=dt / window["steps"])
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            window = {"ce": 0.0, "n": 0, "tokens": 0, "steps": 0, "gnorm": 0.0}
            t_window = time.time()
        if (step % cfg.eval_every == 0 or last) and data.eval:
            last_eval = evaluate(plain_loss, data.eval, cfg.eval_batch_size, pad_id, acc)
            run.log(step, **last_eval)
            say(f"step {step}: eval_loss={last_eval['eval_loss']:.4f} eval_ppl={last_eval['eval_ppl']:.2f}")
            t_window = time.time()  # evaluation time is not training time
        if step % cfg.save_every == 0 and not last:
            checkpoint(step)
            t_window = time.time()
        if on_step is not None:
            on_step(step, idx, model)
        if out_of_time and step < steps:
            say(f"max_minutes={cfg.max_minutes} reached at step {step}/{steps}; stopping")
            stopped_early = True
            break
    bar.close()
    scope.close()

    rows = run.read_metrics() if acc.is_main_process else []
    train_rows = [r for r in rows if "loss" in r]
    summary: dict[str, Any] = {
        "train_loss": train_rows[-1]["loss"] if train_rows else None,
        "tokens_per_s": round(core.tokens_per_second(train_tokens, train_time), 1),
        "train_time_s": round(train_time, 1),
        "planned_steps": steps, "stopped_early": stopped_early,
        "train_rows": len(data.train), "eval_rows": len(data.eval),
        "trainable_params": n_train, "total_params": n_total, "world_size": world,
        "data": data.report,
    }
    if first_eval:
        summary.update(eval_loss_before=first_eval["eval_loss"], eval_ppl_before=first_eval["eval_ppl"])
    if last_eval:
        summary.update(eval_loss=last_eval["eval_loss"], eval_ppl=last_eval["eval_ppl"])
    if acc.is_main_process:
        plot_curves(rows, PLOT_KEYS, run.path / "loss.png", title=f"SFT {cfg.model}{' (LoRA)' if cfg.lora else ''}")
    with master_ctx():
        return core.finish(run, acc, model, tokenizer, step, **summary)

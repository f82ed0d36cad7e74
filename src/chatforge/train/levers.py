"""CPU speed levers of the trainers, each with the measurement that justifies it.

Kept apart from the algorithms so that a method file reads as its math; a lever is used
where the measurement holds and switched off where it cannot (FSDP / DeepSpeed keep their
own precision policy, so :class:`MasterWeights` is for one process or DDP).

* :class:`MasterWeights` -- bf16 compute weights + fp32 masters for full fine-tuning, instead
  of autocast, which re-casts every fp32 weight on every forward and casts every weight
  gradient back. Measured with ``bench/sft.py --variant bf16_weights=false`` against the
  default: 543 vs 410 tokens/s (1.32x) and 4.00 vs 4.29 GB on SmolLM2, 4 x 256 tokens, AMD EPYC
  with AVX-512-BF16 (``docs/results/bench.md``).
* :func:`grouped_attention` -- eager attention with the GQA query heads folded into one
  matmul per kv head: fwd+bwd ~2x faster than the SDPA flash kernel on CPU at T=256, whose
  backward is ~15-20% of a SmolLM2 step there.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def refresh(self) -> None:
        """After weights were loaded into the masters (resume): copy them to the compute weights."""
        for c, m in zip(self.compute, self.master):
            c.copy_(m)
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

"""Fast decoding for Llama-architecture models (SmolLM2, the tiny test model).

Where the time of ``model(next_token, past_key_values=...)`` goes at batch 1 on a CPU:
the weight matrix-vector products (bound by memory bandwidth, done by a GEMM tuned for big
matrices), and ~1,000 small PyTorch calls of per-layer Python (mask building, cache
bookkeeping, reshapes). This decoder keeps the model's own weights (no copy: training
updates are seen at once) and replaces only the per-token step:

* a pre-allocated KV cache (``[B, kv_heads, prompt + max_new, head_dim]`` per layer) and a
  pre-allocated boolean key mask, updated in place with one column per step;
* grouped-query attention without repeating K/V: the ``n_rep`` query heads that share a
  KV head are laid out as ``n_rep`` queries of that head (what ``transformers`` does too);
* the projections through :mod:`chatforge.generate.kernels` when it compiled (else
  ``F.linear``);
* the same arithmetic as ``transformers`` otherwise (RMSNorm in fp32, rotary embedding
  from the model's own module, residuals in the model dtype), so greedy outputs match;
* plain LoRA adapters (``peft``) are replayed on top of the base projections, so PPO's
  LoRA policy decodes fast too (DoRA and other PEFT methods use the generic decoder).

The prompt (prefill) goes through the model's own forward (PEFT wrapper included); its KV
cache is copied into the static one.

The continuous-batching scheduler (:mod:`chatforge.generate.scheduler`) keeps one cache
running while requests come and go: :meth:`FastLlamaDecoder.prefill_rows` runs newcomers'
prompts without touching the running cache, :meth:`~FastLlamaDecoder.add_rows` appends them
right-aligned (each prompt ends at the shared column, its positions its own), and
:meth:`~FastLlamaDecoder.compact` drops the columns no row uses when the shared column
reaches the end. A row's attention reads only its own valid columns, in order, so where its
columns sit in the cache does not change its result.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatforge.generate import kernels as _kernels
from chatforge.generate.cache import cache_of, left_pad, peft_base

SUPPORTED_TYPES = ("llama",)


def _lora_reason(base) -> str | None:
    """Only plain LoRA on linear layers is replayed by the fast decoder."""
    for name, mod in base.named_modules():
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
            if not isinstance(mod.base_layer, torch.nn.Linear):
                return f"LoRA on a non-linear layer ({name})"
            if getattr(mod, "lora_variant", None):
                return f"a LoRA variant (DoRA, ...) on {name}"
        elif hasattr(mod, "base_layer"):
            return f"a PEFT method other than LoRA on {name}"
    return None


def unsupported_reason(model) -> str | None:
    """Why ``model`` cannot use the fast decoder (None if it can)."""
    base = peft_base(model)
    if base is not model:
        cfg = getattr(model, "active_peft_config", None)
        if cfg is not None and getattr(cfg, "is_prompt_learning", False):
            return "prompt-learning PEFT methods use the generic decoder"
        reason = _lora_reason(base)
        if reason:
            return reason
    cfg = getattr(base, "config", None)
    if getattr(cfg, "model_type", None) not in SUPPORTED_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not one of {SUPPORTED_TYPES}"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(base, "lm_head"):
        return "not a ...ForCausalLM with .model.layers and .lm_head"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return "only silu MLPs without tensor-parallel slicing"
    if getattr(base, "hf_quantizer", None) is not None:
        return "quantized weights"
    return None


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """``LlamaRMSNorm`` op for op (fp32 statistics, weight applied in the input dtype)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


_PAYS_OFF: dict[tuple, bool] = {}  # (dtype, batch, weight shapes) -> C kernels faster here; once per process


def kernels_pay_off(kernels, weights: list[torch.Tensor], batch: int, tries: int = 3) -> bool:
    """Whether the C matrix-vector kernels beat PyTorch's ``F.linear`` on this machine, for
    these weights at this batch size. Measured, not assumed: on an Intel Sapphire Rapids the
    C kernels decoded SmolLM2 (bf16, batch 1) 1.8x faster than PyTorch; on an AMD EPYC with
    AVX-512-BF16, PyTorch's oneDNN kernels were ~1.4x faster than ours. One try streams every
    weight once (about one token's worth of work, ~10-30 ms for SmolLM2); best of ``tries``,
    the two sides interleaved so that a busy neighbour hurts both alike."""
    key = (weights[0].dtype, batch, tuple(tuple(w.shape) for w in weights))
    if key not in _PAYS_OFF:
        xs = {k: torch.randn(batch, k, dtype=weights[0].dtype) for k in {w.shape[1] for w in weights}}

        def timed(linear) -> float:
            t = time.perf_counter()
            for w in weights:
                linear(xs[w.shape[1]], w)
            return time.perf_counter() - t

        c_side, torch_side = [], []
        with torch.inference_mode():
            for _ in range(tries + 1):  # the first try warms both up (page faults, thread pool)
                c_side.append(timed(kernels.linear))
                torch_side.append(timed(F.linear))
        _PAYS_OFF[key] = min(c_side[1:]) < min(torch_side[1:])
    return _PAYS_OFF[key]


@dataclass
class PrefilledRows:
    """New prompts after the model's forward, before they join a running cache."""

    keys: list[torch.Tensor]  # per layer [k, kv_heads, L, head_dim] (rotated, as the cache holds them)
    values: list[torch.Tensor]  # per layer [k, kv_heads, L, head_dim]
    mask: torch.Tensor  # [k, L] 1 on prompt tokens, 0 on the left padding
    next_pos: torch.Tensor  # [k] the position of each row's next token (its prompt length)


class FastLlamaDecoder:
    def __init__(self, model, use_kernels: bool | str = "auto"):
        """``use_kernels``: True always runs the C kernels when they compiled and fit the
        weights, False never, "auto" when :func:`kernels_pay_off` on this machine
        (``CHATFORGE_KERNELS=1`` forces them, ``=0`` disables them)."""
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        self.model = model  # prefill goes through it (PEFT forward included)
        self.base = peft_base(model)  # the step walks its layers
        cfg = self.base.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.base.model.layers[0].self_attn.scaling
        self.device = next(model.parameters()).device
        self.kernels = _kernels.load() if use_kernels and self.device.type == "cpu" else None
        forced = os.environ.get("CHATFORGE_KERNELS") == "1"
        self.calibrate = use_kernels == "auto" and not forced
        self._use_kernels = self._kernels_ok = False
        self._matvec_c = True  # the projections through the C kernels too (else F.linear), see prefill
        self._fused = None
        self.valid: torch.Tensor | None = None  # no running batch yet
        self.length = 0
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def _linear(self, x: torch.Tensor, module, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual + module(x)``; a LoRA layer adds its active adapters as ``peft`` does
        (``y + lora_B(lora_A(x)) * scaling``)."""
        base = getattr(module, "base_layer", None)
        lora = base is not None and not module.disable_adapters and not module.merged
        dense = base if base is not None else module
        K = self.kernels if self._use_kernels and self._matvec_c else None
        if K is not None and x.dtype == dense.weight.dtype and K.supports(dense.weight):
            y = K.linear(x, dense.weight, dense.bias, None if lora else residual)
        else:
            y = F.linear(x, dense.weight, dense.bias)
            if not lora and residual is not None:
                y = residual + y
        if not lora:
            return y
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            a, b, s = module.lora_A[name], module.lora_B[name], module.scaling[name]
            if K is not None and a.weight.dtype == b.weight.dtype == y.dtype and a.bias is None and b.bias is None:
                y = K.linear(K.linear(x, a.weight), b.weight, None, y, float(s))
            else:  # e.g. fp32 adapters on a bf16 model (PEFT's default upcast)
                y = (y + b(a(module.lora_dropout[name](x.to(a.weight.dtype)))) * s).to(y.dtype)
        return y if residual is None else residual + y

    # -------------------------------------------------------------- prefill
    def prefill(self, prompts: list[list[int]], pad_id: int, max_new: int) -> torch.Tensor:
        logits, new = self.prefill_rows(prompts, pad_id)
        B, L = new.mask.shape
        T = L + max_new
        self.k, self.v = [], []
        for keys, values in zip(new.keys, new.values):
            k = keys.new_empty((B, self.n_kv, T, self.head_dim))
            v = values.new_empty((B, self.n_kv, T, self.head_dim))
            k[:, :, :L] = keys
            v[:, :, :L] = values
            self.k.append(k)
            self.v.append(v)
        self.valid = torch.zeros((B, 1, 1, T), dtype=torch.bool, device=self.device)
        self.valid[:, 0, 0, :L] = new.mask.bool()
        self.length = L  # filled cache columns
        self.next_pos = new.next_pos
        # cos/sin of every position decoding can reach, once (the same elementwise computation
        # as per step); rope types that rescale with the sequence length stay per step
        self.rope = None
        self._rope_upto(int(self.next_pos.max()) + max_new + 1)
        self._setup_kernels(B)
        return logits

    def prefill_rows(self, prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, PrefilledRows]:
        """Run new prompts (left-padded) through the model's own forward: ``[k, V]`` logits of
        their next tokens and their KV, not yet part of the running cache (see :meth:`add_rows`)."""
        ids, mask = left_pad(prompts, pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        layers = cache_of(out).layers
        new = PrefilledRows([layer.keys for layer in layers], [layer.values for layer in layers], mask,
                            positions[:, -1] + 1)
        return out.logits[:, -1], new

    def _rope_upto(self, n: int) -> None:
        """The cos/sin table of positions ``[0, n)``, kept when the current one covers them
        (rows of one table are the same bits whatever its length: one multiply per entry)."""
        rotary = self.base.model.rotary_emb
        if any(k in str(getattr(rotary, "rope_type", "default")) for k in ("dynamic", "longrope")):
            self.rope = None
            return
        if self.rope is not None and self.rope[0].shape[0] >= n and self.rope[0].dtype == self.k[0].dtype:
            return
        cos, sin = rotary(self.k[0], torch.arange(n, device=self.device)[None])
        self.rope = (cos[0], sin[0])

    def _setup_kernels(self, batch: int) -> None:
        """Which step path runs (C glue, C or PyTorch matrix products, one fused call), for the
        model's current weights and dtype; ``batch``: the batch size the choice is measured at."""
        dtype = self.k[0].dtype
        self._kernels_ok = self.kernels is not None and dtype in self.kernels.DTYPES and all(
            p.dtype == dtype and p.device.type == "cpu" and p.is_contiguous()
            for n, p in self.base.named_parameters() if "lora_" not in n)
        # the small per-layer ops (norm, rope + cache store, attention, SiLU gate) always win in C (one call
        # instead of 5-10 PyTorch calls); the weight products only where they measured faster than PyTorch's
        self._matvec_c = True
        if self._kernels_ok and self.calibrate:
            dense = [m.weight for n, m in self.base.named_modules()
                     if isinstance(m, torch.nn.Linear) and "lora_" not in n and self.kernels.supports(m.weight)]
            self._matvec_c = bool(dense) and kernels_pay_off(self.kernels, dense, batch)
        # no adapter in the layers: all of them in one C call (same kernels, same order, same bits)
        plain = self.base is self.model and all(not hasattr(m, "base_layer") for m in self.base.modules())
        fused = self._kernels_ok and self._matvec_c and plain
        self._fused = self.kernels.layer_pointers(self.base.model.layers) if fused else None
        self._buffers: dict[str, torch.Tensor] = {}
        self._kv_ptrs: tuple = (None,)

    # -------------------------------------------------------------- a changing batch (the scheduler)
    @property
    def rows(self) -> int:
        """Rows in the running cache (0 before the first prefill and after :meth:`clear`)."""
        return 0 if self.valid is None else self.valid.shape[0]

    @property
    def width(self) -> int:
        """Allocated cache columns per row (``self.length`` of them filled)."""
        return 0 if self.valid is None else self.valid.shape[-1]

    def add_rows(self, new: PrefilledRows, max_width: int, max_position: int, min_room: int = 32) -> None:
        """Append prefilled rows to the running batch (or start one), right-aligned so that each
        new prompt ends at the last filled column; the existing rows keep their order (first).
        ``max_width`` caps the columns allocated per row (see :meth:`_relayout`);
        ``max_position``: the largest position any row may reach, for the rotary table."""
        self._relayout(new, max_width, min_room)
        self._rope_upto(max_position + 1)
        # measured at the next power of two: at most log2(max batch) timings per process
        self._setup_kernels(1 << (self.rows - 1).bit_length())

    def compact(self, max_width: int, min_room: int = 32) -> None:
        """Drop the leading columns no row uses and make room for more steps (at most
        ``max_width`` columns): call when ``length == width``."""
        self._relayout(None, max_width, min_room)

    def clear(self) -> None:
        """Forget the running batch (frees the cache)."""
        self.k, self.v, self.valid, self.length = [], [], None, 0
        self._kv_ptrs = (None,)

    def _relayout(self, new: PrefilledRows | None, max_width: int, min_room: int) -> None:
        """Copy the used columns of the running rows, and ``new``'s prompts, into fresh caches.

        Every row's valid columns end at the shared column, so the columns before the first one
        any row uses are dead: they are dropped. The filled width becomes ``used`` = the longest
        row (or new prompt); ``min(max_width, used + max(min_room, used // 2))`` columns are
        allocated, so compactions get rarer as rows grow (amortised O(1) copies per step). The
        caller passes ``max_width`` = the largest prompt + max_new_tokens among the rows: no row
        can ever need more, so the cache never exceeds rows x that. Fresh caches are zeroed: an
        invalid column is masked, but a NaN in uninitialised memory would still poison SDPA.
        """
        old = self.rows
        first = self.length
        if old:
            used_cols = self.valid[:, 0, 0, :self.length].any(0)
            first = int(used_cols.to(torch.int8).argmax()) if bool(used_cols.any()) else self.length
        u = self.length - first
        L = new.mask.shape[1] if new is not None else 0
        col = max(u, L)
        width = min(max_width, col + max(min_room, col // 2))
        if width <= col:
            raise RuntimeError(f"KV cache layout: {col} columns used, {max_width} allowed: no room for a step")
        B = old + (new.mask.shape[0] if new is not None else 0)
        like = self.k[0] if old else new.keys[0]
        ks, vs = [], []
        for i in range(len(self.k) if old else len(new.keys)):
            k = like.new_zeros((B, self.n_kv, width, self.head_dim))
            v = like.new_zeros((B, self.n_kv, width, self.head_dim))
            if old:
                k[:old, :, col - u:col] = self.k[i][:, :, first:self.length]
                v[:old, :, col - u:col] = self.v[i][:, :, first:self.length]
            if new is not None:
                k[old:, :, col - L:col] = new.keys[i]
                v[old:, :, col - L:col] = new.values[i]
            ks.append(k)
            vs.append(v)
        valid = torch.zeros((B, 1, 1, width), dtype=torch.bool, device=self.device)
        pos = []
        if old:
            valid[:old, :, :, col - u:col] = self.valid[:, :, :, first:self.length]
            pos.append(self.next_pos)
        if new is not None:
            valid[old:, 0, 0, col - L:col] = new.mask.bool()
            pos.append(new.next_pos)
        self.k, self.v, self.valid, self.length, self.next_pos = ks, vs, valid, col, torch.cat(pos)

    # -------------------------------------------------------------- one token
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        B, col = tokens.shape[0], self.length
        if col >= self.valid.shape[-1]:
            raise RuntimeError("KV cache full: more steps than prefill(max_new=...) allowed")
        self.valid[:, :, :, col] = True
        base = self.base
        x = base.model.embed_tokens(tokens)  # [B, hidden]
        if self.rope is not None:  # rows of the table computed at prefill
            cos, sin = self.rope[0][self.next_pos], self.rope[1][self.next_pos]
        else:
            cos, sin = base.model.rotary_emb(x, self.next_pos[:, None])  # [B, 1, head_dim]
        # C kernels on CPU for fp32/bf16 models; under autocast (PPO rollouts) F.linear computes in
        # the autocast dtype: keep that behaviour by staying in PyTorch
        self._use_kernels = (self._kernels_ok and not torch.is_autocast_enabled(self.device.type)
                             and x.dtype == cos.dtype == self.k[0].dtype)
        layer_step = self._layer_c if self._use_kernels else self._layer_torch
        cos, sin = cos.reshape(B, self.head_dim).contiguous(), sin.reshape(B, self.head_dim).contiguous()
        if self._use_kernels and self._fused is not None:
            x = x.contiguous()
            if self._kv_ptrs[0] is not self.k:  # new caches (prefill, keep): their pointers once, not per token
                self._kv_ptrs = (self.k, self.kernels.pointers(self.k), self.kernels.pointers(self.v))
            self.kernels.layers(x, self._fused, self.k, *self._kv_ptrs[1:], self._scratch(B), self.valid, cos, sin,
                                self.n_heads, col, base.model.layers[0].input_layernorm.variance_epsilon, self.scale)
        else:
            for i, layer in enumerate(base.model.layers):
                x = layer_step(i, layer, x, cos, sin, col)
        self.length = col + 1
        self.next_pos = self.next_pos + 1
        norm = base.model.norm
        h = self.kernels.rmsnorm(x, norm.weight, norm.variance_epsilon) if self._use_kernels else rms_norm(x, norm)
        return self._linear(h, base.lm_head)

    def _scratch(self, B: int) -> dict[str, torch.Tensor]:
        """Intermediate buffers of the fused layer call, for batch size ``B``."""
        if self._buffers.get("h") is None or self._buffers["h"].shape[0] != B:
            mlp, dt, q = self.base.model.layers[0].mlp, self.k[0].dtype, self.n_heads * self.head_dim
            kv, inter = self.n_kv * self.head_dim, mlp.gate_proj.weight.shape[0]
            shapes = {"h": mlp.down_proj.weight.shape[0], "q": q, "a": q, "k": kv, "v": kv, "g": inter, "u": inter}
            self._buffers = {n: torch.empty((B, w), dtype=dt) for n, w in shapes.items()}
        return self._buffers

    def _layer_c(self, i: int, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, col: int) -> torch.Tensor:
        K, attn, mlp = self.kernels, layer.self_attn, layer.mlp
        norm = layer.input_layernorm
        h = K.rmsnorm(x, norm.weight, norm.variance_epsilon)
        q = self._linear(h, attn.q_proj)
        K.rope_store(q, self._linear(h, attn.k_proj), self._linear(h, attn.v_proj), cos, sin, self.k[i], self.v[i], col)
        a = K.attention(q, self.k[i], self.v[i], self.valid, col + 1, self.scale)
        x = self._linear(a, attn.o_proj, residual=x)
        norm = layer.post_attention_layernorm
        h = K.rmsnorm(x, norm.weight, norm.variance_epsilon)
        return self._linear(K.silu_mul(self._linear(h, mlp.gate_proj), self._linear(h, mlp.up_proj)), mlp.down_proj,
                            residual=x)

    def _layer_torch(self, i: int, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, col: int
                     ) -> torch.Tensor:
        B, hd, attn, mlp = x.shape[0], self.head_dim, layer.self_attn, layer.mlp
        cos, sin = cos[:, None], sin[:, None]
        h = rms_norm(x, layer.input_layernorm)
        q = rotate(self._linear(h, attn.q_proj).view(B, self.n_heads, hd), cos, sin)
        self.k[i][:, :, col] = rotate(self._linear(h, attn.k_proj).view(B, self.n_kv, hd), cos, sin)
        self.v[i][:, :, col] = self._linear(h, attn.v_proj).view(B, self.n_kv, hd)
        q = q.view(B, self.n_kv, self.n_heads // self.n_kv, hd)  # query heads sharing a KV head
        a = F.scaled_dot_product_attention(q, self.k[i][:, :, :col + 1], self.v[i][:, :, :col + 1],
                                           attn_mask=self.valid[:, :, :, :col + 1], scale=self.scale)
        x = self._linear(a.reshape(B, self.n_heads * hd), attn.o_proj, residual=x)
        h = rms_norm(x, layer.post_attention_layernorm)
        return self._linear(F.silu(self._linear(h, mlp.gate_proj)) * self._linear(h, mlp.up_proj), mlp.down_proj,
                            residual=x)

    def keep(self, rows: torch.Tensor) -> None:
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.valid = self.valid[rows]
        self.next_pos = self.next_pos[rows]

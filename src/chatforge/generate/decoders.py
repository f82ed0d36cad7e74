"""Forward passes for the engine's loop: prefill a batch of prompts, then one token per step.

A decoder keeps its own KV cache, attention mask and positions, and exposes three calls:

* ``prefill(prompts, pad_id, max_new) -> [B, V]`` logits of the next token of each prompt;
* ``step(tokens [B]) -> [B, V]`` feed one token per sequence, get the next logits;
* ``keep(rows [b])`` drop finished sequences from the batch (their cache rows go too).

:class:`HFDecoder` works with any ``transformers`` causal LM, PEFT-wrapped or not: prompts are
left-padded, ``attention_mask`` hides the padding and ``position_ids`` restart at 0 on the
first real token of each row (exactly what ``generate`` does, so greedy outputs match).
:func:`make_decoder` picks between it and :class:`~chatforge.generate.fast.FastLlamaDecoder`;
what both need to call a forward (left padding, the cache's names) is in
:mod:`chatforge.generate.cache`.
"""

from __future__ import annotations

import torch

from chatforge.errors import ConfigError
from chatforge.generate.cache import accepts, cache_kwarg, cache_of, left_pad
from chatforge.generate.fast import FastLlamaDecoder, unsupported_reason


class HFDecoder:
    """Any causal LM through its own ``forward`` and a ``DynamicCache``."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
        self.cache_kw = cache_kwarg(model)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                         use_cache=True, **{self.cache_kw: self.past}, **self.extra)
        self.past = cache_of(out)
        return out.logits[:, -1]

    def prefill(self, prompts: list[list[int]], pad_id: int, max_new: int) -> torch.Tensor:
        ids, self.mask = left_pad(prompts, pad_id, self.device)
        positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)
        self.past = None
        self.next_pos = positions[:, -1] + 1
        return self._forward(ids, positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        logits = self._forward(tokens[:, None], self.next_pos[:, None])
        self.next_pos = self.next_pos + 1
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        self.past.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.next_pos = self.next_pos[rows]


def make_decoder(model, fast: bool | str = "auto"):
    """The fast Llama decoder when it supports ``model`` (``fast="auto"``), required (True) or
    never (False); otherwise the generic one."""
    if fast is False:
        return HFDecoder(model)
    reason = unsupported_reason(model)
    if reason is None:
        return FastLlamaDecoder(model)
    if fast is True:
        raise ConfigError(f"the fast decoder cannot run this model: {reason}")
    return HFDecoder(model)

"""What every decoder needs to call a ``transformers`` forward with a KV cache.

Both decoders (:mod:`chatforge.generate.decoders`, :mod:`chatforge.generate.fast`) left-pad
a batch of prompts for the prefill and read the cache a forward returns; the names
``forward`` takes and returns the cache under changed in transformers 5.2x. Kept here, below
both, so that the decoder picker imports the fast decoder and never the other way round.
"""

from __future__ import annotations

import inspect

import torch


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` ids and attention mask, padded on the left."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, L - len(p):] = 1
    return ids.to(device), mask.to(device)


def peft_base(model):
    """The transformers model inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def accepts(model, name: str) -> bool:
    """Whether the (PEFT-unwrapped) model's ``forward`` takes a parameter ``name``."""
    return name in inspect.signature(type(peft_base(model)).forward).parameters


def cache_kwarg(model) -> str:
    """The name ``forward`` takes the KV cache under: ``cache`` since transformers 5.2x,
    ``past_key_values`` before (the old name still works there but warns on every chat)."""
    return "cache" if accepts(model, "cache") else "past_key_values"


def cache_of(out):
    """The KV cache a forward returned, under either name."""
    cache = out.get("cache") if hasattr(out, "get") else getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values

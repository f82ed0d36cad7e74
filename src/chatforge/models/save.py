"""Writing a model in Hugging Face format, so a chatforge checkpoint goes anywhere."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def save_model(model, tokenizer, out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """HF format: full model (safetensors) or LoRA adapter, tokenizer with its chat
    template, and the generation config -- loadable by plain transformers/peft.

    ``state_dict``: weights gathered from a sharded engine (FSDP / DeepSpeed), written instead
    of the live module's (which then holds only this rank's shard)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"state_dict": state_dict} if state_dict is not None else {}
    with warnings.catch_warnings():  # peft looks for the base's config.json to detect a resized vocabulary;
        # our bases are often a name ("smollm2") or an adapter run, and we never resize
        warnings.filterwarnings("ignore", message="Could not find a config file")
        model.save_pretrained(out, safe_serialization=True, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None and not (out / "generation_config.json").exists():
        try:
            gen.save_pretrained(out)
        except Exception:  # an invalid generation config must not lose a checkpoint
            pass

"""Export a trained model as a standalone Hugging Face directory.

``export_model(RUN, DIR, merge_lora=True)``: a LoRA run's adapter is merged into its base
(``W + B A * alpha / r``), so the result loads with plain
``AutoModelForCausalLM.from_pretrained(DIR)`` -- no peft, no base model needed. A full
fine-tuning run is copied as it is. Either way the directory holds the weights
(safetensors), the tokenizer with its chat template, and the generation config, and is
written atomically (temp dir + rename): a killed export never leaves a half-written DIR.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from chatforge.errors import ConfigError

DTYPES = ("auto", "fp32", "bf16", "fp16")


def export_model(src: str | os.PathLike, out: str | os.PathLike, merge_lora: bool = True, dtype: str = "auto",
                 overwrite: bool = False) -> Path:
    """Write ``src`` (run folder, checkpoint, adapter or model dir) to ``out``; returns ``out``.

    ``merge_lora=False`` copies an adapter as an adapter. ``dtype`` other than ``auto``
    re-saves the weights in that dtype (``bf16`` halves the size).
    """
    from chatforge.models.load import resolve

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it")
    r = resolve(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if r.kind == "hf" and dtype == "auto" or r.kind == "adapter" and not merge_lora and dtype == "auto":
            copy_model_files(Path(r.path), tmp)
        else:
            save_loaded(str(src), tmp, merge=r.kind == "adapter", dtype=dtype)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def copy_model_files(src: Path, dst: Path) -> None:
    """Model, tokenizer and generation files of a model/checkpoint dir (not trainer state)."""
    for item in src.iterdir():
        if item.name in ("trainer_state",) or item.name.startswith("."):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst / item.name)


def save_loaded(src: str, dst: Path, merge: bool, dtype: str) -> None:
    """Load (merging an adapter into its base), cast, and save with tokenizer + generation config."""
    from chatforge.models.load import load_model, load_tokenizer, pick_dtype

    model = load_model(src, dtype="fp32", merge_adapter=merge)
    if dtype != "auto":
        model = model.to(pick_dtype(dtype))
    model.save_pretrained(dst, safe_serialization=True)
    load_tokenizer(src).save_pretrained(dst)
    gen = getattr(model, "generation_config", None)
    if gen is not None and not (dst / "generation_config.json").exists():
        gen.save_pretrained(dst)

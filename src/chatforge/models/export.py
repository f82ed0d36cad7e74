"""Export a trained model as a standalone Hugging Face directory, or as one GGUF file.

``export_model(RUN, DIR, merge_lora=True)``: a LoRA run's adapter is merged into its base
(``W + B A * alpha / r``), so the result loads with plain
``AutoModelForCausalLM.from_pretrained(DIR)`` -- no peft, no base model needed. A full
fine-tuning run is copied as it is. Either way the directory holds the weights
(safetensors), the tokenizer with its chat template, and the generation config, and is
written atomically (temp dir + rename): a killed export never leaves a half-written DIR.

``export_gguf(RUN, OUT.gguf, dtype="f16")``: the same model (LoRA merged) as a GGUF file for
llama.cpp / Ollama / LM Studio (:mod:`chatforge.models.gguf`), with an Ollama ``Modelfile``
beside it (:mod:`chatforge.models.ollama`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from typing import Any

from chatforge.errors import ConfigError

DTYPES = ("auto", "fp32", "bf16", "fp16")


def export_model(src: str | os.PathLike, out: str | os.PathLike, merge_lora: bool = True, dtype: str = "auto",
                 overwrite: bool = False, extra_files: Mapping[str, str] | None = None) -> Path:
    """Write ``src`` (run folder, checkpoint, adapter or model dir) to ``out``; returns ``out``.

    ``merge_lora=False`` copies an adapter as an adapter. ``dtype`` other than ``auto``
    re-saves the weights in that dtype (``bf16`` halves the size). ``extra_files``
    (name -> text, e.g. the model card ``README.md``) are written into the same atomic rename.
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
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
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


def export_gguf(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "f16", overwrite: bool = False,
                meta: Mapping[str, str] | None = None, sampling: Mapping[str, Any] | None = None):
    """Write ``src`` as one GGUF file ``out`` (a LoRA adapter merged first) and an Ollama
    ``Modelfile`` beside it; returns ``(GGUFSummary, Modelfile path)``.

    Everything is checked before a byte is written (architecture, tokenizer, template), so an
    unsupported model leaves no file behind. ``sampling``: the Modelfile's default parameters
    (a run's measured chat defaults)."""
    from chatforge.models.gguf import check_supported, make_readable, write_gguf
    from chatforge.models.load import load_model, load_tokenizer, resolve
    from chatforge.models.ollama import modelfile
    from chatforge.runs import atomic_write_text

    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"--gguf {out}: the file name must end in .gguf")
    mf = out.parent / "Modelfile"
    for p in (out, mf):
        if p.exists() and not overwrite:
            raise ConfigError(f"{p} exists; pass --overwrite to replace it")
    from transformers import AutoConfig

    r = resolve(src)
    if r.kind == "hf":  # fail on an unsupported architecture before loading any weights
        check_supported(AutoConfig.from_pretrained(r.path))
    model = load_model(str(src), dtype="fp32", merge_adapter=True).eval()
    tok = load_tokenizer(str(src))
    check_supported(model.config)
    summary = write_gguf(model, tok, out, dtype=dtype, meta=dict(meta or {}))
    try:
        text = modelfile(out.name, tok, summary.stop_tokens, summary.context_length, dict(sampling or {}))
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    atomic_write_text(mf, text)
    make_readable(mf)
    return summary, mf

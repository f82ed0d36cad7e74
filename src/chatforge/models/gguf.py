"""Write a Llama-family causal LM as one GGUF file: what llama.cpp, Ollama and LM Studio read.

``write_gguf(model, tokenizer, OUT, dtype="f16")`` writes, with the ``gguf`` package's
``GGUFWriter`` (the file format only; the mapping below is ours):

* **tensors** under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ...), each a numpy
  array ``[out, in]`` as PyTorch holds it (GGUF lists dimensions innermost first; the writer
  reverses them). 1-D tensors (norms, biases) stay f32, as llama.cpp's own converter keeps them;
  2-D ones take ``dtype`` (``q8_0``: blocks of 32 along a row, a tensor whose rows do not
  split into 32s falls back to f16). A tied LM head writes no ``output`` tensor.
* **Q/K rows re-ordered for llama.cpp's rotary embedding** (``llama`` only): Hugging Face's
  Llama rotates the two *halves* of each head (``rotate_half``), llama.cpp's ``llama``
  architecture rotates *adjacent pairs*; so each head's rows ``[x_0 .. x_d/2-1, x_d/2 .. x_d-1]``
  are interleaved to ``[x_0, x_d/2, x_1, x_d/2+1, ...]`` (transformers un-does exactly this on
  load). Qwen2 is its own GGUF architecture whose rotary embedding rotates halves: no re-order.
* **hyper-parameters** (context length, widths, heads, RMSNorm epsilon, RoPE base and
  dimension) and the **tokenizer**: byte-level BPE vocabulary in id order, merges, token
  types (added special tokens are ``CONTROL``: matched whole, never split), the
  pre-tokenizer's llama.cpp name, BOS/EOS/EOT/pad/unk ids, whether a BOS is added, and the
  Jinja **chat template**. EOT is the template's end-of-turn token (the one a fine-tuned run
  learned to stop with), so llama.cpp's chat mode stops where our engine does.
* **general metadata**: name, source, base model, licence, file type.

Supported: ``LlamaForCausalLM`` (SmolLM2, Llama 2/3 without RoPE scaling), ``MistralForCausalLM``
without a sliding window (written as ``llama``, as llama.cpp does) and ``Qwen2ForCausalLM``, with
a byte-level BPE tokenizer. Anything else is a :class:`UnsupportedModel` naming what is not
supported, before any file is written: a GGUF llama.cpp would read differently from the model
it came from is worse than none.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge.errors import ChatforgeError

DTYPES = ("f32", "f16", "bf16", "q8_0")
# HF model_type -> GGUF architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

# The pre-tokenizers llama.cpp knows by name (``tokenizer.ggml.pre``) that we can recognise
# in a tokenizer.json: the text is split by this regex, then mapped to byte-level symbols.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


class UnsupportedModel(ChatforgeError):
    """A model or tokenizer this GGUF writer cannot write faithfully."""


@dataclass
class GGUFSummary:
    """What was written: for the command's output and the tests."""

    path: Path
    arch: str
    dtype: str
    tensors: int
    bytes: int
    vocab: int
    context_length: int
    eos_id: int | None
    eot_id: int | None
    stop_tokens: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # tensors written f16 instead of q8_0


# ---------------------------------------------------------------- what we can write
def check_supported(config: Any) -> str:
    """The GGUF architecture for ``config``, or :class:`UnsupportedModel` saying why not."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHITECTURES:
        raise UnsupportedModel(f"GGUF export supports Llama, Mistral and Qwen2 models; this one is {mt!r}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"GGUF export: hidden_act={act!r} (llama.cpp's {ARCHITECTURES[mt]} uses silu)")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedModel(f"GGUF export: RoPE scaling {rope.get('rope_type')!r} is not supported yet "
                               "(transformers would not read it back)")
    if mt == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise UnsupportedModel("GGUF export: a Llama with attention or MLP biases is not supported")
    if mt == "mistral":
        window = getattr(config, "sliding_window", None)
        if window is not None and window < config.max_position_embeddings:
            raise UnsupportedModel(f"GGUF export: Mistral with sliding_window={window} is not supported")
    if mt == "qwen2" and getattr(config, "use_sliding_window", False):
        raise UnsupportedModel("GGUF export: Qwen2 with use_sliding_window=true is not supported")
    return ARCHITECTURES[mt]


def _rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE settings across transformers versions (``rope_parameters`` in 5.x, ``rope_theta`` before)."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict):
        return rp
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": getattr(config, "rope_theta", 10000.0),
            "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---------------------------------------------------------------- tensors
def interleave_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Per head, rows ``[first half, second half]`` -> ``[x0, x_d/2, x1, x_d/2+1, ...]`` (see module doc)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # [h, d/2, 2, ...]


def tensors(model: torch.nn.Module, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """``(gguf name, f32 array)`` for every weight llama.cpp reads, in file order."""
    cfg = model.config
    sd = model.state_dict()

    def get(name: str) -> np.ndarray:
        return sd[name].detach().to(torch.float32).cpu().numpy()

    yield "token_embd.weight", get("model.embed_tokens.weight")
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight")
        if arch == "llama":
            q, k = interleave_rotary(q, cfg.num_attention_heads), interleave_rotary(k, cfg.num_key_value_heads)
        yield b + "attn_norm.weight", get(p + "input_layernorm.weight")
        yield b + "attn_q.weight", q
        yield b + "attn_k.weight", k
        yield b + "attn_v.weight", get(p + "self_attn.v_proj.weight")
        if arch == "qwen2":
            for proj, short in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
                yield b + f"{short}.bias", get(p + f"self_attn.{proj}.bias")
        yield b + "attn_output.weight", get(p + "self_attn.o_proj.weight")
        yield b + "ffn_norm.weight", get(p + "post_attention_layernorm.weight")
        yield b + "ffn_gate.weight", get(p + "mlp.gate_proj.weight")
        yield b + "ffn_up.weight", get(p + "mlp.up_proj.weight")
        yield b + "ffn_down.weight", get(p + "mlp.down_proj.weight")
    yield "output_norm.weight", get("model.norm.weight")
    if not tied_head(model):
        yield "output.weight", get("lm_head.weight")


def tied_head(model: torch.nn.Module) -> bool:
    """True when the LM head *is* the embedding (then GGUF stores it once, as ``token_embd``)."""
    out = model.get_output_embeddings()
    return out is None or out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def encode(name: str, w: np.ndarray, dtype: str) -> tuple[np.ndarray, Any, bool]:
    """``(data, raw GGML type or None, fell back)`` for one tensor in ``dtype``."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if w.ndim == 1 or dtype == "f32":
        return w.astype(np.float32), None, False
    if dtype == "f16":
        return w.astype(np.float16), None, False
    if dtype == "bf16":
        return quants.quantize(w, Q.BF16), Q.BF16, False
    if w.shape[-1] % 32:  # q8_0 blocks are 32 values along a row
        return w.astype(np.float16), None, True
    return quants.quantize(w, Q.Q8_0), Q.Q8_0, False


# ---------------------------------------------------------------- tokenizer
@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]  # bos/eos/eot/pad/unk -> id (only those that exist)
    add_bos: bool
    add_eos: bool


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a tokenizer.json ``pre_tokenizer`` it splits the same way, or an error."""
    if pre is None:
        raise UnsupportedModel("GGUF export: the tokenizer has no pre-tokenizer (not a byte-level BPE)")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's regex inside ByteLevel (llama.cpp spells it with a hyphen)
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
            return "smollm"  # SmolLM's hub tokenizer: every digit alone, then GPT-2's regex
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            regex = steps[0].get("pattern", {}).get("Regex")
            if regex in SPLIT_PRE:
                return SPLIT_PRE[regex]
    raise UnsupportedModel(f"GGUF export: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent we know")


def read_vocab(tokenizer: Any, n_vocab: int) -> Vocab:
    """Everything llama.cpp needs to tokenise exactly as ``tokenizer`` does, for ``n_vocab`` rows."""
    from gguf import TokenType

    from chatforge.data.templates import end_of_turn_ids

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModel("GGUF export needs a fast (tokenizers) tokenizer")
    tj = json.loads(backend.to_str())
    model = tj["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedModel("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen2 style); "
                               f"this one is {model.get('type')}{' with byte fallback (SentencePiece)' if model.get('byte_fallback') else ''}")
    if (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise UnsupportedModel("GGUF export: the tokenizer's decoder is not ByteLevel")
    if tj.get("normalizer") not in (None, {"type": "NFC"}):  # Qwen2's NFC changes no text already in NFC
        raise UnsupportedModel(f"GGUF export: tokenizer normalizer {tj['normalizer']} is not supported")
    pre = pre_tokenizer_name(tj.get("pre_tokenizer"))

    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    if max([*by_id, *added], default=-1) >= n_vocab:
        raise UnsupportedModel(f"GGUF export: the tokenizer has ids beyond the model's {n_vocab} embedding rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:  # embedding rows no token uses (a vocabulary padded to a multiple of 64)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    special = {}
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if tid is not None:
            special[key] = int(tid)
    try:
        eot = end_of_turn_ids(tokenizer)
    except Exception:  # no usable chat template: eos is the only stop
        eot = []
    if eot:
        special["eot"] = int(eot[0])
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = special.get("bos"), special.get("eos")
    add_bos = len(full) > len(plain) and bos is not None and full[0] == bos
    add_eos = len(full) > len(plain) and eos is not None and full[-1] == eos
    return Vocab(tokens, [int(t) for t in types], merges, pre, special, add_bos, add_eos)


def chat_template_of(tokenizer: Any) -> str:
    """The Jinja template the model chats with (chatforge's default when the tokenizer has none)."""
    from chatforge.data.templates import get_template

    return get_template(tokenizer, "auto")


# ---------------------------------------------------------------- the file
def write_gguf(model: torch.nn.Module, tokenizer: Any, out: str | os.PathLike, dtype: str = "f16",
               meta: dict[str, str] | None = None) -> GGUFSummary:
    """Write ``model`` + ``tokenizer`` to ``out`` (atomically: temp file + rename).

    ``meta``: general metadata (``name``, ``source_url``, ``base_model``, ``license``,
    ``description``), written where given."""
    import gguf

    if dtype not in DTYPES:
        raise UnsupportedModel(f"GGUF dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cfg = model.config
    arch = check_supported(cfg)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    vocab = read_vocab(tokenizer, n_vocab)
    template = chat_template_of(tokenizer)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    fallbacks: list[str] = []
    count = 0
    try:
        w = gguf.GGUFWriter(tmp, arch)
        _write_metadata(w, cfg, arch, n_vocab, dtype, meta or {})
        _write_vocab(w, vocab, template)
        for name, t in tensors(model, arch):
            data, raw, fell_back = encode(name, t, dtype)
            w.add_tensor(name, data, raw_dtype=raw)
            count += 1
            if fell_back:
                fallbacks.append(name)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        make_readable(Path(tmp))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stops = [vocab.tokens[i] for i in dict.fromkeys(vocab.special.get(k) for k in ("eot", "eos")) if i is not None]
    return GGUFSummary(out, arch, dtype, count, out.stat().st_size, n_vocab, cfg.max_position_embeddings,
                       vocab.special.get("eos"), vocab.special.get("eot"), stops, fallbacks)


def make_readable(path: Path) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) the mode a plain ``open`` would (0666 - umask):
    a model file is meant to be shared (Ollama's server often runs as another user)."""
    from chatforge.runs import file_mode

    os.chmod(path, file_mode())


def _write_metadata(w: Any, cfg: Any, arch: str, n_vocab: int, dtype: str, meta: dict[str, str]) -> None:
    import gguf

    w.add_type("model")
    w.add_name(meta.get("name") or "chatforge model")
    for key, add in (("description", w.add_description), ("license", w.add_license),
                     ("source_url", w.add_source_url), ("organization", w.add_organization)):
        if meta.get(key):
            add(meta[key])
    if meta.get("base_model"):
        w.add_base_model_count(1)
        w.add_base_model_name(0, meta["base_model"])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w.add_file_type(int(file_type))
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(n_vocab)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(_rope_parameters(cfg).get("rope_theta", 10000.0)))
    hd = head_dim(cfg)
    w.add_rope_dimension_count(hd)
    if hd != cfg.hidden_size // cfg.num_attention_heads:  # llama.cpp assumes hidden / heads otherwise
        w.add_key_length(hd)
        w.add_value_length(hd)


def _write_vocab(w: Any, v: Vocab, template: str) -> None:
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "eot": w.add_eot_token_id,
              "pad": w.add_pad_token_id, "unk": w.add_unk_token_id}
    for key, tid in v.special.items():
        adders[key](tid)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    w.add_chat_template(template)

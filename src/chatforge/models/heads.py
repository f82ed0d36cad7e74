"""Scalar heads on a causal-LM backbone: the reward model (and, later, PPO's value head),
and :class:`RewardScorer`, the one way texts get a reward (training, RL, eval, commands).

A reward model is the decoder of a causal LM (``model.model`` of a ``LlamaForCausalLM``,
LoRA-adapted or not) plus ``ScalarHead``: one linear map from the hidden state to a number,
read at the **last real token** of each sequence. That index comes from the attention mask,
never from pad ids (pad == eos on SmolLM2, and the reward is read *at* the end-of-turn
token), so it is right for left and right padding alike. Position ids are derived from the
mask as well, so a sequence scores the same alone, padded on either side, or next to
longer ones in a batch.

On disk a reward model is a plain Hugging Face sequence classifier when the architecture
has one whose head is a bias-free ``score`` linear (Llama, Mistral, Qwen2, GPT-2, ...)::

    config.json          architectures=["LlamaForSequenceClassification"], num_labels=1,
                         pad_token_id = a token that never occurs in real text (see below)
    model.safetensors    "model.*" backbone weights (LoRA merged in) + "score.weight"
    reward_model.json    chatforge's note: head shape, base model, whether HF logic agrees
    tokenizer files
    adapter/             LoRA runs only: the adapter + score.safetensors, so PPO can put the
                         reward model on its own frozen backbone as a named adapter

so ``AutoModelForSequenceClassification.from_pretrained(dir)`` gives the same scores as
``load_reward_model(dir)``. HF picks "the rightmost token that is not pad_token_id"; since
our reward is read at the end-of-turn token, which *is* the pad token of SmolLM2, the
saved tokenizer and config use ``<|endoftext|>`` (or another unused special token) as pad.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from chatforge.errors import ChatforgeError
from chatforge.models.load import enable_checkpointing
from chatforge.models.lora import is_peft

RM_NOTE = "reward_model.json"
ADAPTER_DIR = "adapter"
HEAD_FILE = "score.safetensors"
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<unk>")


# ---------------------------------------------------------------- indices from the mask
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) index of the rightmost real token (left or right padding)."""
    t = attention_mask.shape[-1]
    pos = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return (pos * (attention_mask > 0)).argmax(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens only, so left padding does not shift positions
    (exactness matters: a model with absolute positions would otherwise score differently)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------- the head
class ScalarHead(nn.Module):
    """hidden states (B, T, H) -> one number per sequence (or per token, for a value head).

    Computed in fp32 even under bf16 autocast: it is H multiply-adds per sequence, and
    reward differences of a few hundredths decide pairwise accuracy.
    """

    def __init__(self, hidden_size: int, bias: bool = False, init_std: float | None = None):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, bias=bias)
        # 1/sqrt(H+1): initial rewards are O(1), so the sigmoid of a margin is not saturated
        nn.init.normal_(self.proj.weight, std=init_std if init_std is not None else 1 / math.sqrt(hidden_size + 1))
        if bias:
            nn.init.zeros_(self.proj.bias)

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.proj(h.float()).squeeze(-1)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) value read at each sequence's last real token."""
        idx = last_token_index(attention_mask)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        return self._project(last)

    def per_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T) values at every position (what a PPO critic needs)."""
        return self._project(hidden)


# ---------------------------------------------------------------- the reward model
def backbone_of(lm) -> nn.Module:
    """The decoder inside a causal LM (``lm.model`` for Llama), through a PEFT wrapper too:
    LoRA layers live inside it, so calling it directly applies the adapter."""
    base = lm.get_base_model() if is_peft(lm) else lm
    prefix = getattr(base, "base_model_prefix", "model")
    inner = getattr(base, prefix, None)
    if inner is None:
        raise ChatforgeError(f"{type(base).__name__} has no backbone attribute {prefix!r}")
    return inner


class RewardModel(nn.Module):
    """Backbone + :class:`ScalarHead`. ``scores(input_ids, attention_mask) -> (B,)``.

    ``peft`` (not a registered submodule) is the PEFT model the backbone lives in, kept for
    saving the adapter; with ``adapter_name`` set, that adapter is switched on around each
    forward and the previous one restored -- the reward model then shares the weights of
    someone else's (e.g. PPO's) backbone.
    """

    def __init__(self, backbone: nn.Module, head: ScalarHead, config: Any, peft: Any = None,
                 adapter_name: str | None = None, pad_token_id: int | None = None):
        super().__init__()
        self.model = backbone  # named like HF's base_model_prefix, so state-dict keys match
        self.score = head
        self.config = config
        object.__setattr__(self, "peft", peft)
        self.adapter_name = adapter_name
        self.pad_token_id = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        self.train_info: dict[str, Any] = {}  # template / max_len it was trained with (saved in reward_model.json)

    @classmethod
    def from_causal_lm(cls, lm, pad_token_id: int | None = None, bias: bool = False) -> "RewardModel":
        """A fresh head on ``lm``'s backbone (``lm`` may be PEFT-wrapped; its LM head is dropped)."""
        backbone = backbone_of(lm)
        cfg = copy.deepcopy(backbone.config)
        # the head's weights stay fp32 whatever the backbone dtype
        head = ScalarHead(cfg.hidden_size, bias=bias).to(next(backbone.parameters()).device)
        return cls(backbone, head, cfg, peft=lm if is_peft(lm) else None, pad_token_id=pad_token_id)

    # -- scoring --------------------------------------------------------------------
    @contextmanager
    def _adapter(self) -> Iterator[None]:
        """Activate our named adapter for one forward; restore the owner's state after."""
        if self.adapter_name is None or self.peft is None:
            yield
            return
        prev = self.peft.active_adapter
        grads = {p: p.requires_grad for p in self.peft.parameters()}
        self.peft.set_adapter(self.adapter_name, inference_mode=True)
        try:
            yield
        finally:
            self.peft.set_adapter(prev)
            for p, g in grads.items():
                p.requires_grad_(g)

    def forward(self, input_ids: torch.Tensor | Sequence[torch.Tensor],
                attention_mask: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """(B,) rewards. Lists of tensors are scored chunk by chunk and concatenated: the
        trainer sends length-sorted chunks (little padding) through ONE module call, so
        DDP / accelerate see a single forward."""
        if isinstance(input_ids, (list, tuple)):
            return torch.cat([self._forward(i, m) for i, m in zip(input_ids, attention_mask)])
        return self._forward(input_ids, attention_mask)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self._adapter():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return self.score(out.last_hidden_state, attention_mask)

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) fp32 rewards; goes through ``__call__`` so accelerate's autocast applies."""
        return self(input_ids, attention_mask)

    # -- training helpers ---------------------------------------------------------------
    def activation_checkpointing_enable(self, **_: Any) -> None:
        """Called by :func:`enable_checkpointing` on the RM: checkpoint the backbone (non-reentrant)."""
        enable_checkpointing(self.model)

    def freeze_bottom(self, n_layers: int) -> int:
        """Freeze the embeddings and the lowest ``n_layers`` decoder layers; returns how many
        layers stay trainable. Autograd then records nothing below the first trainable layer,
        so a step costs ~(L + 2 * trainable) layer-passes instead of 3L: the cheapest lever
        on a CPU, at some cost in accuracy."""
        layers = next((m for m in self.model.modules() if isinstance(m, nn.ModuleList)
                       and len(m) == getattr(self.config, "num_hidden_layers", -1)), None)
        if layers is None:
            raise ChatforgeError(f"{type(self.model).__name__}: cannot find its decoder layers to freeze")
        if not 0 <= n_layers <= len(layers):
            raise ChatforgeError(f"freeze_layers={n_layers}: the model has {len(layers)} layers")
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        for mod in ([emb] if emb is not None else []) + list(layers[:n_layers]):
            for p in mod.parameters():
                p.requires_grad_(False)
        return len(layers) - n_layers

    @property
    def is_lora(self) -> bool:
        return self.peft is not None and self.adapter_name is None

    # -- saving -----------------------------------------------------------------------
    def merged_backbone_state(self) -> dict[str, torch.Tensor]:
        """Backbone weights with any LoRA merged in, under plain HF names; the live model
        is not touched (a merged copy is made and thrown away)."""
        if self.peft is None:
            return {k: v.detach() for k, v in self.model.state_dict().items()}
        merged = copy.deepcopy(self.peft)
        if self.adapter_name is not None:
            merged.set_adapter(self.adapter_name)
        merged = merged.merge_and_unload(adapter_names=[self.adapter_name] if self.adapter_name else None)
        return {k: v.detach() for k, v in backbone_of(merged).state_dict().items()}

    def hf_class_name(self) -> str | None:
        """``XForSequenceClassification`` if it exists, reads a bias-free ``score`` linear on
        the same backbone attribute as ours -- i.e. HF would compute our scores."""
        if self.score.proj.bias is not None:
            return None
        try:
            from transformers import AutoConfig, AutoModelForSequenceClassification  # noqa: F401
            from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
            import transformers
        except ImportError:
            return None
        name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(self.config.model_type)
        cls = getattr(transformers, name, None) if name else None
        if cls is None:
            return None
        cfg = copy.deepcopy(self.config)
        cfg.num_labels = 1
        try:
            with torch.device("meta"):
                probe = cls(cfg)
        except Exception:
            return None
        head = getattr(probe, "score", None)
        ok = (isinstance(head, nn.Linear) and head.bias is None and head.out_features == 1
              and getattr(probe, "base_model_prefix", None) == "model" and hasattr(probe, "model"))
        return name if ok else None

    def save_pretrained(self, out: str | Path, safe_serialization: bool = True, **_: Any) -> None:
        """HF sequence-classifier layout (see module docstring); ``adapter/`` for LoRA."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        hf_name = self.hf_class_name()
        sd = {f"model.{k}": v.contiguous().cpu() for k, v in self.merged_backbone_state().items()}
        head_sd = {k: v.detach().contiguous().cpu() for k, v in self.score.proj.state_dict().items()}
        cfg = copy.deepcopy(self.config)
        cfg.num_labels = 1
        cfg.pad_token_id = self.pad_token_id
        cfg.use_cache = True
        if hf_name is not None:
            cfg.architectures = [hf_name]
            sd["score.weight"] = head_sd["weight"]
        else:  # our own layout: backbone as an AutoModel + the head beside it
            cfg.architectures = [type(self.model).__name__]
            sd = {k[len("model."):]: v for k, v in sd.items()}
            save_file(head_sd, str(out / HEAD_FILE), metadata={"format": "pt"})
        cfg.save_pretrained(out)
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        if self.is_lora:
            ad = out / ADAPTER_DIR
            self.peft.save_pretrained(ad)
            save_file(head_sd, str(ad / HEAD_FILE), metadata={"format": "pt"})
        note = {
            "format": "chatforge-reward-model/1",
            "hf_class": hf_name,
            "head_bias": self.score.proj.bias is not None,
            "pad_token_id": self.pad_token_id,
            "lora_adapter": ADAPTER_DIR if self.is_lora else None,
            "base_model": getattr(self.config, "_name_or_path", "") or None,
            "read_at": "last real token (attention mask); HF agrees while pad_token_id never occurs in text",
            "train": self.train_info,
        }
        (out / RM_NOTE).write_text(json.dumps(note, indent=2) + "\n")


# ---------------------------------------------------------------- tokenizer / loading
def reward_pad_token(tokenizer) -> int:
    """Give the RM tokenizer a pad token that never occurs in real text, so HF's
    "rightmost non-pad token" equals our "last real token" (the end-of-turn token)."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return tokenizer.pad_token_id
    vocab = tokenizer.get_vocab()
    for t in PAD_CANDIDATES:
        if t in vocab and vocab[t] != eos:
            tokenizer.pad_token = t
            return vocab[t]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id  # == eos: our scores stay right, HF's loader would read one token early


def _model_dir(path: str | Path) -> Path:
    from chatforge.models.load import ModelNotFound, run_model_dir

    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFound(f"reward model {path}: no such directory")
    inner = run_model_dir(p)
    p = inner if inner is not None else p
    if not (p / RM_NOTE).exists() and not (p / "config.json").exists():
        raise ModelNotFound(f"{path}: not a reward model directory or run folder")
    return p


def load_reward_model(path_or_run: str | Path, dtype: str | torch.dtype = "fp32", device: str | None = None,
                      onto: Any = None, adapter_name: str = "reward"):
    """``(RewardModel, tokenizer)`` from a run folder or a saved directory.

    Plain (``onto=None``): the merged HF sequence classifier, standalone, in eval mode.
    ``onto=peft_model``: a LoRA reward model's adapter is loaded into that PEFT model as
    ``adapter_name`` and the returned RewardModel scores through it -- one frozen backbone in
    memory for policy, reference and reward. Only meaningful when the reward model was
    trained with LoRA on the same base weights as ``onto``; that is checked by shape only.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from chatforge.models.load import pick_dtype

    d = _model_dir(path_or_run)
    td = pick_dtype(dtype, device)
    note = json.loads((d / RM_NOTE).read_text()) if (d / RM_NOTE).exists() else {}
    tok = AutoTokenizer.from_pretrained(str(d)) if (d / "tokenizer_config.json").exists() else None
    if onto is not None:
        if not note.get("lora_adapter"):
            raise ChatforgeError(f"{d}: not a LoRA reward model; load it standalone (onto=None)")
        ad = d / note["lora_adapter"]
        onto.load_adapter(str(ad), adapter_name=adapter_name)
        backbone = backbone_of(onto)
        cfg = AutoConfig.from_pretrained(str(d))
        head = _head_from(load_file(str(ad / HEAD_FILE)), cfg.hidden_size).requires_grad_(False)
        rm = RewardModel(backbone, head, cfg, peft=onto, adapter_name=adapter_name,
                         pad_token_id=note.get("pad_token_id"))
        rm.train_info = dict(note.get("train") or {})
        return rm.to(next(backbone.parameters()).device).eval(), tok
    cfg = AutoConfig.from_pretrained(str(d))
    archs = cfg.architectures or []
    if archs and archs[0].endswith("ForSequenceClassification"):
        hf = AutoModelForSequenceClassification.from_pretrained(str(d), dtype=td)
        if not isinstance(getattr(hf, "score", None), nn.Linear) or hf.score.out_features != 1:
            raise ChatforgeError(f"{d}: {archs[0]} has no single-output 'score' head; not a reward model we can read")
        head = _head_from({"weight": hf.score.weight.detach().float()}, cfg.hidden_size)
        backbone = getattr(hf, hf.base_model_prefix)
    else:
        backbone = AutoModel.from_pretrained(str(d), dtype=td)
        if not (d / HEAD_FILE).exists():
            raise ChatforgeError(f"{d}: a plain model, not a reward model (no score head)")
        head = _head_from(load_file(str(d / HEAD_FILE)), cfg.hidden_size)
    rm = RewardModel(backbone, head, cfg, pad_token_id=note.get("pad_token_id", cfg.pad_token_id))
    rm.train_info = dict(note.get("train") or {})
    if device is not None:
        rm = rm.to(device)
    return rm.eval(), tok


def _head_from(sd: dict[str, torch.Tensor], hidden: int) -> ScalarHead:
    head = ScalarHead(hidden, bias="bias" in sd)
    head.proj.load_state_dict({k: v.float() for k, v in sd.items()})
    return head


# ---------------------------------------------------------------- scoring texts
def encode_for_reward(tokenizer, prompt: list[dict[str, str]], response: str, max_len: int,
                      template: str = "auto") -> tuple[list[int], bool]:
    """Token ids of prompt (chat template) + response + end-of-turn, truncated **from the
    left of the prompt** to ``max_len``. Returns ``(ids, response_fits)``; when the
    response alone is longer than ``max_len`` its head is cut too and ``response_fits`` is
    False (training skips such examples; scoring keeps the tail, which ends in end-of-turn)."""
    from chatforge.data.tokenize import encode_prompt_response

    enc = encode_prompt_response(tokenizer, prompt, response, template=template)
    ids = list(enc.input_ids)
    labels = list(enc.labels)
    first = next((i for i, l in enumerate(labels) if l != -100), len(ids))
    # the reward is read at the last kept token: drop anything after the end-of-turn (a
    # template's trailing newline), so it is the end-of-turn token itself
    last = max((i for i, l in enumerate(labels) if l != -100), default=len(ids) - 1)
    ids = ids[:last + 1]
    fits = len(ids) - first <= max_len
    return ids[-max_len:], fits


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for a list of id lists."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        else:
            ids[i, t - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, t - len(s):] = 1
    return ids, mask


@torch.no_grad()
def score_ids(rm: RewardModel, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    """Rewards for pre-tokenised sequences; batched by length (less padding), input order kept."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    dev = next(rm.parameters()).device
    was_training = rm.training
    rm.eval()
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
            r = rm.scores(ids.to(dev), mask.to(dev)).float().cpu().tolist()
            for i, v in zip(idx, r):
                out[i] = v
    finally:
        rm.train(was_training)
    return out


class RewardScorer:
    """A reward model ready to score texts: ``scorer(prompts, responses) -> list[float]``.

    The one text scorer of the project: PPO / RLOO rewards and their judge (train/rewards.py,
    train/ppo.py), ``chatforge eval`` and ``chatforge score`` go through it. It tokenises with
    the chat template and ``max_len`` the model was trained with (``reward_model.json``;
    ``template`` / ``max_len`` override them) and scores length-sorted batches
    (:func:`score_ids`). ``precision``: ``auto`` = bf16 autocast where the hardware makes it
    fast, ``bf16``, or ``fp32`` = no autocast of its own (the caller's context applies).
    """

    def __init__(self, rm: RewardModel, tokenizer, batch_size: int = 8, max_len: int | None = None,
                 template: str | None = None, precision: str = "auto"):
        from chatforge.models.load import autocast_dtype

        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision={precision!r}: expected auto, bf16 or fp32")
        self.rm, self.tokenizer, self.batch_size = rm, tokenizer, batch_size
        info = getattr(rm, "train_info", {}) or {}
        self.max_len = max_len or int(info.get("max_len", 1024))
        self.template = template or info.get("template", "auto")
        dev = next(rm.parameters()).device
        dt = autocast_dtype(dev) if precision == "auto" else {"bf16": torch.bfloat16, "fp32": None}[precision]
        self.autocast = (lambda: torch.autocast(dev.type, dtype=dt)) if dt is not None else nullcontext

    def score(self, prompts: Sequence[list[dict[str, str]]], responses: Sequence[str],
              template: str | None = None) -> list[float]:
        """One reward per (prompt messages, response text), in input order."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        tpl = template or self.template
        seqs = [encode_for_reward(self.tokenizer, p, r, self.max_len, tpl)[0] for p, r in zip(prompts, responses)]
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with self.autocast():
            return score_ids(self.rm, seqs, pad, self.batch_size)

    __call__ = score


def load_scorer(path_or_run: str | Path, batch_size: int = 8, max_len: int | None = None, precision: str = "auto",
                dtype: str | torch.dtype = "fp32", device: str | None = None, onto: Any = None,
                tokenizer_from: str | Path | None = None) -> RewardScorer:
    """A :class:`RewardScorer` on a reward model (run folder or directory), see
    :func:`load_reward_model` for ``onto``. The tokenizer is the RM directory's own, else
    ``tokenizer_from``'s (default: ``path_or_run``)."""
    from chatforge.models.load import load_tokenizer

    rm, tok = load_reward_model(path_or_run, dtype=dtype, device=device, onto=onto)
    if tok is None:
        tok = load_tokenizer(tokenizer_from or path_or_run)
    if onto is None:  # on a shared backbone the weights are the policy's: not ours to freeze
        rm.requires_grad_(False)
    return RewardScorer(rm, tok, batch_size, max_len, precision=precision)


def score_texts(rm: RewardModel, tokenizer, prompts: Sequence[list[dict[str, str]]], responses: Sequence[str],
                batch_size: int = 8, max_len: int | None = None, template: str | None = None) -> list[float]:
    """:meth:`RewardScorer.score` without autocast of its own (kept for train/dpo.py's judge)."""
    return RewardScorer(rm, tokenizer, batch_size, max_len, template, precision="fp32").score(prompts, responses)

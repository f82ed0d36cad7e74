"""Teacher-forced log-probabilities: the one place that knows how to get from a causal LM
to per-token log p(token | prefix), for every trainer and evaluator.

Why a body/head split: the LM head (49k x 576 on SmolLM2) is the largest matmul of a small
model, and its logits the largest tensor. Running the head only on the hidden states that
predict a scored token (a response, a label) skips it on prompts and padding -- ~40% of
an SFT step's head work on instruction data, more for DPO/PPO with long prompts.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The transformer body and the LM head when logits are a plain linear map of the last
    hidden state (Llama, Qwen, Mistral, GPT-2, ...), through a PEFT wrapper too; None when
    they are not (soft-capped logits, a model without ``get_decoder``): use the full forward."""
    from chatforge.models.lora import is_peft

    base = model.get_base_model() if is_peft(model) else model
    if getattr(getattr(base, "config", None), "final_logit_softcapping", None):
        return None
    try:
        body, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if body is None or body is base or not isinstance(head, nn.Linear):
        return None
    return body, head


def hidden_and_head(model: nn.Module, **forward_kw) -> tuple[torch.Tensor, nn.Module | None]:
    """``(last hidden states, head)`` when the model splits, else ``(logits, None)``: the
    caller applies ``head`` to the positions it scores, or indexes the logits directly."""
    parts = backbone_and_head(model)
    forward_kw.setdefault("use_cache", False)
    if parts is None:
        return model(**forward_kw).logits, None
    body, head = parts
    return body(**forward_kw).last_hidden_state, head


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under ``softmax(logits)``: ``[..., V], [...] -> [...]`` (fp32).

    ``gather - logsumexp`` instead of a full ``log_softmax``: one fewer ``[..., V]`` tensor.
    """
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(p) = logsumexp(z) - sum_v p_v z_v, per position: ``[..., V] -> [...]``."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor,
                   temperature: float = 1.0, **forward_kw) -> torch.Tensor:
    """log p(targets[b, t] | input_ids[b, :t+1]) at the ``scored`` positions, flattened.

    ``targets`` / ``scored`` are ``[B, T]`` aligned with ``input_ids`` (``targets[:, t]`` is the
    token that follows position ``t``; ``scored`` a bool mask). Returns ``[scored.sum()]`` fp32.
    The head runs only on scored positions.
    """
    h, head = hidden_and_head(model, input_ids=input_ids, **forward_kw)
    logits = head(h[scored]) if head is not None else h[scored]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logprobs_from_logits(logits, targets[scored])

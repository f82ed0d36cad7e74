"""Model-side measurements of one checkpoint: held-out NLL, responses, log-probs.

Each function takes a loaded model and returns plain Python numbers, so the evaluation
(:mod:`chatforge.eval.evaluate`) can cache them and free the model. Perplexity and
log-probs run in the model's own dtype (fp32 by default: the difference between two
neighbouring checkpoints can be smaller than bf16's resolution); decoding may use a bf16
copy (:func:`decoding_copy`), which is what ``chatforge chat`` runs on such CPUs.
"""

from __future__ import annotations

from typing import Sequence

from chatforge.eval import metrics as M
from chatforge.generate.sampling import SamplingConfig


def _batches(idx: list[int], size: int) -> list[list[int]]:
    return [idx[i:i + size] for i in range(0, len(idx), size)]


def response_logprobs(model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                      batch_size: int = 4, max_len: int = 1024) -> list[float]:
    """Sum of log p(response tokens | prompt) per pair, teacher-forced (right padding,
    fp32 log-softmax). Prompts are cut from the left when the pair exceeds ``max_len``."""
    import torch

    from chatforge.models.logprobs import logprobs_from_logits

    seqs = []
    for p, r in zip(prompt_ids, response_ids):
        p, r = list(p), list(r)[:max_len - 1]
        p = p[max(0, len(p) + len(r) - max_len):]
        seqs.append((p, r))
    out = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    dev = next(model.parameters()).device
    with torch.no_grad():
        for b in _batches(order, batch_size):
            b = [i for i in b if seqs[i][1]]  # empty responses have log-prob 0
            if not b:
                continue
            t = max(len(seqs[i][0]) + len(seqs[i][1]) for i in b)
            ids = torch.zeros((len(b), t), dtype=torch.long)
            mask = torch.zeros((len(b), t), dtype=torch.long)
            resp = torch.zeros((len(b), t), dtype=torch.bool)
            for j, i in enumerate(b):
                p, r = seqs[i]
                ids[j, :len(p) + len(r)] = torch.tensor(p + r)
                mask[j, :len(p) + len(r)] = 1
                resp[j, len(p):len(p) + len(r)] = True
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits[:, :-1]
            lp = logprobs_from_logits(logits, ids[:, 1:].to(dev)).cpu()
            sums = (lp * resp[:, 1:]).sum(-1)
            for j, i in enumerate(b):
                out[i] = float(sums[j])
            del logits, lp
    return out


def heldout_nll(model, tokenizer, convs: list[list[dict]], template: str, batch_size: int = 4,
                max_len: int = 1024) -> list[tuple[float, int]]:
    """(sum NLL, labelled tokens) per held-out conversation, assistant tokens only."""
    import torch

    from chatforge.data.tokenize import encode_messages
    from chatforge.models.logprobs import logprobs_from_logits

    encs = []
    for c in convs:
        e = encode_messages(tokenizer, c, template=template)
        encs.append((list(e.input_ids)[:max_len], list(e.labels)[:max_len]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encs)
    order = sorted(range(len(encs)), key=lambda i: len(encs[i][0]))
    dev = next(model.parameters()).device
    with torch.no_grad():
        for b in _batches(order, batch_size):
            t = max(len(encs[i][0]) for i in b)
            ids = torch.zeros((len(b), t), dtype=torch.long)
            labels = torch.full((len(b), t), -100, dtype=torch.long)
            mask = torch.zeros((len(b), t), dtype=torch.long)
            for j, i in enumerate(b):
                x, y = encs[i]
                ids[j, :len(x)] = torch.tensor(x)
                labels[j, :len(y)] = torch.tensor(y)
                mask[j, :len(x)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits[:, :-1]
            tgt = labels[:, 1:]
            keep = tgt != -100
            lp = logprobs_from_logits(logits, tgt.clamp(min=0).to(dev)).cpu()
            nll = -(lp * keep).sum(-1)
            for j, i in enumerate(b):
                out[i] = (float(nll[j]), int(keep[j].sum()))
            del logits, lp
    return out


def decoding_copy(model, gen_dtype: str):
    """The model to decode with: itself, or a bf16 copy (see ``EvalSettings.gen_dtype``)."""
    import copy

    import torch

    from chatforge.models.load import fast_bf16_cpu, pick_dtype

    dev = next(model.parameters()).device
    if gen_dtype == "auto":
        want = torch.bfloat16 if dev.type == "cpu" and fast_bf16_cpu() else next(model.parameters()).dtype
    else:
        want = pick_dtype(gen_dtype, dev)
    if want == next(model.parameters()).dtype:
        return model
    return copy.deepcopy(model).to(want)


def generate_responses(model, tokenizer, prompts: list[list[dict]], template: str, cfg: SamplingConfig,
                       batch_size: int = 8, max_len: int = 1024) -> list[dict]:
    """Engine completions for every prompt: ``{"prompt_ids", "token_ids", "text", "finish_reason"}``.

    ``token_ids`` are the tokens the model chose, including its end-of-turn token when it
    emitted one (the engine's convention; it is part of the policy's action for the KL)."""
    from chatforge.data.tokenize import encode_prompt
    from chatforge.generate.engine import Engine

    engine = Engine(model, tokenizer)
    room = max(1, max_len - cfg.max_new_tokens)
    pids = [list(encode_prompt(tokenizer, p, template=template))[-room:] for p in prompts]
    out: list[dict] = []
    for bi, b in enumerate(_batches(list(range(len(pids))), batch_size)):
        bcfg = cfg.replace(seed=cfg.seed + bi) if cfg.seed is not None else cfg
        for i, c in zip(b, engine.generate([pids[i] for i in b], bcfg)):
            body = c.token_ids[:-1] if c.finish_reason == "eos" else c.token_ids
            out.append({"prompt_ids": pids[i], "token_ids": list(c.token_ids), "text": c.text,
                        "finish_reason": c.finish_reason, "token_loop": token_loop(tokenizer, body)})
    return out


def token_loop(tokenizer, ids: Sequence[int]) -> bool:
    """A loop in token ids that words do not show ("ssssssss" is one word, many tokens).
    A unit that decodes to punctuation or spaces only is a separator, not a loop."""
    lp = M.find_loop(list(ids))
    return lp is not None and any(ch.isalnum() for ch in tokenizer.decode(list(lp.unit)))

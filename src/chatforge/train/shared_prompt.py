"""One copy of the prompt for both answers of a pair: DPO's CPU speed lever (``share_prompt``).

A *row* of a batch is a prompt followed by one or more response *segments*; every segment
sees the prompt and itself, never another segment, and its positions continue from the end
of the prompt. So ``[prompt | chosen | rejected]`` in ONE row gives the same log-probs and
gradients as the two rows ``[prompt | chosen]`` and ``[prompt | rejected]`` (tested in
``tests/test_dpo.py``), with the prompt computed once instead of twice.

Measured on an AMD EPYC (``lscpu``: "AMD EPYC", AVX-512-BF16, no AMX; 2 cores shared with
other work, ``OMP_NUM_THREADS=1``): one DPO forward + backward of SmolLM2-135M under bf16
autocast on 4 hh-rlhf harmless-base pairs per step (``max_len`` 512; prompts 136 tokens,
responses 50 on average), timed on 2 steps after a warm-up one: 4.47 s CPU per step with the
shared prompt vs 7.60 s with two rows per pair (**1.70x**; 1,128 vs 2,140 tokens per step
with padding). An earlier run (3 steps, best of two passes) read 5.6 vs 10.3 s wall (1.84x).
The longer the prompts relative to the answers, the larger the gain.

It needs an attention that takes a custom 4-D mask (sdpa, eager: :func:`share_prompt_ok`);
otherwise each row holds one sequence with a plain padding mask, in the same batch format,
so the scorer does not care which it gets.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from chatforge.data.pairs import IGNORE, PairExample

Segment = tuple[list[int], list[int], int]  # (ids, labels, index of the sequence it scores)
Row = tuple[list[int], list[Segment]]         # (prompt ids, its segments)


def pair_rows(batch: Sequence[PairExample], share_prompt: bool = True) -> list[Row]:
    """Rows for a batch of pairs; sequence i is chosen of pair i, B + i rejected of pair i."""
    n = len(batch)
    if share_prompt:
        return [(ex.prompt_ids, [(ex.chosen_ids, ex.chosen_labels, i), (ex.rejected_ids, ex.rejected_labels, n + i)])
                for i, ex in enumerate(batch)]
    return [(ex.prompt_ids, [(ex.chosen_ids, ex.chosen_labels, i)]) for i, ex in enumerate(batch)] + \
        [(ex.prompt_ids, [(ex.rejected_ids, ex.rejected_labels, n + i)]) for i, ex in enumerate(batch)]


def build_batch(rows: list[Row], pad_id: int, mask: str = "4d") -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``position_ids``, the attention mask, and for every
    scored token where its prediction is read (``src_row``, ``src_pos``), what it must
    predict (``target``) and whose sum it joins (``seq``, of ``n_seq`` sequences).

    ``mask="4d"``: a boolean ``[N, 1, T, T]`` mask (True = may attend) encoding the segment
    structure; ``"2d"``: a plain padding mask, valid only for one segment per row.
    """
    T = max(len(p) + sum(len(s[0]) for s in segs) for p, segs in rows)
    N = len(rows)
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    pos = torch.zeros((N, T), dtype=torch.long)
    seg = torch.full((N, T), -1, dtype=torch.long)  # -1 pad, 0 prompt, k >= 1 segment k
    src_row, src_pos, target, seq = [], [], [], []
    n_seq = 0
    for i, (prompt, segs) in enumerate(rows):
        if not prompt:
            raise ValueError("every row needs at least one prompt token (it predicts the first response token)")
        P = len(prompt)
        ids[i, :P] = torch.tensor(prompt)
        pos[i, :P] = torch.arange(P)
        seg[i, :P] = 0
        start = P
        for k, (s_ids, s_labels, s_index) in enumerate(segs, 1):
            L = len(s_ids)
            ids[i, start:start + L] = torch.tensor(s_ids, dtype=torch.long)
            pos[i, start:start + L] = torch.arange(P, P + L)
            seg[i, start:start + L] = k
            for j, lab in enumerate(s_labels):
                if lab != IGNORE:
                    src_row.append(i)
                    src_pos.append(P - 1 if j == 0 else start + j - 1)  # a segment's first token: the prompt's end
                    target.append(lab)
                    seq.append(s_index)
            n_seq = max(n_seq, s_index + 1)
            start += L
    out = {"input_ids": ids, "position_ids": pos, "src_row": torch.tensor(src_row, dtype=torch.long),
           "src_pos": torch.tensor(src_pos, dtype=torch.long), "target": torch.tensor(target, dtype=torch.long),
           "seq": torch.tensor(seq, dtype=torch.long), "n_seq": torch.tensor(n_seq)}
    real = seg >= 0
    if mask == "2d":
        if any(len(segs) > 1 for _, segs in rows):
            raise ValueError("a 2d mask cannot separate several segments in one row")
        out["attention_mask"] = real.long()
        return out
    q, k = seg[:, :, None], seg[:, None, :]                       # [N, T, 1], [N, 1, T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal & real[:, :, None] & real[:, None, :] & ((k == 0) | (k == q))  # [N, T, T]
    allowed |= torch.eye(T, dtype=torch.bool)  # padding attends to itself: no all-masked (NaN) rows
    out["attention_mask"] = allowed[:, None]
    return out


def pair_batch(batch: Sequence[PairExample], pad_id: int, share_prompt: bool = True) -> dict[str, torch.Tensor]:
    return build_batch(pair_rows(batch, share_prompt), pad_id, "4d" if share_prompt else "2d")


def _attn_implementation(model: nn.Module) -> str | None:
    from chatforge.models.lora import is_peft

    base = model.get_base_model() if is_peft(model) else model
    return getattr(base.config, "_attn_implementation", None)


def share_prompt_ok(model: nn.Module) -> bool:
    """The segment mask needs an attention that takes a custom 4-D mask (sdpa, eager)."""
    return _attn_implementation(model) in ("sdpa", "eager")


def model_mask(model: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The mask as ``model`` takes it: eager attention *adds* a 4-D mask to the scores, so a
    boolean one becomes 0 / -inf there; sdpa and 2-D masks pass as they are."""
    if mask.dim() != 4 or _attn_implementation(model) != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
        ~mask, torch.finfo(torch.float32).min)

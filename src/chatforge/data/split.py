"""Reading a stage's records and holding some out: one rule for every trainer and the pipeline.

The held-out split is by *record* (a ranking's K answers, a conversation's turns stay on one
side) and seeded: ``split_indices(n, fraction, seed)`` is a fixed permutation of the records
as read, its first ``round(fraction * n)`` held out. The same files, fraction and seed give
the same held-out records in SFT, RM, DPO, PPO and the pipeline's data stage; trainers write
the indices to ``split.json`` so evaluation scores exactly those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from chatforge.errors import DataError

Messages = list[dict[str, str]]


def read_records(paths: Sequence[str], fmt: str | None = None, log: Callable[[str], None] = print,
                 ) -> tuple[list[Any], int]:
    """All records of ``paths`` in file order, and the number of unreadable items.

    A missing file is a ``DataError``; unreadable items are skipped, counted and the first
    three of each file printed with file and line (never dropped silently)."""
    from chatforge.data.readers import read_file

    records: list[Any] = []
    errors = 0
    for path in paths:
        if not Path(path).exists():
            raise DataError(f"{path}: no such file")
        res = read_file(path, format=fmt, on_error="skip")
        records += list(res.records)
        errors += len(res.errors)
        for e in res.errors[:3]:
            log(f"  unreadable: {e.where()}: {e.reason}")
        if res.errors:
            log(f"{path}: {len(res.records)} records, {len(res.errors)} unreadable items")
    return records, errors


def split_indices(n: int, fraction: float, seed: int, max_eval: int = 0, min_eval: int = 0
                  ) -> tuple[list[int], list[int]]:
    """(train, held-out) record indices, both in file order.

    The first ``round(fraction * n)`` entries of a ``seed``-ed permutation are held out,
    at least ``min_eval`` and at most ``max_eval`` of them (0 = no cap), and never all:
    training keeps one record."""
    import numpy as np

    n_eval = int(round(fraction * n))
    if fraction > 0:
        n_eval = max(n_eval, min_eval)
    if max_eval > 0:
        n_eval = min(n_eval, max_eval)
    n_eval = max(0, min(n_eval, n - 1))
    perm = np.random.default_rng(seed).permutation(n)
    held = sorted(perm[:n_eval].tolist())
    hs = set(held)
    return [i for i in range(n) if i not in hs], held


def split_records(records: Sequence[Any], fraction: float, seed: int, max_eval: int = 0, min_eval: int = 0
                  ) -> tuple[list[Any], list[Any], list[int]]:
    """(train records, held-out records, held-out indices) by :func:`split_indices`."""
    train_idx, held_idx = split_indices(len(records), fraction, seed, max_eval, min_eval)
    return [records[i] for i in train_idx], [records[i] for i in held_idx], held_idx


def split_note(data: Sequence[str], eval_data: Sequence[str], fraction: float, seed: int, n: int,
               held: Sequence[int]) -> dict[str, Any]:
    """What ``split.json`` holds: enough to rebuild the split from the files."""
    return {"data": list(data), "eval_data": list(eval_data), "seed": seed, "eval_fraction": fraction,
            "records": n, "heldout": list(held),
            "note": "indices into the records of `data` as read, in file order"}


def prompt_key(p: Messages) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in p)


def unique_prompts(prompts) -> list[Messages]:
    """Prompts in first-seen order, duplicates dropped (same roles and texts)."""
    seen, out = set(), []
    for p in prompts:
        key = prompt_key(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def prompts_of(records: Sequence[Any], user_last: bool = True) -> list[Messages]:
    """The prompt messages of records of any kind (Prompt, or the prompt part of a
    Conversation / Preference / Ranking), de-duplicated; records without one are skipped.
    ``user_last``: keep only prompts that end with a user turn (what a policy answers)."""
    from chatforge.data.records import prompt_of

    out = []
    for rec in records:
        try:
            p = prompt_of(rec)
        except ValueError:
            continue
        if p and (not user_last or p[-1]["role"] == "user"):
            out.append(p)
    return unique_prompts(out)


def read_prompts(paths: Sequence[str], fmt: str | None = None, log: Callable[[str], None] = print,
                 user_last: bool = True) -> tuple[list[Messages], int]:
    """:func:`prompts_of` every record in ``paths``, and the unreadable count."""
    records, errors = read_records(paths, fmt, log)
    return prompts_of(records, user_last), errors

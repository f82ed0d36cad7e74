"""Pure evaluation metrics: degeneration, length, win rate, uncertainty, regressions.

No torch here: everything works on strings, token lists and floats, so each definition is
tested on hand-made examples (tests/test_eval.py). The text statistics (words, repeated
n-grams, distinct-n, loops, no end-of-turn, refusals, :func:`degeneration`, :func:`compare_scores`)
live one floor down in :mod:`chatforge.textstats`, where the trainers use them too; they
are re-exported here under the same names, with their definitions in that module's doc.

Definitions
-----------
* **win rate** with ties counted as half a win.
* **regressions**: a later checkpoint is *worse than an earlier one beyond noise* when the
  paired per-item difference to the best earlier checkpoint exceeds ``z`` standard errors
  (and ``min_delta``). Paired, because all checkpoints see the same prompts: the per-prompt
  noise cancels and real oscillations show with few prompts.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from chatforge.textstats import (REFUSAL_OPENINGS, Loop, Tokens, compare_scores, degeneration,  # noqa: F401
                                 distinct_n, falls_into_loop, find_loop, is_refusal, mean, ngrams, no_eos_rate,
                                 refusal_rate, repeated_ngram_rate, words)


# ---------------------------------------------------------------- lengths, win rate
def length_stats(lengths: Sequence[float]) -> dict[str, float]:
    """mean / median / p90 / min / max of response lengths (NaN when empty)."""
    if not lengths:
        return {k: float("nan") for k in ("mean", "median", "p90", "min", "max")}
    s = sorted(lengths)
    return {"mean": mean(s), "median": statistics.median(s), "p90": quantile(s, 0.9), "min": s[0], "max": s[-1]}


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted sequence."""
    if not sorted_xs:
        return float("nan")
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


_OUTCOME = {"win": 1.0, "a": 1.0, "tie": 0.5, "loss": 0.0, "b": 0.0}


def outcome_value(o: float | str) -> float:
    """1 = win, 0.5 = tie, 0 = loss; accepts the words win/tie/loss too."""
    if isinstance(o, str):
        if o.lower() not in _OUTCOME:
            raise ValueError(f"unknown outcome {o!r} (win, tie, loss)")
        return _OUTCOME[o.lower()]
    if o not in (0, 0.5, 1):
        raise ValueError(f"outcome must be 0, 0.5 or 1, got {o!r}")
    return float(o)


def win_rate(outcomes: Iterable[float | str]) -> float:
    """Mean outcome with ties as half a win (NaN when there are none)."""
    return mean([outcome_value(o) for o in outcomes])


# ---------------------------------------------------------------- uncertainty
def std(xs: Sequence[float]) -> float:
    """Population standard deviation (0 for fewer than 2 values)."""
    return statistics.pstdev(xs) if len(xs) >= 2 else 0.0


def stderr(xs: Sequence[float]) -> float:
    """Standard error of the mean (0 for fewer than 2 values)."""
    if len(xs) < 2:
        return 0.0
    return statistics.stdev(xs) / math.sqrt(len(xs))


def bootstrap_ci(xs: Sequence[float], stat: Callable[[Sequence[float]], float] = mean, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat`` (deterministic for a seed)."""
    if not xs:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    k = len(xs)
    vals = sorted(stat([xs[rng.randrange(k)] for _ in range(k)]) for _ in range(n_boot))
    return quantile(vals, alpha / 2), quantile(vals, 1 - alpha / 2)


def direction(lo: float, hi: float) -> str | None:
    """"better" or "worse" only when the 95 % interval [lo, hi] of a difference excludes zero, else
    None: a report must not call noise an improvement."""
    return "better" if lo > 0 else "worse" if hi < 0 else None


# ---------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class Regression:
    index: int          # the later, worse checkpoint
    earlier: int        # the best earlier checkpoint it is compared with
    value: float
    earlier_value: float
    delta: float        # how much worse (always > 0, in the metric's units)
    se: float           # standard error of the paired difference


def regressions(items: Sequence[Sequence[float]], higher_is_better: bool, z: float = 2.0,
                min_delta: float = 0.0) -> list[Regression]:
    """Checkpoints (in training order) worse than the best earlier one beyond noise.

    ``items[c]`` holds checkpoint ``c``'s per-item values (per prompt or per conversation,
    the same items in the same order for every checkpoint). Checkpoint ``j`` regresses when
    the mean paired difference to the best earlier checkpoint ``i`` is worse by more than
    ``max(min_delta, z * se)``, ``se`` being the paired difference's standard error.
    """
    sign = 1.0 if higher_is_better else -1.0
    means = [mean(list(v)) for v in items]
    out = []
    for j in range(1, len(items)):
        earlier = [i for i in range(j) if not math.isnan(means[i])]
        if not earlier or math.isnan(means[j]):
            continue
        i = max(earlier, key=lambda k: sign * means[k])
        if len(items[i]) != len(items[j]):
            raise ValueError(f"checkpoints {i} and {j} were evaluated on different items")
        diffs = [sign * (a - b) for a, b in zip(items[i], items[j])]  # > 0: the earlier is better
        d, se = mean(diffs), stderr(diffs)
        if d > 0 and d > max(min_delta, z * se):
            out.append(Regression(j, i, means[j], means[i], d, se))
    return out


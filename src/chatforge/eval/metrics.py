"""Pure evaluation metrics: degeneration, length, win rate, uncertainty, regressions.

No torch here: everything works on strings, token lists and floats, so each definition is
tested on hand-made examples (tests/test_eval.py).

Text is split into "words" by :func:`words`: runs of letters/digits, single punctuation
marks, and single CJK/kana/hangul characters (Chinese has no spaces; one character is the
natural unit). Every sequence metric also accepts a ready list of tokens (e.g. token ids).

Definitions
-----------
* **repeated n-gram rate** of one response: among its n-grams (positions), the share that
  repeat an n-gram seen *earlier in the same response*. 0 for varied text, -> 1 for a
  response stuck repeating itself. ``(count - unique) / count``.
* **distinct-n** of a set of responses (Li et al., 2016): unique n-grams / all n-grams over
  the set. Low = the model says the same thing to every prompt.
* **loop**: a response *falls into a loop* when its tail is periodic: the last ``L`` tokens
  satisfy ``t[i] == t[i - p]`` for a period ``1 <= p <= max_period``, with at least
  ``min_repeats`` full periods (``L >= min_repeats * p``) and ``L >= min_span`` tokens. The
  tail may end in the middle of a period (a response cut by the token budget usually does).
  "very very good" (span 3) or a sentence said twice (2 periods) are not loops; "blue blue
  blue blue blue blue blue blue" and a sentence repeated three times at the end are. In
  text, a unit of punctuation only ("----------", a table rule) is not a loop. On real
  assistant answers (Alpaca en/zh, GSM8K, ChatDoctor, code; 34,593 responses) 1 is flagged (a
  run of "&quot;" entities).
* **no end-of-turn**: share of responses whose ``finish_reason`` is ``"length"``: the model
  ran out of budget instead of ending its turn.
* **win rate** with ties counted as half a win.
* **regressions**: a later checkpoint is *worse than an earlier one beyond noise* when the
  paired per-item difference to the best earlier checkpoint exceeds ``z`` standard errors
  (and ``min_delta``). Paired, because all checkpoints see the same prompts: the per-prompt
  noise cancels and real oscillations show with few prompts.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")

Tokens = Sequence[Hashable]


def words(text: str) -> list[str]:
    """Lower-cased words, punctuation marks and single CJK characters."""
    return _WORD_RE.findall(text.lower())


def _tokens(x: str | Tokens) -> Sequence[Hashable]:
    return words(x) if isinstance(x, str) else x


def ngrams(tokens: Tokens, n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# ---------------------------------------------------------------- degeneration
def repeated_ngram_rate(response: str | Tokens, n: int = 3) -> float:
    """Share of the response's n-grams that repeat an earlier n-gram of the same response."""
    grams = ngrams(_tokens(response), n)
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def distinct_n(responses: Iterable[str | Tokens], n: int) -> float:
    """Unique n-grams / total n-grams over a set of responses (0 when there are none)."""
    total, seen = 0, set()
    for r in responses:
        grams = ngrams(_tokens(r), n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


@dataclass(frozen=True)
class Loop:
    period: int   # tokens per repeated unit
    span: int     # tokens at the end covered by the periodic tail
    repeats: float  # span / period (may end mid-period)
    unit: tuple   # the repeated unit (its last occurrence aligned to the period)


def find_loop(response: str | Tokens, min_repeats: int = 3, min_span: int = 8, max_period: int = 64) -> Loop | None:
    """The periodic tail of a response, if it is a loop (see the module docstring).

    Prefers the smallest period among qualifying ones ("a a a a" is period 1, not 2).
    O(len * max_period).
    """
    t = _tokens(response)
    n = len(t)
    for p in range(1, min(max_period, n // min_repeats) + 1):
        i = n - 1
        while i - p >= 0 and t[i] == t[i - p]:
            i -= 1
        span = (n - 1 - i) + p  # matching positions plus the first period they copy
        if span >= min_repeats * p and span >= min_span:
            unit = tuple(t[n - span:n - span + p])
            if isinstance(response, str) and not any(_has_word(u) for u in unit):
                continue  # "----------" or "......": a separator, not a model stuck in a loop
            return Loop(p, span, span / p, unit)
    return None


def _has_word(tok: Hashable) -> bool:
    return isinstance(tok, str) and any(ch.isalnum() for ch in tok)


def falls_into_loop(response: str | Tokens, **kw) -> bool:
    return find_loop(response, **kw) is not None


def no_eos_rate(finish_reasons: Iterable[str]) -> float:
    """Share of responses cut by the token budget (``finish_reason == "length"``)."""
    fr = list(finish_reasons)
    return sum(1 for f in fr if f == "length") / len(fr) if fr else 0.0


def degeneration(responses: Sequence[str], finish_reasons: Sequence[str] | None = None, n: int = 3) -> dict[str, float]:
    """All degeneration figures of one checkpoint's responses, as one dict."""
    out = {
        "rep_ngram": mean([repeated_ngram_rate(r, n) for r in responses]),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "loop_rate": mean([1.0 if falls_into_loop(r) else 0.0 for r in responses]),
    }
    if finish_reasons is not None:
        out["no_eos_rate"] = no_eos_rate(finish_reasons)
    return out


# ---------------------------------------------------------------- lengths, win rate
def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


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


def compare_scores(a: float, b: float, tie_eps: float = 0.0) -> float:
    """Outcome of ``a`` vs ``b`` by score: 1, 0.5 (|a-b| <= tie_eps) or 0."""
    if abs(a - b) <= tie_eps:
        return 0.5
    return 1.0 if a > b else 0.0


# ---------------------------------------------------------------- uncertainty
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


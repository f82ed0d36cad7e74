"""Statistics of generated text: repetition, loops, missing end-of-turn, refusals, score comparison.

Pure Python on strings, token lists and floats (no torch, no chatforge imports), at the
bottom floor so that trainers (PPO's held-out comparison) and the evaluation
(:mod:`chatforge.eval.metrics`, which re-exports every name here) share one definition.

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
* **refusal**: a response *is a refusal* when it opens (after leading spaces, quotes and
  asterisks; case-insensitive; curly apostrophes read as straight ones) with one of
  :data:`REFUSAL_OPENINGS` ("I'm sorry", "I cannot", "I can't", "As an AI", ...), unless
  the opening is one of :data:`NOT_REFUSALS` ("I'm sorry to hear ...": sympathy, then
  usually help). An opening, not a search: "Here is how. I can't promise it works" is no
  refusal, and "I can't wait to help!" is a (rare) false positive. **refusal rate**: the
  share of responses that are refusals. On hh-rlhf the PPO policy that "won" 0.94 by its
  RM answered "I'm sorry." to nearly everything: this is the figure that shows it.
* **score comparison**: ``a`` vs ``b`` is a win (1), a tie (0.5) or a loss (0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

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


# ---------------------------------------------------------------- refusals
REFUSAL_OPENINGS = (
    "i'm sorry", "i am sorry", "sorry", "i apologize", "i apologise",
    "i cannot", "i can't", "i can not", "i won't", "i will not",
    "i'm not able to", "i am not able to", "i'm unable to", "i am unable to",
    "i'm not comfortable", "i am not comfortable", "i don't feel comfortable",
    "as an ai", "as a language model", "as an assistant",
)
"""Lower-cased openings that make a response a refusal (see the module docstring)."""

NOT_REFUSALS = ("i'm sorry to hear", "i am sorry to hear", "sorry to hear", "i'm sorry for your loss",
                "i am sorry for your loss", "sorry for your loss")
"""Openings that start like a refusal but are sympathy (checked before :data:`REFUSAL_OPENINGS`)."""

_LEAD = " \t\r\n\"'*_`>-\u201c\u2018"


def is_refusal(response: str) -> bool:
    """True when ``response`` opens with a refusal (:data:`REFUSAL_OPENINGS`), word-bounded:
    "Sorry, no." is one, "Sorrywhatever" is not."""
    t = response.lstrip(_LEAD).lower().replace("\u2019", "'")
    if t.startswith(NOT_REFUSALS):
        return False
    for o in REFUSAL_OPENINGS:
        if t.startswith(o) and (len(t) == len(o) or not t[len(o)].isalnum()):
            return True
    return False


def refusal_rate(responses: Iterable[str]) -> float:
    """Share of responses that are refusals (0 when there are none)."""
    rs = list(responses)
    return sum(1 for r in rs if is_refusal(r)) / len(rs) if rs else 0.0


# ---------------------------------------------------------------- helpers
def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def compare_scores(a: float, b: float, tie_eps: float = 0.0) -> float:
    """Outcome of ``a`` vs ``b`` by score: 1, 0.5 (|a-b| <= tie_eps) or 0."""
    if abs(a - b) <= tie_eps:
        return 0.5
    return 1.0 if a > b else 0.0

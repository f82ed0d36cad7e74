"""Arithmetic problems with checkable answers: the verifiable-reward yardstick for RL.

A seeded generator writes canonical :class:`~chatforge.data.records.Prompt` records, one
user message each, with the answer in ``meta``::

    {"kind": "prompt",
     "prompt": [{"role": "user", "content": "What is 47 + 38? Answer with the number only."}],
     "meta": {"source": "arith", "id": "add2-heldout-0", "tier": "add2", "split": "heldout",
              "expression": "47 + 38", "answer": 85}}

The prompt is exactly ``PROMPT.format(expression=...)``: ``"What is {expression}? Answer
with the number only."``, no system message (the model's chat template adds its own
default, as in chat). Operators are written ``+``, ``-``, ``*`` with single spaces, and
parentheses only where they change the order.

Tiers (every answer is a non-negative integer: subtraction never goes below zero):

* ``add2``: two-digit addition or subtraction, ``a + b`` or ``a - b`` with a, b in 10..99
  (half each; for ``-`` the larger number comes first).
* ``mul``: one-digit times one-or-two-digit multiplication, ``a * b`` with one factor in
  2..9 and the other in 2..99 (either order).
* ``two_step``: two operations on small numbers, one of ``a + b * c``, ``a * b - c``,
  ``(a + b) * c``, ``(a - b) * c`` with a, b in 2..20 and c in 2..9 (results >= 0).

Train and held-out sets are disjoint by construction: the held-out *pool* of each tier is
the first ``HELDOUT_POOL[tier]`` distinct problems of a fixed seed that no option changes;
``--split heldout -n N`` is its first N (so a larger held-out set contains the smaller), and
training problems are drawn from a stream seeded by ``seed`` with every problem of the
whole pool rejected. "The same problem" ignores the order of a commutative pair (``38 + 47``
is ``47 + 38``: :func:`problem_key`). Held-out problems are distinct; training problems are
drawn independently and may repeat. Distinct problems per tier: ``add2`` 8,190 (1,000 held
out), ``mul`` 756 (500 held out: training sees the other 256), ``two_step`` about 6,900
(1,000 held out).

:func:`solve` reads the answer back from a prompt's text with a small parser of this
grammar (integers, ``+ - *``, ``×``/``x`` for ``*``, parentheses; never ``eval``), and
:func:`final_number` / :func:`is_correct` are the scoring rule shared by the reward
(``fn:chatforge.train.reward_fns:arith_exact``) and ``chatforge eval --task arith``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Iterator

from chatforge.data.records import Prompt, msg
from chatforge.errors import ConfigError

PROMPT = "What is {expression}? Answer with the number only."
TIERS = ("add2", "mul", "two_step")
SPLITS = ("train", "heldout")
HELDOUT_POOL = {"add2": 1000, "mul": 500, "two_step": 1000}  # reserved per tier, never in training
SOURCE = "arith"


@dataclass(frozen=True)
class Problem:
    tier: str
    expression: str      # as shown in the prompt, e.g. "(9 - 4) * 3"
    answer: int
    key: tuple           # order-free identity (problem_key)

    def record(self, split: str, index: int) -> Prompt:
        meta = {"source": SOURCE, "id": f"{self.tier}-{split}-{index}", "tier": self.tier, "split": split,
                "expression": self.expression, "answer": self.answer}
        return Prompt([msg("user", PROMPT.format(expression=self.expression))], meta)


def problem_key(form: str, operands: tuple[int, ...]) -> tuple:
    """Identity of a problem up to swapping the operands of a commutative pair."""
    a = operands
    if form in ("a+b", "a*b"):
        return (form, *sorted(a))
    if form == "a+b*c":
        return (form, a[0], *sorted(a[1:]))
    if form in ("(a+b)*c", "a*b-c"):
        return (form, *sorted(a[:2]), a[2])
    return (form, *a)


def _make(tier: str, form: str, a: tuple[int, ...]) -> Problem:
    text = {"a+b": "{} + {}", "a-b": "{} - {}", "a*b": "{} * {}", "a+b*c": "{} + {} * {}", "a*b-c": "{} * {} - {}",
            "(a+b)*c": "({} + {}) * {}", "(a-b)*c": "({} - {}) * {}"}[form].format(*a)
    return Problem(tier, text, solve_expression(text), problem_key(form, a))


def draw(tier: str, rng: random.Random) -> Problem:
    """One problem of ``tier`` from ``rng`` (the distributions of the module docstring)."""
    r = rng.randint
    if tier == "add2":
        a, b = r(10, 99), r(10, 99)
        if rng.random() < 0.5:
            return _make(tier, "a+b", (a, b))
        return _make(tier, "a-b", (max(a, b), min(a, b)))
    if tier == "mul":
        small, other = r(2, 9), r(2, 99)
        return _make(tier, "a*b", (small, other) if rng.random() < 0.5 else (other, small))
    if tier == "two_step":
        form = rng.choice(("a+b*c", "a*b-c", "(a+b)*c", "(a-b)*c"))
        a, b, c = r(2, 20), r(2, 20), r(2, 9)
        if form == "(a-b)*c":
            a, b = max(a, b), min(a, b)
        if form == "a*b-c" and a * b < c:  # never below zero (2 * 2 - 9): c within the product
            c = r(2, a * b)
        return _make(tier, form, (a, b, c))
    raise ConfigError(f"arith tier {tier!r}: expected one of {', '.join(TIERS)}")


def _check(tier: str, n: int) -> None:
    if tier not in TIERS:
        raise ConfigError(f"arith tier {tier!r}: expected one of {', '.join(TIERS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"arith: the number of problems must be an integer >= 0, got {n!r}")


_POOLS: dict[str, list[Problem]] = {}  # tier -> its held-out pool, made once per process


def heldout_pool(tier: str) -> list[Problem]:
    """The tier's reserved held-out problems: distinct, from a fixed seed, in a fixed order."""
    _check(tier, 0)
    if tier not in _POOLS:
        rng = random.Random(f"chatforge-arith-heldout/{tier}")  # str seeds hash with sha512: stable everywhere
        seen: set[tuple] = set()
        pool: list[Problem] = []
        while len(pool) < HELDOUT_POOL[tier]:
            p = draw(tier, rng)
            if p.key not in seen:
                seen.add(p.key)
                pool.append(p)
        _POOLS[tier] = pool
    return list(_POOLS[tier])


def heldout_problems(tier: str, n: int = 500) -> list[Problem]:
    """The first ``n`` problems of the held-out pool (the same for every seed)."""
    _check(tier, n)
    if n > HELDOUT_POOL[tier]:
        raise ConfigError(f"arith {tier}: at most {HELDOUT_POOL[tier]} held-out problems, asked for {n}")
    return heldout_pool(tier)[:n]


def train_problems(tier: str, n: int, seed: int = 0) -> list[Problem]:
    """``n`` training problems from a stream seeded by ``seed``, none in the held-out pool."""
    _check(tier, n)
    reserved = {p.key for p in heldout_pool(tier)}
    rng = random.Random(f"chatforge-arith-train/{tier}/{seed}")
    out: list[Problem] = []
    while len(out) < n:
        p = draw(tier, rng)
        if p.key not in reserved:
            out.append(p)
    return out


def records(tier: str, split: str, n: int, seed: int = 0) -> list[Prompt]:
    """Canonical Prompt records of one tier and split (``seed`` only moves the train split)."""
    if split not in SPLITS:
        raise ConfigError(f"arith split {split!r}: expected train or heldout")
    probs = heldout_problems(tier, n) if split == "heldout" else train_problems(tier, n, seed)
    return [p.record(split, i) for i, p in enumerate(probs)]


# ---------------------------------------------------------------- reading answers back
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*×x()]))")


def solve_expression(text: str) -> int:
    """Value of an integer expression with ``+ - *`` (``×``/``x`` = ``*``) and parentheses.

    Recursive descent, usual precedence, left to right; a leading minus is allowed on a
    number or a parenthesis. Raises ``ValueError`` on anything else (never ``eval``)."""
    toks: list[str] = []
    pos, s = 0, text.strip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            raise ValueError(f"not an arithmetic expression: {text!r}")
        toks.append(m.group(1) or ("*" if m.group(2) in "×x" else m.group(2)))
        pos = m.end()
        while pos < len(s) and s[pos].isspace():
            pos += 1
    i = 0

    def peek() -> str | None:
        return toks[i] if i < len(toks) else None

    def take() -> str:
        nonlocal i
        if i >= len(toks):
            raise ValueError(f"incomplete expression: {text!r}")
        i += 1
        return toks[i - 1]

    def atom() -> int:
        t = take()
        if t == "-":
            return -atom()
        if t == "(":
            v = expr()
            if take() != ")":
                raise ValueError(f"unbalanced parentheses: {text!r}")
            return v
        if not t.isdigit():
            raise ValueError(f"unexpected {t!r} in {text!r}")
        return int(t)

    def term() -> int:
        v = atom()
        while peek() == "*":
            take()
            v *= atom()
        return v

    def expr() -> int:
        v = term()
        while peek() in ("+", "-"):
            v = v + term() if take() == "+" else v - term()
        return v

    if not toks:
        raise ValueError("empty expression")
    value = expr()
    if i != len(toks):
        raise ValueError(f"trailing {toks[i]!r} in {text!r}")
    return value


_QUESTION = re.compile(r"What is ([-+*×x()\d\s]+)\?")


def solve(prompt_text: str) -> int | None:
    """The answer of a prompt written with :data:`PROMPT` (``What is EXPR?``), else None."""
    m = _QUESTION.search(prompt_text)
    if not m:
        return None
    try:
        return solve_expression(m.group(1))
    except ValueError:
        return None


# The scoring rule: the FINAL number of the response (GSM8K's convention: "12 + 89 = 101"
# and "The answer is 101." both read 101; a response cut before its answer reads whatever
# number it stopped at). A number is an integer with an optional minus
# sign (ASCII or U+2212) that directly precedes it and does not follow a letter or digit
# ("5-7" reads 5; "is -7" reads -7), thousands separated by commas ("1,234" = 1234; "42, 43"
# and "42,43" read 42), an optional decimal part compared by value ("42.0" = 42, "42.5" is
# not 42), and sentence punctuation after it ignored ("42." = 42).
_NUMBER = re.compile(r"(?:(?<![\w.])[-−])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_ONLY_NUMBER = re.compile(r"\s*(?:[-−])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\.?\s*")


def final_number(text: str) -> float | None:
    """The last number of a response under the scoring rule above, else None."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return _value(last.group(0)) if last else None


def _value(number: str) -> float:
    return float(number.replace(",", "").replace("−", "-"))


def only_number(text: str) -> bool:
    """True when the response is a number and nothing else (a final period allowed)."""
    return _ONLY_NUMBER.fullmatch(text) is not None


def is_correct(response: str, answer: Any) -> bool:
    """The final number of ``response`` equals ``answer`` (an int, float or numeric string)."""
    got = final_number(response)
    if got is None or answer is None:
        return False
    try:
        return abs(got - float(answer)) < 1e-9
    except (TypeError, ValueError):
        return False


def answer_anywhere(response: str, answer: Any) -> bool:
    """Any number of ``response`` (same reading as :func:`final_number`) equals ``answer``:
    a diagnostic, not the rule."""
    try:
        want = float(answer)
    except (TypeError, ValueError):
        return False
    return any(abs(_value(m.group(0)) - want) < 1e-9 for m in _NUMBER.finditer(response))


def iter_answers(records_: list[Prompt]) -> Iterator[int | None]:
    """Each record's answer: ``meta["answer"]``, else solved from its last user message."""
    for r in records_:
        a = r.meta.get("answer") if isinstance(r.meta, dict) else None
        yield a if a is not None else solve(r.prompt[-1]["content"] if r.prompt else "")

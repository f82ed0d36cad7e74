"""Rule rewards for ``chatforge ppo --reward fn:chatforge.train.reward_fns:NAME``.

Every function has the signature ``f(prompts, responses, **options) -> list[float]``:
``prompts`` are the prompt messages of each episode (a list of ``{"role", "content"}``
dicts; a plain string is accepted too), ``responses`` the sampled assistant texts. Options
come from the reward spec: ``fn:chatforge.train.reward_fns:keyword?word=blue``.

Rule rewards are the quickest way to see RL work (the Mini-ChatGPT experiment): they are
exact, cheap, and a reward that rises while KL stays bounded shows the whole loop is right
before an imperfect learned reward model enters the picture.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from chatforge.data import arith
from chatforge.errors import ConfigError

_WORD = re.compile(r"[A-Za-z0-9']+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ARITH = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/x×])\s*(-?\d+(?:\.\d+)?)")


def last_user(prompt: Any) -> str:
    """The text of the last user message of a prompt (or the prompt itself if a string)."""
    if isinstance(prompt, str):
        return prompt
    for m in reversed(prompt or []):
        if m.get("role") == "user":
            return m.get("content", "")
    return ""


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def keyword(prompts: Sequence[Any], responses: Sequence[str], word: str = "blue", per_word: bool = False
            ) -> list[float]:
    """1.0 when the response contains ``word`` (case-insensitive, whole word), else 0.0.

    ``per_word=True`` gives the share of the response's words that are ``word`` instead:
    a denser signal that keeps rewarding *more* of the word (a sampling policy finds it
    sooner, and the KL penalty is what stops "blue blue blue")."""
    w = word.lower()
    out = []
    for r in responses:
        ws = words(r)
        if per_word:
            out.append(ws.count(w) / len(ws) if ws else 0.0)
        else:
            out.append(1.0 if w in ws else 0.0)
    return out


def length_target(prompts: Sequence[Any], responses: Sequence[str], target: int = 30, unit: str = "words"
                  ) -> list[float]:
    """0 at exactly ``target`` words (or ``chars``), falling linearly to -1 at 0 and 2x target."""
    if unit not in ("words", "chars"):
        raise ValueError("length_target: unit must be words or chars")
    out = []
    for r in responses:
        n = len(words(r)) if unit == "words" else len(r.strip())
        out.append(-min(abs(n - target) / max(target, 1), 1.0))
    return out


def non_repetition(prompts: Sequence[Any], responses: Sequence[str], n: int = 3) -> list[float]:
    """Share of distinct word n-grams in the response (1.0 = no n-gram repeats). Responses
    shorter than n words score 1.0: shortness is another reward's business."""
    out = []
    for r in responses:
        ws = words(r)
        grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
        out.append(len(set(grams)) / len(grams) if grams else 1.0)
    return out


def _solve(prompt_text: str) -> float | None:
    m = _ARITH.search(prompt_text)
    if not m:
        return None
    a, op, b = float(m.group(1)), m.group(2), float(m.group(3))
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op in ("*", "x", "×"):
        return a * b
    return a / b if b != 0 else None


def exact_answer(prompts: Sequence[Any], responses: Sequence[str], answers: Sequence[Any] | None = None
                 ) -> list[float]:
    """1.0 when the first number in the response equals the answer, else 0.0.

    The answer is ``answers[i]`` when given (Python API), otherwise the value of the first
    ``a op b`` arithmetic expression in the prompt ("What is 17 + 25?" -> 42). Prompts
    without an answer score 0.0."""
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        want = answers[i] if answers is not None else _solve(last_user(p))
        got = _NUMBER.search(r.replace(",", ""))
        if want is None or got is None:
            out.append(0.0)
            continue
        try:
            ok = abs(float(got.group(0)) - float(want)) < 1e-6
        except ValueError:
            ok = str(want).strip() == got.group(0)
        out.append(1.0 if ok else 0.0)
    return out


def arith_exact(prompts: Sequence[Any], responses: Sequence[str], answers: Sequence[Any] | None = None,
                format_bonus: float = 0.0) -> list[float]:
    """The arithmetic yardstick's reward (:mod:`chatforge.data.arith`): 1.0 when the FINAL
    number of the response equals the answer, else 0.0.

    Format rule (:func:`chatforge.data.arith.final_number`): an integer with an optional
    leading minus, commas between thousands ("1,234"), a trailing period ignored ("42." is
    42), a decimal part compared by value ("42.0" is 42). "The answer is 42." and "12 + 30 =
    42" both read 42; "42 apples, 43 pears" reads 43; "To solve this problem, we need to add
    12 and 30" reads 30 (a response cut by the token budget before its answer is wrong).

    The answer, in order: ``answers[i]`` (Python API); ``meta["answer"]`` when the prompt is
    a :class:`~chatforge.data.records.Prompt` record or a dict with ``meta``; else solved from
    the last user message written with the generator's template ("What is 47 + 38? ...") by
    a small parser (never ``eval``). PPO/RLOO pass message lists, so it is the last case
    there; a prompt with no answer scores 0.0.

    ``format_bonus`` (default 0: off) is added when the response is a number and nothing
    else, right or wrong: a small push towards the format the prompt asks for."""
    if isinstance(format_bonus, bool) or not isinstance(format_bonus, (int, float)) or format_bonus != format_bonus:
        raise ConfigError(f"arith_exact: format_bonus must be a number, got {format_bonus!r}")
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        want = answers[i] if answers is not None else _arith_answer(p)
        score = 1.0 if arith.is_correct(r, want) else 0.0
        if format_bonus and arith.only_number(r):
            score += float(format_bonus)
        out.append(score)
    return out


def _arith_answer(prompt: Any) -> Any:
    meta = getattr(prompt, "meta", None)
    if meta is None and isinstance(prompt, dict):
        meta = prompt.get("meta")
    if isinstance(meta, dict) and meta.get("answer") is not None:
        return meta["answer"]
    messages = getattr(prompt, "prompt", None)
    if messages is None and isinstance(prompt, dict):
        messages = prompt.get("prompt", [])
    return arith.solve(last_user(messages if messages is not None else prompt))

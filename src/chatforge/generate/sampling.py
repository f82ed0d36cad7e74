"""Sampling settings and the per-step logits pipeline of the engine.

The pipeline, in order (the order ``transformers.generate`` uses, so settings mean the
same thing in both): repetition penalty -> no-repeat-n-gram ban -> temperature -> top-k
-> top-p -> min-p -> sample (or argmax when ``temperature == 0``). Everything runs on the
logits' device on the whole batch at once; only the n-gram ban needs the token history
on the host, and it only runs when ``no_repeat_ngram_size > 0``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from chatforge.errors import ConfigError


@dataclass
class SamplingConfig:
    """How to decode. ``temperature == 0`` means greedy; ``num_beams > 1`` means beam search.

    ``logprobs=True`` returns, per generated token, its log-probability under the *unmodified*
    model distribution: ``log_softmax(logits)`` at temperature 1, before repetition penalty,
    n-gram ban, top-k/top-p/min-p. These are the log-probs PPO needs (the policy's own
    probability of the action), not the probabilities the sampler actually used.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; > 1 discourages tokens already in prompt or reply
    no_repeat_ngram_size: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)  # stop strings, matched on the decoded text
    seed: int | None = None  # None = a fresh random seed per call
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search only: score = logprob_sum / length ** length_penalty
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> SamplingConfig:
        """Raise :class:`ConfigError` naming the first bad setting."""
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", _num(self.temperature) and self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", _num(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("min_p", _num(self.min_p) and 0 <= self.min_p < 1, "a number in [0, 1)"),
            ("repetition_penalty", _num(self.repetition_penalty) and self.repetition_penalty > 0, "a number > 0"),
            ("no_repeat_ngram_size", isinstance(self.no_repeat_ngram_size, int) and self.no_repeat_ngram_size >= 0,
             "an integer >= 0"),
            ("stop", isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
             "a list of non-empty strings"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
            ("num_beams", isinstance(self.num_beams, int) and self.num_beams >= 1, "an integer >= 1"),
            ("length_penalty", _num(self.length_penalty), "a number"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ConfigError(f"{name}: must be {what}, got {getattr(self, name)!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> SamplingConfig:
        return dataclasses.replace(self, **changes)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as in ``transformers``): divide positive, multiply negative logits
    of every token already seen (``seen`` is a ``[B, V]`` bool mask)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def banned_ngram_tokens(seq: list[int], n: int, table: dict[tuple[int, ...], set[int]]) -> set[int]:
    """Tokens that would repeat an n-gram of ``seq``; ``table`` maps (n-1)-prefixes to the
    tokens that followed them and is kept up to date by :func:`record_ngram`."""
    if n <= 0 or len(seq) < n - 1:
        return set()
    return table.get(tuple(seq[len(seq) - n + 1:]), set())


def record_ngram(seq: list[int], n: int, table: dict[tuple[int, ...], set[int]]) -> None:
    """Add the n-gram ending at the last token of ``seq`` to ``table``."""
    if n > 0 and len(seq) >= n:
        table.setdefault(tuple(seq[len(seq) - n:len(seq) - 1]), set()).add(seq[-1])


def build_ngram_table(seq: list[int], n: int) -> dict[tuple[int, ...], set[int]]:
    table: dict[tuple[int, ...], set[int]] = {}
    for end in range(n, len(seq) + 1):
        record_ngram(seq[:end], n, table)
    return table


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every token outside the top-k / nucleus (top-p) / min-p sets.
    The most likely token always survives."""
    neg_inf = torch.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg_inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens strictly more likely already cover top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg_inf)
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, neg_inf)
    return logits


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """``[B, V]`` processed logits -> ``[B]`` next tokens (argmax when greedy)."""
    if cfg.greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

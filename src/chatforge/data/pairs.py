"""Preference pairs tokenised for DPO: the prompt once, then the chosen and the rejected
response, each scored up to and including its end-of-turn token.

What comes in are ``Preference`` records and ``Ranking`` records (expanded to their
(better, worse) pairs: K(K-1)/2 without ties, none between tied responses); what is skipped and why follows the reward model's rule (:mod:`chatforge.data.prefs`),
so an RM and a DPO run on one file see the same comparisons. The prompt is kept once per pair
so that a trainer can score both answers after one copy of it
(:mod:`chatforge.train.shared_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from chatforge.data.prefs import SkipReport, ranked_responses, where_of
from chatforge.data.records import Preference
from chatforge.data.tokenize import IGNORE_INDEX as IGNORE, encode_prompt_response  # IGNORE: not scored


@dataclass
class PairExample:
    """One tokenised pair: the (identically truncated) prompt once, and the two responses.

    ``*_ids`` are the response tokens (text + end-of-turn); ``*_labels`` the same ids, or
    IGNORE for a token that is not scored.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    prompt: list[dict[str, str]] = field(default_factory=list)
    where: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class DataReport(SkipReport):
    """What happened to the input; usable items are preference pairs."""

    pairs: int = 0
    unit: ClassVar[str] = "pairs"


def expand_pairs(records: list, report: DataReport, unacceptable: str = "keep") -> list[Preference]:
    """Preferences as they are, rankings as their (better, worse) pairs (best first; tied
    responses make none); records the reward model would refuse (other kinds, empty or
    contradictory responses, all tied, "all unacceptable" with ``unacceptable="drop"``) are
    reported and dropped by the same rule (:func:`chatforge.data.prefs.ranked_responses`)."""
    pairs: list[Preference] = []
    for rec in records:
        report.records += 1
        ranked = ranked_responses(rec, report, unacceptable)
        if ranked is None:
            continue
        if isinstance(rec, Preference):
            pairs.append(rec)
            continue
        texts = ranked.texts
        pairs += [Preference(rec.prompt, {"role": "assistant", "content": texts[i]},
                             {"role": "assistant", "content": texts[j]}, dict(rec.meta, pair=[i, j]))
                  for i, j in ranked.ordered_pairs()]
    return pairs


def _split_at_labels(ids: list[int], labels: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, response labels): the prompt is everything before the first
    label, the response ends at the last label (a template's trailing newline after the
    end-of-turn is dropped: nothing after the last scored token can change its probability)."""
    scored = [i for i, l in enumerate(labels) if l != IGNORE]
    if not scored:
        return ids, [], []
    first, last = scored[0], scored[-1] + 1
    return ids[:first], ids[first:last], labels[first:last]


def encode_pair(tokenizer, pair: Preference, max_len: int, template: str = "auto") -> PairExample | str:
    """Tokenise both sides; returns the example, or the reason it must be skipped.

    Over-long pairs: each response keeps at least ``max_len // 2`` tokens (its head), the
    prompt keeps its *end* (the last turn matters most), identically for both sides; each
    of prompt + chosen and prompt + rejected is then at most ``max_len`` tokens.
    """
    ec = encode_prompt_response(tokenizer, pair.prompt, pair.chosen["content"], template)
    er = encode_prompt_response(tokenizer, pair.prompt, pair.rejected["content"], template)
    p, c, cl = _split_at_labels(list(ec.input_ids), list(ec.labels))
    p2, r, rl = _split_at_labels(list(er.input_ids), list(er.labels))
    if not c or not r:
        return "empty response after tokenisation"
    if p != p2:  # templates are prefix-stable; if one is not, share the common prefix only
        n = next((i for i, (a, b) in enumerate(zip(p, p2)) if a != b), min(len(p), len(p2)))
        if n == 0:
            return "chosen and rejected do not share a prompt after tokenisation"
        c, cl = p[n:] + c, [IGNORE] * (len(p) - n) + cl
        r, rl = p2[n:] + r, [IGNORE] * (len(p2) - n) + rl
        p = p[:n]
    budget = max(max_len - len(p), max_len // 2)
    c, cl, r, rl = c[:budget], cl[:budget], r[:budget], rl[:budget]
    keep = max(1, max_len - max(len(c), len(r)))
    p = p[len(p) - keep:] if keep < len(p) else p
    if all(l == IGNORE for l in cl) or all(l == IGNORE for l in rl):
        return "empty response after tokenisation"
    if c == r:
        return f"identical after truncation to max_len={max_len}"
    return PairExample(p, c, cl, r, rl, pair.prompt, where_of(pair.meta))

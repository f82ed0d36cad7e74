"""AI-feedback rankings (RLAIF): a judge model orders K candidate responses to a prompt.

Judges prefer a position (usually the first answer shown), so no single verdict is trusted:

* ``pairwise`` (default): every pair of candidates is asked in both orders, (A=i, B=j)
  and (A=j, B=i) -- K(K-1) requests per prompt.
* ``listwise``: the K candidates are shown together and the judge writes an order
  (``2 > 1 > 3``), ``repeats`` times (default K). With K repeats the shown orders are the K
  rotations of a shuffled order (seeded by the item): every candidate sits at every position
  once, so a judge that only follows positions gives every candidate the same total, and no
  pair gets the same verdict every time (it would need position p above p + d for every p,
  round a cycle). ``repeats=2`` shows the shuffle and its reverse: every pair in both
  relative orders, which cancels a preference for the first (or last) answers, but not one
  for the middle of an odd list (the middle answer stays where it was).

Either way each pair (i, j) collects votes: +1 (i better), -1 (j better), 0 (a stated tie)
or None (no readable verdict). A pair is *agreed* when every vote is readable and equal.
The others -- the orders disagree (position bias), or a verdict could not be read -- are,
by ``disagreement``:

* ``tie`` (default): counted as a tie between the two;
* ``drop``: the whole prompt is dropped (written to the rejected file with the pairs).

Aggregation (Copeland): a candidate's score is its wins + half its ties over the other
K-1; the stored order is by score, best first (equal scores keep the candidates' own
order), and equal scores share a tier -- ``Ranking.tiers``, so ``pairs()`` makes no pair
between them. A prompt whose candidates all tie states no preference and is dropped
("no preference"), as is one with fewer than 2 distinct candidates.

The records are the :class:`~chatforge.data.records.Ranking` the human ranking app writes,
with ``meta`` keys shared with it: ``annotator`` ``"ai:<judge model>"``, ``source`` ``"ai"``,
``time`` (ISO 8601 UTC), ``item`` (stable item id), ``candidates`` (per stored response: its
provenance, ``index`` = position among the item's candidates); ours under ``judge``: the
prompt version, mode, policy, ``agreement`` (share of agreed pairs), the pair outcomes and
the raw verdicts.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from chatforge.data.records import Message, Ranking

PROMPT_VERSION = "rank-v1"
MODES = ("pairwise", "listwise")
POLICIES = ("tie", "drop")

SYSTEM = ("You are a strict, impartial judge of AI assistant answers. You compare answers to the same user "
          "request for helpfulness, correctness, harmlessness and fluency. Ignore answer length unless it hurts "
          "quality; a repetitive or unfinished answer is worse. The order in which answers are shown means "
          "nothing: judge the content only.")

PAIR_TEMPLATE = """[User request]
{prompt}

[Answer A]
{a}

[Answer B]
{b}

Which answer is better? Reply with one word on the first line: A, B or tie."""

LIST_TEMPLATE = """[User request]
{prompt}

{answers}

Rank the {k} answers from best to worst. Reply on the first line with their numbers only, best first, separated by '>' (for example: {example})."""


def item_id(prompt: list[Message]) -> str:
    """A stable id for a prompt: the hash of its messages (the same prompt is the same item)."""
    canon = json.dumps([[m["role"], m.get("content")] for m in prompt], ensure_ascii=False)
    return "p-" + hashlib.sha256(canon.encode()).hexdigest()[:16]


def render_prompt(prompt: list[Message]) -> str:
    """A single user turn as its text; a longer conversation as ``Role: text`` lines."""
    if len(prompt) == 1:
        return prompt[0].get("content") or ""
    return "\n\n".join(f"{m['role'].capitalize()}: {m.get('content') or ''}" for m in prompt)


@dataclass
class View:
    """One request: the candidates in the order shown (``shown[p]`` = candidate index at position p)."""

    shown: list[int]

    def body(self, model: str, prompt: list[Message], texts: list[str], max_tokens: int) -> dict:
        p = render_prompt(prompt)
        if len(self.shown) == 2:
            user = PAIR_TEMPLATE.format(prompt=p, a=texts[self.shown[0]], b=texts[self.shown[1]])
        else:
            answers = "\n\n".join(f"[Answer {n}]\n{texts[c]}" for n, c in enumerate(self.shown, 1))
            example = " > ".join(str(x) for x in _example_order(len(self.shown)))
            user = LIST_TEMPLATE.format(prompt=p, answers=answers, k=len(self.shown), example=example)
        return {"model": model, "temperature": 0, "max_tokens": max_tokens,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}


def _example_order(k: int) -> list[int]:
    """An example order that is not the shown order (an example ``1 > 2 > 3`` invites copying it)."""
    return [2, 1, *range(3, k + 1)] if k >= 2 else [1]


def plan(k: int, mode: str, repeats: int, item: str, seed: int = 0) -> list[View]:
    """The requests for one item of ``k`` candidates (module docstring)."""
    if mode == "pairwise" or k == 2:
        return [View([a, b]) for i in range(k) for j in range(i + 1, k) for a, b in ((i, j), (j, i))]
    rng = random.Random(f"{seed}:{item}")
    base = list(range(k))
    rng.shuffle(base)
    if repeats == 2:
        return [View(base), View(base[::-1])]
    views = []
    while len(views) < repeats:  # rotations: after k of them every candidate sat at every position once
        r = len(views) % k
        if r == 0 and views:
            rng.shuffle(base)
        views.append(View(base[r:] + base[:r]))
    return views


_PAIR = re.compile(r"^(?:answer\s+|verdict\s*:?\s*|\[?answer\s*)?(a|b|tie|draw|equal|both)\b")


def parse_pair(text: str) -> str | None:
    """``A``, ``B``, ``tie`` or None, from the first non-empty line of the reply."""
    for line in text.strip().splitlines():
        s = line.strip().strip("*#:.`'\"[]() ").lower()
        if not s:
            continue
        m = _PAIR.match(s)
        if not m:
            return None
        v = m.group(1)
        return v.upper() if v in ("a", "b") else "tie"
    return None


def parse_order(text: str, k: int) -> list[int] | None:
    """Positions 1..k best first (as shown), from the first line holding numbers; None unless
    it names every position once (one left out at the end is taken as the last)."""
    for line in text.strip().splitlines():
        nums = [int(x) for x in re.findall(r"\d+", line)]
        if not nums:
            continue
        if len(nums) == k - 1 and len(set(nums)) == k - 1 and all(1 <= n <= k for n in nums):
            nums.append(next(n for n in range(1, k + 1) if n not in nums))
        if sorted(nums) == list(range(1, k + 1)):
            return nums
        return None
    return None


def votes_from(views: list[View], replies: list[str | None], k: int) -> tuple[dict[tuple[int, int], list], list]:
    """Votes per candidate pair (i < j): +1 i better, -1 j better, 0 tie, None unreadable;
    and the parsed verdict of each view (what goes into ``meta``)."""
    votes: dict[tuple[int, int], list] = {(i, j): [] for i in range(k) for j in range(i + 1, k)}
    parsed: list = []
    for view, text in zip(views, replies):
        if len(view.shown) == 2:
            a, b = view.shown
            v = parse_pair(text) if text is not None else None
            parsed.append(v)
            vote = None if v is None else 0 if v == "tie" else 1 if v == "A" else -1  # +1: a better
            i, j = min(a, b), max(a, b)
            votes[(i, j)].append(vote if vote is None or a == i else -vote)
            continue
        order = parse_order(text, len(view.shown)) if text is not None else None
        parsed.append(order)
        rank = None if order is None else {view.shown[p - 1]: r for r, p in enumerate(order)}
        for (i, j) in votes:
            if i in view.shown and j in view.shown:
                votes[(i, j)].append(None if rank is None else 1 if rank[i] < rank[j] else -1)
    return votes, parsed


@dataclass
class Aggregate:
    """One item's outcome: the order (candidate indices best first) and tiers, or why dropped."""

    order: list[int] = field(default_factory=list)
    tiers: list[int] | None = None
    dropped: str | None = None
    agreement: float = 0.0
    pairs: list[dict[str, Any]] = field(default_factory=list)


def aggregate(k: int, votes: dict[tuple[int, int], list], policy: str = "tie") -> Aggregate:
    """Pair outcomes -> Copeland order with tiers (module docstring); ``policy`` for the
    pairs whose votes disagree or could not be read."""
    wins = [0.0] * k
    pairs, agreed, unsettled = [], 0, 0
    for (i, j), vs in sorted(votes.items()):
        ok = bool(vs) and None not in vs and len(set(vs)) == 1
        outcome = vs[0] if ok else 0
        if ok:
            agreed += 1
        else:
            unsettled += 1
        why = "agreed" if ok else ("unreadable" if None in vs or not vs else "orders disagree")
        pairs.append({"pair": [i, j], "votes": vs, "outcome": outcome, "status": why})
        wins[i] += 1.0 if outcome > 0 else 0.5 if outcome == 0 else 0.0
        wins[j] += 1.0 if outcome < 0 else 0.5 if outcome == 0 else 0.0
    n_pairs = len(votes)
    agg = Aggregate(agreement=agreed / n_pairs if n_pairs else 0.0, pairs=pairs)
    if policy == "drop" and unsettled:
        agg.dropped = f"{unsettled} of {n_pairs} pair(s) without an agreed verdict (--disagreement drop)"
        return agg
    order = sorted(range(k), key=lambda c: (-wins[c], c))
    levels = sorted({wins[c] for c in order}, reverse=True)
    tiers = [levels.index(wins[c]) for c in order]
    if len(levels) == 1:
        agg.dropped = "no preference: every candidate tied"
        return agg
    agg.order = order
    agg.tiers = None if len(levels) == k else tiers
    return agg


def make_ranking(prompt: list[Message], texts: list[str], provenance: list[dict], agg: Aggregate, *, item: str,
                 judge_model: str, mode: str, policy: str, views: list[View], replies: list[str | None],
                 parsed: list, time: str, prompt_meta: dict | None = None) -> Ranking:
    """The :class:`Ranking` record of an aggregated item (stored best -> worst)."""
    meta = {
        "annotator": f"ai:{judge_model}", "source": "ai", "time": time, "item": item,
        "candidates": [dict(provenance[c], index=c) for c in agg.order],
        "judge": {"model": judge_model, "prompt_version": PROMPT_VERSION, "mode": mode, "disagreement": policy,
                  "agreement": round(agg.agreement, 4), "pairs": agg.pairs,
                  "verdicts": [{"shown": v.shown, "reply": (r or "")[:300], "parsed": p}
                               for v, r, p in zip(views, replies, parsed)]},
    }
    if prompt_meta:
        meta["prompt_meta"] = prompt_meta
    return Ranking(prompt, [{"role": "assistant", "content": texts[c]} for c in agg.order], meta, agg.tiers).validate()


def first_position_rate(views: list[View], parsed: list) -> tuple[int, int]:
    """(pairwise verdicts naming the first-shown answer, decisive pairwise verdicts): the judge's
    position bias, 0.5 when it has none."""
    first = decisive = 0
    for v, p in zip(views, parsed):
        if len(v.shown) == 2 and p in ("A", "B"):
            decisive += 1
            first += p == "A"
    return first, decisive

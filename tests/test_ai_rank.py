"""AI-feedback rankings (chatforge.data.ai_rank): position bias is controlled -- a judge that
always picks the first answer states no preference --, a consistent judge's order comes out,
disagreements become ties or drop the prompt, and the records are what the trainers read."""

from __future__ import annotations

import pytest

from chatforge.data import ai_rank as R
from chatforge.data.readers import read_file
from chatforge.data.records import Ranking, write_jsonl

PROMPT = [{"role": "user", "content": "Name a colour."}]
TEXTS = ["blue", "green", "red"]  # quality: blue > green > red


def judge_pairs(views, prefer) -> list[str]:
    """Replies of a pairwise judge: ``prefer(a, b)`` -> "A" / "B" / "tie" for the shown pair."""
    return [prefer(*v.shown) for v in views]


def fair(a, b):  # knows that a lower index is better
    return "A" if a < b else "B"


def always_first(a, b):  # pure position bias
    return "A"


def rank(views, replies, k=3, policy="tie"):
    votes, parsed = R.votes_from(views, replies, k)
    return R.aggregate(k, votes, policy), parsed


def test_pairwise_plan_asks_every_pair_in_both_orders():
    views = R.plan(3, "pairwise", 2, "item")
    shown = [tuple(v.shown) for v in views]
    assert sorted(shown) == sorted([(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)])


def test_a_consistent_judge_gives_its_order_whatever_the_shown_order():
    views = R.plan(3, "pairwise", 2, "item")
    agg, parsed = rank(views, judge_pairs(views, lambda a, b: fair(b, a)))  # prefers the higher index
    assert agg.order == [2, 1, 0] and agg.tiers is None and agg.agreement == 1.0 and agg.dropped is None
    assert R.first_position_rate(views, parsed) == (3, 6)


def test_a_judge_that_always_says_first_states_no_preference():
    """Asked once per pair (no control) it would rank 0 > 1 > 2; both orders cancel it."""
    views = R.plan(3, "pairwise", 2, "item")
    agg, parsed = rank(views, judge_pairs(views, always_first))
    assert agg.agreement == 0.0 and agg.dropped == "no preference: every candidate tied"
    assert all(p["status"] == "orders disagree" for p in agg.pairs)
    assert R.first_position_rate(views, parsed) == (6, 6)
    agg, _ = rank(views, judge_pairs(views, always_first), policy="drop")
    assert agg.dropped.startswith("3 of 3 pair(s) without an agreed verdict")


def test_a_partly_biased_judge_gives_ties_or_drops_the_prompt():
    """Sure that 0 beats 1 and 2; biased (says A) between 1 and 2: 1 and 2 tie, below 0."""
    def judge(a, b):
        return fair(a, b) if 0 in (a, b) else "A"

    views = R.plan(3, "pairwise", 2, "item")
    agg, _ = rank(views, judge_pairs(views, judge))
    assert agg.order == [0, 1, 2] and agg.tiers == [0, 1, 1] and agg.agreement == pytest.approx(2 / 3)
    r = R.make_ranking(PROMPT, TEXTS, [{"model": "m"}] * 3, agg, item="i", judge_model="j", mode="pairwise",
                       policy="tie", views=views, replies=judge_pairs(views, judge), parsed=[None] * 6, time="t")
    assert [(p.chosen["content"], p.rejected["content"]) for p in r.pairs()] == [("blue", "green"), ("blue", "red")]
    agg, _ = rank(views, judge_pairs(views, judge), policy="drop")
    assert agg.dropped.startswith("1 of 3 pair(s)")


def test_unreadable_verdicts_are_not_preferences():
    views = R.plan(2, "pairwise", 2, "item")
    agg, parsed = rank(views, ["A", "I think the first one"], k=2)
    assert parsed == ["A", None] and agg.pairs[0]["status"] == "unreadable" and agg.dropped


def test_listwise_repeats_the_list_reversed_and_cancels_position_bias():
    views = R.plan(4, "listwise", 2, "item-x", seed=1)
    assert views[1].shown == views[0].shown[::-1] and sorted(views[0].shown) == [0, 1, 2, 3]
    assert R.plan(4, "listwise", 2, "item-x", seed=1)[0].shown == views[0].shown  # seeded by item

    def by_quality(v):  # a fair judge: the positions of candidates 0, 1, 2, 3 in the shown order
        return " > ".join(str(v.shown.index(c) + 1) for c in range(4))

    agg, _ = rank(views, [by_quality(v) for v in views], k=4)
    assert agg.order == [0, 1, 2, 3] and agg.tiers is None and agg.agreement == 1.0
    agg, _ = rank(views, ["1 > 2 > 3 > 4", "1 > 2 > 3 > 4"], k=4)  # "as shown", twice
    assert agg.dropped == "no preference: every candidate tied"


@pytest.mark.parametrize("pattern", ["2 > 1 > 3", "1 > 2 > 3", "3 > 1 > 2"])
def test_listwise_rotations_cancel_any_positional_pattern(pattern):
    """Reversal leaves the middle of an odd list in place: a judge that likes position 2
    would win it agreed pairs. Rotations (the default: K repeats) give it none."""
    views = R.plan(3, "listwise", 3, "item-y")
    assert sorted(tuple(sorted(v.shown.index(c) for v in views)) for c in range(3)) == [(0, 1, 2)] * 3
    agg, _ = rank(views, [pattern] * 3)
    assert agg.agreement == 0.0 and agg.dropped == "no preference: every candidate tied"
    if pattern == "2 > 1 > 3":
        reversed_views = R.plan(3, "listwise", 2, "item-y")
        agg2, _ = rank(reversed_views, [pattern] * 2)
        assert agg2.agreement > 0  # what the two-order design misses, as documented


def test_verdict_parsing():
    assert [R.parse_pair(t) for t in ("A", "**B**", "Tie.", "answer a is better", "\n\nB\nbecause", "Both bad", "C")] \
        == ["A", "B", "tie", "A", "B", "tie", None]
    assert R.parse_order("3 > 1 > 2", 3) == [3, 1, 2]
    assert R.parse_order("Ranking: [2, 3]", 3) == [2, 3, 1]  # the one left out is last
    assert R.parse_order("1 > 1 > 2", 3) is None and R.parse_order("no idea", 3) is None


def test_records_carry_the_shared_meta_and_read_back_for_the_trainers(tmp_path):
    views = R.plan(3, "pairwise", 2, "item")
    replies = judge_pairs(views, fair)
    votes, parsed = R.votes_from(views, replies, 3)
    agg = R.aggregate(3, votes)
    prov = [{"model": "tiny", "sample": j, "temperature": 0.8} for j in range(3)]
    r = R.make_ranking(PROMPT, TEXTS, prov, agg, item=R.item_id(PROMPT), judge_model="judge-x", mode="pairwise",
                       policy="tie", views=views, replies=replies, parsed=parsed, time="2025-01-01T00:00:00Z")
    m = r.meta
    assert m["annotator"] == "ai:judge-x" and m["source"] == "ai" and m["item"] == R.item_id(PROMPT)
    assert [c["index"] for c in m["candidates"]] == [0, 1, 2] and m["candidates"][0]["model"] == "tiny"
    assert m["judge"]["prompt_version"] == R.PROMPT_VERSION and m["judge"]["agreement"] == 1.0
    assert len(m["judge"]["verdicts"]) == 6
    write_jsonl([r], tmp_path / "r.jsonl")
    back = read_file(tmp_path / "r.jsonl")
    assert back.kind == "ranking" and isinstance(back.records[0], Ranking)
    assert [x["content"] for x in back.records[0].responses] == TEXTS

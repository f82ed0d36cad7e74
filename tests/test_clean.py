"""Cleaning rules (chatforge.data.clean): each rule fires, can be switched off, and is counted."""

import pytest

from chatforge.data.clean import (FILTER_RULES, RULES, Cleaner, clean, fix_controls, fix_noinput, is_na,
                                  repeat_ratio, tag_rejected, unfulfillable)
from chatforge.data.records import Conversation, Preference, Prompt, Ranking, msg
from chatforge.errors import ConfigError


def conv(user, assistant, system=None, **meta):
    m = ([msg("system", system)] if system else []) + [msg("user", user), msg("assistant", assistant)]
    return Conversation(m, dict(meta))


def pref(prompt, chosen, rejected):
    return Preference([msg("user", prompt)], msg("assistant", chosen), msg("assistant", rejected), {})


BANANA = "Eat a banana!" * 200
GOOD = "A balanced breakfast has protein, fibre and some fruit; oats with yoghurt and berries is a classic."

# one record per filter rule that it (and only it) should trip
CASES = {
    "empty_prompt": conv("   ", "an answer"),
    "empty_output": conv("Give three tips for staying healthy.", "  "),
    "na_output": conv("Predict the stock price for a company.", "<nooutput>"),
    "unfulfillable": conv("Design a logo for a new coffee shop.", "Here is a logo: a steaming cup."),
    "length": conv("Count to five thousand.", " ".join(str(i) for i in range(5000))),
    "repetition": conv("I'm hungry.", BANANA[:1200]),
    "identical_pair": pref("Which is better?", "This one.", "This one."),
}


@pytest.mark.parametrize("rule", sorted(CASES))
def test_each_filter_rule_fires_and_can_be_switched_off(rule):
    rec = CASES[rule]
    assert Cleaner().check(rec) == rule
    assert Cleaner(disable=[rule]).check(rec) is None


def test_good_records_pass_every_rule():
    c = Cleaner()
    assert c.check(conv("What should I eat for breakfast?", GOOD)) is None
    assert c.report()["kept"] == 1 and c.report()["rejected"] == 0


def test_duplicates_exact_and_normalised():
    c = Cleaner()
    a = conv("What is the capital of France?", "Paris.", id=1)
    b = conv("What is the capital of France?", "Paris.", id=2)  # same content, other meta
    n = conv("what is the capital of france", "PARIS", id=3)  # differs only in case/punctuation
    other = conv("What is the capital of Spain?", "Madrid.")
    assert [c.check(r) for r in (a, b, n, other)] == [None, "duplicate", "near_duplicate", None]
    c2 = Cleaner(disable=["duplicate", "near_duplicate"])
    assert [c2.check(r) for r in (a, b, n)] == [None, None, None]


def test_duplicates_are_per_kind():
    c = Cleaner()
    p = Prompt([msg("user", "Same text")], {})
    cv = Conversation([msg("user", "Same text"), msg("assistant", "Answer here")], {})
    assert c.check(p) is None and c.check(cv) is None


def test_control_characters_are_fixed_in_place_not_rejected():
    r = conv("Fix\x07 this\r\nplease", "\x1b[31mred\x1b[0m text\u200b and\x00 more")
    c = Cleaner()
    assert c.check(r) is None
    assert r.messages[0]["content"] == "Fix this\nplease"
    assert r.messages[1]["content"] == "red text and more"
    assert c.report()["rules"]["control_chars"] == {"enabled": True, "fixed": 1}
    r2 = conv("Fix\x07 this", "ok then, fine")
    Cleaner(disable=["control_chars"]).check(r2)
    assert "\x07" in r2.messages[0]["content"]


def test_fix_controls_details():
    assert fix_controls("keep\ttabs\nand newlines") == "keep\ttabs\nand newlines"
    assert fix_controls('名字是\\"骆驼\\"。') == '名字是"骆驼"。'  # double-escaped quotes in prose
    code = 'print(\\"hi\\")'
    assert fix_controls(code) == code  # escapes in code are left alone
    assert fix_controls("The man went to the store. " + "\u0326" * 50) == "The man went to the store. "
    assert fix_controls("café naïve") == "café naïve"


def test_noinput_markers_are_removed_from_user_messages():
    assert fix_noinput("Summarise the text.\n\n<noinput>") == "Summarise the text."
    assert fix_noinput("Write a poem.\nInput: N/A") == "Write a poem."
    assert fix_noinput("Do it <no input> now") == "Do it now"
    assert fix_noinput("Name a colour.\n\nnone.") == "Name a colour."
    assert fix_noinput("<noinput>") == "<noinput>"  # would become empty: left alone
    assert fix_noinput("Explain what the input None means in Python") == "Explain what the input None means in Python"
    r = conv("Give an example.\n\n<No Input>", "Sure, here is one example of it.")
    c = Cleaner()
    assert c.check(r) is None and r.messages[0]["content"] == "Give an example."
    assert c.report()["rules"]["noinput"]["fixed"] == 1


def test_na_outputs():
    for s in ["N/A", "n/a.", "<nooutput>", "<No Output>", "No output", "Not applicable", "null", "nan", "...", "-"]:
        assert is_na(s), s
    for s in ["None", "No", "NA is the symbol of sodium", "Yes."]:
        assert not is_na(s), s


def test_na_and_repetition_only_judge_what_is_learned():
    # a bad *rejected* answer is a fine negative example; a bad chosen one is not
    assert Cleaner().check(pref("Stock price?", "I cannot predict prices.", "N/A")) is None
    assert Cleaner().check(pref("Stock price?", "N/A", "I cannot predict prices.")) == "na_output"
    assert Cleaner().check(pref("Hungry?", "Have a snack, maybe some fruit.", BANANA)) is None
    assert Cleaner().check(pref("Hungry?", BANANA, "Have a snack.")) == "repetition"


def test_empty_output_applies_to_every_response():
    assert Cleaner().check(pref("q?", "a real answer", "")) == "empty_output"
    rk = Ranking([msg("user", "q?")], [msg("assistant", "best"), msg("assistant", "")], {})
    assert Cleaner().check(rk) == "empty_output"


def test_identical_responses_in_a_ranking():
    rk = Ranking([msg("user", "q?")], [msg("assistant", "a"), msg("assistant", "b"), msg("assistant", "a ")], {})
    assert Cleaner().check(rk) == "identical_pair"


def test_repeat_ratio():
    assert repeat_ratio("short text") is None
    assert repeat_ratio(BANANA) > 0.98
    assert repeat_ratio(GOOD * 1) is None or repeat_ratio(GOOD) < 0.1
    assert repeat_ratio("我们" * 100) > 0.9  # character n-grams for text without spaces
    natural = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch and "
               "thinks about the harvest that is coming in the autumn.")
    assert repeat_ratio(natural) < 0.1
    assert repeat_ratio(natural, at_least=0.8) == 0.0  # cheap bound says it cannot reach 0.8


def test_unfulfillable_examples():
    yes = ["Draw a picture of a cat.", "Create an image of a sunset over the sea.", "Sing a song about waking up.",
           "Give me three adjectives to describe this photo.\n\n[photo]", "Summarize the article at https://x.org/a",
           "Please record a video of yourself dancing", "Search the web for cheap flights", "请画一张猫的图片"]
    no = ["Write a script for a YouTube video about cats.", "Make a list of movies from 1990.",
          "Explain how to design a logo.", "Describe the painting 'The Great Wave off Kanagawa'.",
          "Hadassah took six hours to paint 12 paintings. How long for 20?", "Create a biographical sketch of Ada.",
          "Extract the domain from the URL https://example.com/path", "Compose a poem about the sea."]
    assert [s for s in yes if not unfulfillable(s)] == []
    assert [s for s in no if unfulfillable(s)] == []


def test_prompt_records_get_the_prompt_rules():
    c = Cleaner()
    assert c.check(Prompt([msg("user", "Draw a picture of a dog.")], {})) == "unfulfillable"
    assert c.check(Prompt([msg("user", "What is 2 + 2?")], {})) is None
    assert c.check(Prompt([msg("user", "What is 2 + 2?")], {})) == "duplicate"


def test_length_bounds_are_settings():
    r = conv("Hi", "Hello there")
    assert Cleaner(max_chars=10).check(r) == "length"
    assert Cleaner(min_chars=50).check(conv("Hi", "Hello there")) == "length"
    assert Cleaner().check(conv("Hi", "Hello there")) is None


def test_clean_accounts_for_every_record_and_reports_per_rule():
    recs = [conv("What should I eat for breakfast?", GOOD)] + [CASES[r] for r in sorted(CASES)]
    recs.append(conv("What should I eat for breakfast?", GOOD))  # duplicate
    res = clean(recs)
    assert len(res.kept) + len(res.rejected) == len(recs)
    assert len(res.kept) == 1
    rep = res.report
    assert rep["records_in"] == len(recs) and rep["kept"] == 1 and rep["rejected"] == len(recs) - 1
    counts = {r: v["rejected"] for r, v in rep["rules"].items() if "rejected" in v}
    assert counts == {**dict.fromkeys(FILTER_RULES, 0), **dict.fromkeys(CASES, 1), "duplicate": 1}
    assert sorted(rule for _, rule in res.rejected) == sorted([*CASES, "duplicate"])
    assert set(rep["rules"]) == set(RULES)


def test_unknown_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown cleaning rule"):
        Cleaner(disable=["spelling"])


def test_tag_rejected_keeps_a_canonical_record():
    r = tag_rejected(conv("x", "y", id=5), "na_output")
    assert r.meta == {"id": 5, "rejected_by": "na_output"} and r.validate()


def test_requests_are_judged_in_the_instruction_not_in_its_input():
    assert not unfulfillable("Find the missing word from the following lyrics.\n\nSing a song of sorrow,\nAnd tears")
    assert not unfulfillable("Assign parts of a given task to two people.\n\nCreate an infographic about climate")
    assert unfulfillable("Summarize the following article:\n\nhttps://www.example.com/story")  # references: anywhere
    assert unfulfillable("Describe the mood.\n\nLook at this picture and tell me")

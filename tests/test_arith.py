"""The arithmetic yardstick: generator, reward rule, eval task, CLI, pipeline hooks and recipe.

Models: the tiny one only; what it answers is never asserted, except through a fake engine
that answers each prompt correctly (accuracy 1.0) or off by one (0.0), so the plumbing
between prompts, responses and scores is tested, not the random weights.
"""

import json
from pathlib import Path

import pytest

from chatforge.cli import main
from chatforge.data import arith
from chatforge.data.records import Prompt, iter_canonical, msg
from chatforge.errors import ConfigError
from chatforge.eval import tasks
from chatforge.generate.engine import Completion
from chatforge.train.reward_fns import arith_exact

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "arith.yaml"


# ---------------------------------------------------------------- generator
def test_heldout_is_fixed_and_pinned():
    a = arith.records("add2", "heldout", 50)
    b = arith.records("add2", "heldout", 50, seed=123)             # the seed moves only the train split
    assert [r.prompt for r in a] == [r.prompt for r in b]
    # pinned: a change of generator or RNG would silently change the yardstick
    assert a[0].prompt == [msg("user", "What is 12 + 89? Answer with the number only.")]
    assert (a[0].meta["answer"], a[1].meta["expression"], a[1].meta["answer"]) == (101, "66 - 55", 11)
    assert a[0].meta == {"source": "arith", "id": "add2-heldout-0", "tier": "add2", "split": "heldout",
                         "expression": "12 + 89", "answer": 101}
    assert arith.heldout_problems("mul", 1)[0].expression == "52 * 9"
    assert arith.heldout_problems("two_step", 1)[0].expression == "7 + 16 * 2"
    big = arith.heldout_problems("add2", 500)
    assert big[:50] == arith.heldout_problems("add2", 50)            # a larger held-out set contains the smaller
    assert len({p.key for p in big}) == 500                           # distinct problems


@pytest.mark.parametrize("tier", arith.TIERS)
def test_train_is_seeded_and_disjoint_from_the_whole_heldout_pool(tier):
    t0 = arith.train_problems(tier, 2000, seed=0)
    assert t0 == arith.train_problems(tier, 2000, seed=0)
    assert t0 != arith.train_problems(tier, 2000, seed=1)
    pool = {p.key for p in arith.heldout_pool(tier)}
    assert len(pool) == arith.HELDOUT_POOL[tier] >= 500
    assert not pool & {p.key for p in t0}
    for p in t0[:200] + arith.heldout_pool(tier)[:200]:
        assert p.answer >= 0 and isinstance(p.answer, int)
        assert arith.solve(arith.PROMPT.format(expression=p.expression)) == p.answer  # the parser agrees


def test_a_commutative_swap_is_the_same_problem():
    assert arith.problem_key("a+b", (38, 47)) == arith.problem_key("a+b", (47, 38))
    assert arith.problem_key("a*b", (7, 46)) == arith.problem_key("a*b", (46, 7))
    assert arith.problem_key("a-b", (47, 38)) != arith.problem_key("a-b", (38, 47))
    assert arith.problem_key("a+b*c", (3, 4, 5)) == arith.problem_key("a+b*c", (3, 5, 4))
    assert arith.problem_key("(a-b)*c", (9, 4, 3)) != arith.problem_key("(a-b)*c", (9, 3, 4))
    swapped = {arith.problem_key("a+b", tuple(reversed(p.key[1:]))) for p in arith.heldout_pool("add2")
               if p.key[0] == "a+b"}
    assert not swapped & {p.key for p in arith.train_problems("add2", 3000)}


def test_generator_rejects_bad_options():
    with pytest.raises(ConfigError, match="tier"):
        arith.records("add3", "train", 5)
    with pytest.raises(ConfigError, match="split"):
        arith.records("add2", "test", 5)
    with pytest.raises(ConfigError, match="at most 500"):
        arith.records("mul", "heldout", 501)
    with pytest.raises(ConfigError, match=">= 0"):
        arith.records("add2", "train", -1)


@pytest.mark.parametrize("text,value", [("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("(9 - 4) * 3", 15), ("10 - 4 - 3", 3),
                                        ("7 × 8", 56), ("-3 + 5", 2), ("2 * (3 - 10)", -14), (" 42 ", 42)])
def test_solve_expression(text, value):
    assert arith.solve_expression(text) == value


@pytest.mark.parametrize("text", ["", "2 +", "(2 + 3", "2 + 3)", "2 ** 3", "__import__('os')", "2 / 3", "1e3"])
def test_solve_expression_refuses_anything_else(text):
    with pytest.raises(ValueError):
        arith.solve_expression(text)


def test_solve_reads_the_prompt_template():
    assert arith.solve("What is 47 + 38? Answer with the number only.") == 85
    assert arith.solve("What is (19 - 16) * 2? Answer with the number only.") == 6
    assert arith.solve("Tell me a joke.") is None
    assert arith.solve("What is love?") is None


# ---------------------------------------------------------------- reward
CASES = [
    ("42", 42, 1.0), ("The answer is 42.", 42, 1.0), ("42.", 42, 1.0), (" 42\n", 42, 1.0),
    ("-7", -7, 1.0), ("The result is -7.", -7, 1.0), ("−7", -7, 1.0), ("7", -7, 0.0),
    ("1,234", 1234, 1.0), ("It is 1,234 in total", 1234, 1.0), ("1234", 1234, 1.0),
    ("42 apples, 43 pears", 43, 1.0), ("42 apples, 43 pears", 42, 0.0), ("42,43", 43, 1.0),
    ("To solve this problem, we need to add 47 and 38.", 85, 0.0), ("To solve this", 85, 0.0), ("", 1, 0.0),
    ("12 + 89 = 101", 101, 1.0), ("12 + 89 = 101", 12, 0.0),   # the final number, GSM8K-style
    ("To solve this problem, we need to add 12 and 89", 89, 1.0),  # cut before the answer: reads 89
    ("5-7", 7, 1.0), ("5-7", 5, 0.0), ("42.0", 42, 1.0), ("42.5", 42, 0.0), ("4 2", 2, 1.0), ("$85", 85, 1.0),
]


@pytest.mark.parametrize("response,answer,want", CASES)
def test_final_number_rule(response, answer, want):
    assert arith_exact([[msg("user", "What is 1 + 1?")]], [response], answers=[answer]) == [want]


def test_reward_answer_comes_from_meta_else_from_the_prompt_text():
    text = "What is 47 + 38? Answer with the number only."
    as_ppo_passes_them = [[msg("user", text)], text]                   # message lists (PPO/RLOO), or a string
    assert arith_exact(as_ppo_passes_them, ["85", "85"]) == [1.0, 1.0]
    assert arith_exact(as_ppo_passes_them, ["84", "To solve"]) == [0.0, 0.0]
    rec = Prompt([msg("user", text)], {"answer": 86})                  # meta wins over the text
    assert arith_exact([rec, {"prompt": rec.prompt, "meta": {"answer": 86}}], ["86", "86"]) == [1.0, 1.0]
    assert arith_exact([[msg("user", "Tell me a joke.")]], ["85"]) == [0.0]   # no answer: 0


def test_format_bonus():
    p = [[msg("user", "What is 2 + 3? Answer with the number only.")]] * 4
    r = ["5", "6", "The answer is 5.", "5."]
    assert arith_exact(p, r) == [1.0, 0.0, 1.0, 1.0]                   # off by default
    assert arith_exact(p, r, format_bonus=0.1) == pytest.approx([1.1, 0.1, 1.0, 1.1])
    with pytest.raises(ConfigError, match="format_bonus"):
        arith_exact(p, r, format_bonus="lots")


def test_reward_through_its_spec_string():
    from chatforge.train.rewards import build_rewards

    rw = build_rewards(["fn:chatforge.train.reward_fns:arith_exact?format_bonus=0.5"])
    out = rw([[msg("user", "What is 6 * 7? Answer with the number only.")]] * 2, ["42", "41 is close"])
    assert out.raw.tolist() == pytest.approx([1.5, 0.0])


# ---------------------------------------------------------------- statistics
def test_wilson_interval():
    lo, hi = tasks.wilson_interval(0, 500)
    assert lo == 0.0 and hi == pytest.approx(3.8415 / (500 + 3.8415), rel=1e-3)
    lo, hi = tasks.wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = tasks.wilson_interval(40, 500)
    assert lo < 0.08 < hi and 0 <= lo and hi <= 1
    assert tasks.wilson_interval(0, 0) == (None, None)


def test_paired_difference():
    before = [0] * 80 + [1] * 20
    after = [1] * 30 + [0] * 50 + [1] * 15 + [0] * 5                  # gained 30, lost 5
    d = tasks.paired_difference(before, after)
    assert (d["gained"], d["lost"], d["n"]) == (30, 5, 100)
    assert d["diff"] == pytest.approx(0.25)
    assert d["lo"] < 0.25 < d["hi"] and d["lo"] > 0                   # a real improvement
    assert d["p_value"] < 1e-4
    same = tasks.paired_difference(before, before)
    assert (same["diff"], same["lo"], same["hi"], same["p_value"]) == (0, 0, 0, 1.0)
    assert tasks.mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    with pytest.raises(ValueError):
        tasks.paired_difference([1, 0], [1])


# ---------------------------------------------------------------- eval task
class FakeEngine:
    """Reads each prompt back from its ids and answers it (``off`` = 0: correctly)."""

    def __init__(self, tokenizer, off=0):
        self.tok, self.off, self.calls = tokenizer, off, []

    def generate(self, prompt_ids, cfg):
        self.calls.append((len(prompt_ids), cfg.max_new_tokens, cfg.temperature))
        out = []
        for ids in prompt_ids:
            text = str(arith.solve(self.tok.decode(ids)) + self.off)
            out.append(Completion(list(range(len(text))), text, None, "eos"))
        return out


@pytest.fixture(scope="module")
def tiny():
    from chatforge.models.load import load

    model, tok = load("tiny")
    return model.eval(), tok


def test_task_on_the_tiny_model(tiny):
    model, tok = tiny
    probs = arith.records("add2", "heldout", 12)
    s = tasks.ArithSettings(tiers=["add2"], n=12, max_new_tokens=4, batch_size=5, examples=3)
    res = tasks.run_arith(model, tok, probs, s)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["n"] == 12 and len(res["correct"]) == 12
    assert res["lo"] <= res["accuracy"] <= res["hi"] and 0.0 <= res["lo"] and res["hi"] <= 1.0
    assert 0.0 <= res["number_only"] <= 1.0 and len(res["examples"]) == 3 and len(res["responses"]) == 12


def test_task_scores_a_correct_and_a_wrong_engine(tiny):
    model, tok = tiny
    probs = arith.records("two_step", "heldout", 11)
    s = tasks.ArithSettings(tiers=["two_step"], n=11, batch_size=4)
    right = FakeEngine(tok)
    res = tasks.run_arith(model, tok, probs, s, engine=right)
    assert (res["accuracy"], res["number_only"], res["no_eos"]) == (1.0, 1.0, 0.0)
    assert res["lo"] > 0.7 and res["hi"] == 1.0
    assert right.calls == [(4, 16, 0.0), (4, 16, 0.0), (3, 16, 0.0)]   # batched, greedy, 16 tokens
    wrong = tasks.run_arith(model, tok, probs, s, engine=FakeEngine(tok, off=1))
    assert (wrong["accuracy"], wrong["anywhere"]) == (0.0, 0.0)
    assert tasks.paired_difference(wrong["correct"], res["correct"])["diff"] == 1.0


def test_settings_are_validated():
    for bad, match in (({"tiers": []}, "tiers"), ({"tiers": ["add3"]}, "add3"), ({"n": 0}, "n"),
                       ({"tiers": ["mul"], "n": 600}, "pool"), ({"gen_dtype": "int8"}, "gen_dtype"),
                       ({"max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(ConfigError, match=match):
            tasks.ArithSettings(**bad).validate()


# ---------------------------------------------------------------- CLI
def test_eval_task_cli(tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["eval", "tiny", "again=tiny", "--task", "arith", "--tier", "add2", "--tier", "mul", "--n", "6",
               "--max-new-tokens", "4", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "accuracy  95% interval" in text and "paired on the same problems, vs tiny" in text
    data = json.loads((out / "arith.json").read_text())
    assert [(r["label"], r["tier"], r["n"]) for r in data["rows"]] == [("tiny", "add2", 6), ("tiny", "mul", 6),
                                                                        ("again", "add2", 6), ("again", "mul", 6)]
    for r in data["rows"]:
        assert 0 <= r["lo"] <= r["accuracy"] <= r["hi"] <= 1
    assert [c["diff"] for c in data["comparisons"]] == [0.0, 0.0]      # the same model twice
    lines = (out / "arith_responses.jsonl").read_text().splitlines()
    assert len(lines) == 24 and json.loads(lines[0])["expression"] == "12 + 89"
    assert list((out / "cache").glob("arith-*.json"))                  # re-running is free
    assert main(["eval", "tiny", "--task", "arith", "--rm", "x"]) == 2
    assert main(["eval", "tiny", "--tier", "add2"]) == 2               # --tier without --task
    assert main(["eval", "tiny", "--task", "arith", "--n", "501", "--tier", "mul"]) == 2


def test_data_arith_cli(tmp_path, capsys):
    tr, he = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    assert main(["data", "arith", "--tier", "add2", "-n", "300", "--split", "train", "--seed", "3", "-o", str(tr)]) == 0
    assert main(["data", "arith", "--tier", "add2", "-n", "500", "--split", "heldout", "-o", str(he)]) == 0
    assert "wrote 500 add2 heldout problem(s) (fixed set)" in capsys.readouterr().out
    train, held = list(iter_canonical(tr)), list(iter_canonical(he))
    assert len(train) == 300 and len(held) == 500 and all(isinstance(r, Prompt) for r in train + held)
    assert not {r.meta["expression"] for r in train} & {r.meta["expression"] for r in held}
    assert [r.prompt for r in train] == [r.prompt for r in arith.records("add2", "train", 300, seed=3)]
    assert main(["data", "arith", "--tier", "mul", "-n", "999", "--split", "heldout", "-o", str(he)]) == 2


# ---------------------------------------------------------------- pipeline
def test_recipe_validates(capsys):
    assert main(["pipeline", str(RECIPE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "algo rloo, rewards fn:chatforge.train.reward_fns:arith_exact" in out and "tasks arith" in out
    assert main(["pipeline", str(RECIPE), "data.arith.tier=add3", "--dry-run"]) == 2
    assert main(["pipeline", str(RECIPE), "eval.tasks=[arth]", "--dry-run"]) == 2
    assert main(["pipeline", str(RECIPE), "eval.arith.tierz=[add2]", "--dry-run"]) == 2


def test_pipeline_data_and_eval_hooks(tmp_path):
    from chatforge.pipeline import (ARITH_REWARD, ArithData, DataSpec, Recipe, load_recipe, run_data_stage,
                                    run_eval_stage, stage_configs, stage_inputs)

    recipe, _ = load_recipe(RECIPE, [f"out={tmp_path}", "model=tiny", "data.arith.train=20",
                                     "data.arith.heldout=10", "eval.arith.n=4", "eval.arith.tiers=[add2]",
                                     "eval.max_prompts=2", "eval.max_new_tokens=2", "eval.arith.max_new_tokens=3"])
    ppo = stage_configs(recipe, tmp_path, ["data", "ppo", "eval"])["ppo"]
    assert ppo.rewards == ["fn:chatforge.train.reward_fns:arith_exact"]  # the recipe's
    plain = Recipe(stages=["data", "ppo"], data=DataSpec(arith=ArithData()))
    assert stage_inputs(plain, tmp_path)["ppo"]["rewards"] == [ARITH_REWARD]  # the default: the rule alone
    assert stage_inputs(Recipe(), tmp_path)["ppo"]["rewards"] == [f"rm:{tmp_path / 'rm'}"]
    assert ppo.eval_data == [str(tmp_path / "data" / "arith_heldout.jsonl")]
    run_data_stage(recipe, tmp_path, log=lambda m: None)
    train = list(iter_canonical(tmp_path / "data" / "prompts.jsonl"))
    held = list(iter_canonical(tmp_path / "data" / "arith_heldout.jsonl"))
    assert len(train) == 20 and len(held) == 10 and held[0].meta["answer"] == 101
    assert json.loads((tmp_path / "data" / "report.json").read_text())["arith"]["seed"] == 0
    run_eval_stage(recipe, tmp_path, log=lambda m: None)               # no trained stage yet: the base model alone
    res = json.loads((tmp_path / "eval" / "arith.json").read_text())
    assert [(r["label"], r["tier"], r["n"]) for r in res["rows"]] == [("base", "add2", 4)]
    assert "| base | add2 |" in (tmp_path / "eval" / "arith.md").read_text()
    assert (tmp_path / "report.md").exists() and (tmp_path / "eval" / "DONE").exists()
    assert "## Objective yardstick: arithmetic" in (tmp_path / "report.md").read_text()
    assert "Objective yardstick: arithmetic" in (tmp_path / "report.html").read_text()


def test_mixed_chat_and_arithmetic_rl_adds_the_rule_to_the_reward_model(tmp_path):
    """With a reward model and generated problems, RL's reward is the RM's score plus the weighted rule."""
    from chatforge.pipeline import ARITH_REWARD, ArithData, DataSpec, Recipe, stage_inputs

    mixed = Recipe(stages=["data", "sft", "rm", "ppo"], data=DataSpec(arith=ArithData(reward_weight=2.5)))
    assert stage_inputs(mixed, tmp_path)["ppo"]["rewards"] == [f"rm:{tmp_path / 'rm'}", f"{ARITH_REWARD}@2.5"]
    assert main(["pipeline", str(RECIPE), "data.arith.reward_weight=0", "--dry-run"]) == 2


def test_every_model_is_compared_with_the_base_and_with_sft(tmp_path):
    """compare_to=["sft"]: RL's gain over the model it started from, not only over the base;
    the same model under three names: no difference, and the verdict says none was shown."""
    s = tasks.ArithSettings(tiers=["add2"], n=6, max_new_tokens=2, batch_size=6)
    res = tasks.evaluate_arith({"base": "tiny", "sft": "tiny", "ppo": "tiny"}, s, baseline="base",
                               out=tmp_path, compare_to=["sft"], log=lambda m: None)
    assert [(c["label"], c["baseline"]) for c in res.comparisons] == [("sft", "base"), ("ppo", "base"),
                                                                       ("ppo", "sft")]
    assert [r["label"] for r in res.rows] == ["base", "sft", "ppo"]
    assert all(c["diff"] == 0.0 for c in res.comparisons)
    lines = tasks.verdict_lines(res.comparisons)
    assert len(lines) == 3 and all(line.endswith("no difference shown (the interval includes 0)") for line in lines)
    text = tasks.text_table(res)
    assert text.count("paired on the same problems, vs") == 2


def test_verdict_needs_the_interval_to_exclude_zero():
    c = {"tier": "add2", "label": "ppo", "baseline": "sft", "n": 200, "gained": 30, "lost": 6, "p_value": 1e-4}
    up, flat, down = (dict(c, diff=d, lo=lo, hi=hi) for d, lo, hi in ((0.12, 0.06, 0.18), (0.03, -0.01, 0.07),
                                                                      (-0.1, -0.16, -0.04)))
    assert tasks.verdict_lines([up, flat, down, dict(c, diff=None)]) == [
        "arith add2: ppo vs sft: +0.120 [+0.060, +0.180] on 200 problems, McNemar p 0.0001: better",
        "arith add2: ppo vs sft: +0.030 [-0.010, +0.070] on 200 problems, McNemar p 0.0001: "
        "no difference shown (the interval includes 0)",
        "arith add2: ppo vs sft: -0.100 [-0.160, -0.040] on 200 problems, McNemar p 0.0001: worse"]

"""The gold judge: the proxy/gold split of the preferences, the refusal detector, the
over-optimisation and jump warnings on hand-made rows, selection by gold, recipe checks, and
a tiny pipeline with a gold stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatforge.config import ConfigError
from chatforge.eval.overopt import findings
from chatforge.pipeline import load_recipe, run_data_stage, stage_configs
from chatforge.textstats import is_refusal, refusal_rate

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
GOLD_STAGES = "stages=[data,sft,rm,gold,ppo,eval]"


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("text", [
    "I'm sorry.", "I’m sorry, but I can't help with that.", "  \"I cannot do that.\"", "Sorry, no.",
    "I can't help with that request.", "As an AI language model, I do not have opinions.", "i am unable to comply",
    "**I won't** write that.", "I apologize, but that is not something I can do.",
])
def test_refusal_positives(text):
    assert is_refusal(text), text


@pytest.mark.parametrize("text", [
    "I'm sorry to hear that. Try resting and drinking water.",   # sympathy, then help
    "Sorry for your loss.",
    "Here is how to do it. I can't promise it works everywhere.",  # an opening, not a search
    "Sorrywhatever", "Icannot", "", "The sky is blue.", "I cannotwait",
])
def test_refusal_negatives(text):
    assert not is_refusal(text), text


def test_refusal_rate():
    assert refusal_rate(["I'm sorry.", "Sure, here it is.", "I cannot.", "Yes."]) == 0.5
    assert refusal_rate([]) == 0.0


# ---------------------------------------------------------------- warnings on hand-made rows
def _row(label, step, proxy, gold, refusal=0.05, length=40.0, loop=0.0, no_eos=0.05, kl=None, start="sft/final",
         n=64, run=None):
    run = run or label.split("/")[0]
    return {"run": run, "label": label, "checkpoint": label.split("/")[-1], "step": step, "start": start,
            "n_prompts": n, "rm_score": proxy, "rm_score_std": 1.0, "gold_score": gold, "gold_score_std": 1.0,
            "refusal_rate": refusal, "len_tokens": length, "loop_rate": loop, "no_eos_rate": no_eos,
            "kl": kl if kl is not None else (step or 0) / 10}


START = _row("sft/final", 100, 0.5, 0.3, start=None)


def test_warnings_fire_on_proxy_up_gold_down_and_a_refusal_jump():
    rows = [START,
            _row("ppo/step-10", 10, 0.8, 0.6, refusal=0.05, length=38),
            _row("ppo/step-20", 20, 1.3, 0.5, refusal=0.10, length=30),
            _row("ppo/step-30", 30, 1.8, 0.0, refusal=0.60, length=12),
            _row("ppo/step-40", 40, 2.1, -0.4, refusal=0.93, length=6)]
    got = findings(rows, "gold_score", runs=["ppo"])
    kinds = {f.kind: f for f in got}
    assert set(kinds) == {"overoptimisation", "worse_than_start", "refusal_rate", "length"}
    over = kinds["overoptimisation"]
    assert over.label == "ppo/step-40"
    assert over.text.startswith("ppo: proxy reward rose 0.8 -> 2.1 while gold fell 0.6 -> -0.4 between step 10 "
                                "and step 40") and "over-optimisation" in over.text
    assert "best by gold: ppo/step-10" in over.text
    ref = kinds["refusal_rate"]
    assert ref.label == "ppo/step-40" and "refusal rate 0.05 -> 0.93 (vs its start sft/final)" in ref.text
    assert "learned to refuse" in ref.text and "2 of 4 checkpoints" in ref.text
    assert kinds["length"].label == "ppo/step-40" and "40 -> 6 tokens" in kinds["length"].text
    assert "gold 0.3 -> -0.4 vs its start sft/final" in kinds["worse_than_start"].text
    # the start itself can be the gold peak: "no checkpoint beats the start"
    rows[1]["gold_score"], rows[2]["gold_score"] = 0.2, 0.25
    over = next(f for f in findings(rows, "gold_score", runs=["ppo"]) if f.kind == "overoptimisation")
    assert "between the start (sft/final) and step 40" in over.text and "no checkpoint beats the start" in over.text


def test_warnings_stay_quiet_on_a_healthy_run_and_on_noise():
    healthy = [START,
               _row("ppo/step-10", 10, 0.8, 0.4, length=42),
               _row("ppo/step-20", 20, 1.3, 0.6, refusal=0.08, length=50, loop=0.05),
               _row("ppo/step-30", 30, 1.8, 0.7, refusal=0.10, length=61, no_eos=0.1)]
    assert findings(healthy, "gold_score", runs=["ppo"]) == []
    # the same over-optimisation shape on 4 prompts is within noise; a rate jump of 1 prompt in 4 too
    few = [dict(r, n_prompts=4) for r in [START, _row("ppo/step-10", 10, 0.8, 0.6, refusal=0.25),
                                          _row("ppo/step-20", 20, 1.2, 0.3, refusal=0.30)]]
    assert findings(few, "gold_score", runs=["ppo"]) == []
    # without a gold judge only the jumps vs the start are checked
    loopy = [START, _row("ppo/step-10", 10, 3.0, -5.0, loop=0.72, no_eos=0.94)]
    assert {f.kind for f in findings(loopy, None, runs=["ppo"])} == {"loop_rate", "no_eos_rate"}
    # a run without its start in the table has nothing to jump from
    assert findings(loopy[1:], None, runs=["ppo"]) == []


def test_judge_win_rate_as_gold():
    def jrow(label, step, proxy, win):
        r = _row(label, step, proxy, None)
        r.update(judge_win_rate=win, judge_win_rate_std=0.45)
        return r

    rows = [dict(START, judge_win_rate=0.5, judge_win_rate_std=0.0),
            jrow("ppo/step-10", 10, 0.9, 0.7), jrow("ppo/step-20", 20, 2.0, 0.2)]
    assert [f.kind for f in findings(rows, "judge_win_rate", runs=["ppo"])] == ["overoptimisation",
                                                                               "worse_than_start"]


# ---------------------------------------------------------------- selection by gold (no models)
def test_assemble_picks_the_best_by_gold_and_flags_the_refusing_checkpoint():
    from chatforge.eval.evaluate import EvalSettings, Target, assemble

    n = 24
    base = Target("sft", "final", "/x/sft/model", 100, True, run_dir="/x/sft")
    ts = [base] + [Target("ppo", f"step-{i:07d}", f"/x/ppo/checkpoints/step-{i:07d}", i, i == 40, "/x/sft/model",
                          run_dir="/x/ppo", start="/x/sft") for i in (10, 20, 40)]
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(n)]

    def gen(texts):
        return {"nll": [], "vocab": 10, "responses": [{"prompt_ids": [1], "token_ids": [2] * max(1, len(t.split())),
                                                       "text": t, "finish_reason": "eos", "logp": -1.0}
                                                      for t in texts]}

    g = {base.label: gen([f"a plain answer number {i}, with some words in it." for i in range(n)]),
         ts[1].label: gen([f"a better answer number {i}, with more detail in it." for i in range(n)]),
         ts[2].label: gen([f"a careful answer number {i} that says a lot more." for i in range(n)]),
         ts[3].label: gen(["I'm sorry."] * n)}
    wobble = [0.1 * ((i % 5) - 2) for i in range(n)]
    proxy = {t.label: [lvl + w for w in wobble] for t, lvl in zip(ts, (0.0, 0.8, 1.3, 2.1))}
    gold = {t.label: [lvl + w for w in wobble] for t, lvl in zip(ts, (0.3, 0.6, 0.7, -0.4))}
    starts = {t.label: base.label for t in ts[1:]}
    res = assemble(ts, g, {}, proxy, {}, base, prompts, EvalSettings(), [], gold_scores=gold, gold="rm",
                   starts=starts)
    assert res.selection == "gold_win_rate" and res.gold == "rm"
    assert res.best["ppo"] == "ppo/step-0000020"
    assert res.row("ppo/step-0000040")["refusal_rate"] == 1.0 and res.row("ppo/step-0000040")["win_rate"] == 1.0
    assert {"overoptimisation", "refusal_rate", "length", "worse_than_start"} <= set(
        res.row("ppo/step-0000040")["flags"])
    warned = "\n".join(res.warnings)
    assert "proxy reward rose" in warned and "learned to refuse" in warned
    assert any("by the proxy RM the best would be step-0000040" in x for x in res.notes)
    assert res.row("ppo/step-0000020")["start"] == "sft/final"
    # the same rows without the gold judge: the proxy picks the refusing checkpoint
    res = assemble(ts, g, {}, proxy, {}, base, prompts, EvalSettings(), [], starts=starts)
    assert res.selection == "win_rate" and res.best["ppo"] == "ppo/step-0000040"
    assert not any("proxy reward rose" in w for w in res.warnings)
    assert any("learned to refuse" in w for w in res.warnings)  # the jump needs no gold judge


def test_assemble_with_several_samples_per_prompt_groups_items_by_prompt():
    """``samples`` > 1: win rate over every response, interval and paired items over prompts."""
    from chatforge.eval.evaluate import EvalSettings, Target, assemble, per_prompt

    n, k = 6, 4
    base = Target("sft", "final", "/x/sft/model", 10, True, run_dir="/x/sft")
    pol = Target("ppo", "final", "/x/ppo/model", 20, True, "/x/sft/model", run_dir="/x/ppo", start="/x/sft")
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(n)]

    def gen(tag):
        return {"nll": [], "vocab": 10, "responses": [
            {"prompt_ids": [1], "token_ids": [2, 3], "text": f"{tag} {i}", "finish_reason": "eos", "logp": -1.0}
            for i in range(n * k)]}

    # the policy beats SFT on every sample of prompts 0-3, loses every sample of prompts 4-5
    pol_sc = [1.0 if i // k < 4 else -1.0 for i in range(n * k)]
    gold = {base.label: [0.0] * (n * k), pol.label: pol_sc}
    res = assemble([base, pol], {base.label: gen("a"), pol.label: gen("b")}, {}, {}, {}, base, prompts,
                   EvalSettings(temperature=0.7, samples=k), [], gold_scores=gold, gold="rm")
    row = res.row("ppo/final")
    assert row["gold_win_rate"] == pytest.approx(4 / 6) and row["n_prompts"] == n and row["n_responses"] == n * k
    # a bootstrap over 6 prompts (not 24 responses) reaches down to where 2 or fewer of 6 prompts won
    assert row["gold_win_lo"] <= 2 / 6 + 1e-9 and row["gold_win_hi"] == 1.0
    # the paired mean difference of gold scores, per prompt: (4 x 1 + 2 x -1) / 6, its interval over prompts
    assert row["gold_delta"] == pytest.approx(1 / 3) and row["gold_delta_lo"] < 1 / 3 < row["gold_delta_hi"] <= 1.0
    assert res.row("sft/final").get("gold_delta") == 0.0
    smp = [x for x in res.samples if x["label"] == "ppo/final"]
    assert [(x["prompt_index"], x["sample"]) for x in smp[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert smp[-1]["gold_outcome"] == 0.0 and smp[0]["gold_score"] == 1.0
    assert per_prompt([1, 0, 0, 1, 1, 1], 3) == [pytest.approx(1 / 3), 1.0] and per_prompt([1, 2], 1) == [1, 2]


def test_samples_need_sampling():
    from chatforge.eval.evaluate import EvalSettings

    with pytest.raises(ConfigError, match="temperature > 0"):
        EvalSettings(samples=4).validate()
    EvalSettings(samples=4, temperature=0.7).validate()


# ---------------------------------------------------------------- the split
def _prefs(path: Path) -> list[tuple]:
    return [(r["meta"].get("source"), r["meta"].get("line"), r["meta"].get("id"))
            for r in map(json.loads, path.read_text().splitlines())]


def test_gold_split_is_disjoint_and_deterministic(tmp_path):
    def split(out: str, *extra: str) -> tuple[list, list]:
        recipe, _ = load_recipe(TINY, [f"out={tmp_path / out}", "gold.fraction=0.5", GOLD_STAGES, *extra])
        run_data_stage(recipe, tmp_path / out, lambda m: None)
        d = tmp_path / out / "data"
        return _prefs(d / "preferences.jsonl"), _prefs(d / "preferences_gold.jsonl")

    recipe, _ = load_recipe(TINY, [f"out={tmp_path / 'all'}"])
    run_data_stage(recipe, tmp_path / "all", lambda m: None)
    everything = _prefs(tmp_path / "all" / "data" / "preferences.jsonl")
    assert not (tmp_path / "all" / "data" / "preferences_gold.jsonl").exists()

    proxy, gold = split("a")
    assert len(set(proxy)) == len(proxy) and not set(proxy) & set(gold)          # disjoint, by record
    assert sorted(proxy + gold) == sorted(everything)                           # nothing lost
    assert abs(len(gold) - len(everything) / 2) <= 1
    assert split("b") == (proxy, gold)                                          # deterministic
    assert split("c", "gold.seed=7")[1] != gold                                 # the seed decides
    assert abs(len(split("d", "gold.fraction=0.25")[1]) - len(everything) / 4) <= 1
    # RL's prompts come from the proxy part only
    prompts = [json.loads(x) for x in (tmp_path / "a" / "data" / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) > 0
    # a finished data stage split otherwise is an error, not a silent leak into the proxy RM
    recipe, _ = load_recipe(TINY, [f"out={tmp_path / 'all'}", "gold.fraction=0.5", GOLD_STAGES])
    (tmp_path / "all" / "data" / "DONE").write_text("x")
    with pytest.raises(ConfigError, match="gold.fraction: .* was split without a gold part"):
        stage_configs(recipe, tmp_path / "all", recipe.stages)


def test_gold_recipe_errors(tmp_path):
    out = f"out={tmp_path}"
    with pytest.raises(ConfigError, match=r"gold.fraction=1.5 is out of range"):
        load_recipe(TINY, [out, GOLD_STAGES, "gold.fraction=1.5"])
    with pytest.raises(ConfigError, match="stages do not list gold"):
        load_recipe(TINY, [out, "gold.fraction=0.5"])
    with pytest.raises(ConfigError, match="unknown key gold.'frac'"):
        load_recipe(TINY, [out, GOLD_STAGES, "gold.frac=0.5"])
    with pytest.raises(ConfigError, match="set eval.judge_url"):
        load_recipe(TINY, [out, "gold.judge=llm"])
    with pytest.raises(ConfigError, match="gold.fraction: the LLM judge"):
        load_recipe(TINY, [out, "gold.judge=llm", "gold.fraction=0.3", "eval.judge_url=http://x/v1",
                           "eval.judge_model=m"])
    with pytest.raises(ConfigError, match="eval.judge_url and eval.judge_model go together"):
        load_recipe(TINY, [out, "eval.judge_url=http://x/v1"])
    recipe, _ = load_recipe(TINY, [out, GOLD_STAGES, "gold.fraction=0.5", f"ppo.rewards=[rm:{tmp_path / 'gold'}]"])
    with pytest.raises(ConfigError, match="ppo.rewards: .* is the gold RM"):
        stage_configs(recipe, tmp_path, recipe.stages)
    recipe, _ = load_recipe(TINY, [out, GOLD_STAGES, "gold.rm.nokey=1"])
    with pytest.raises(ConfigError, match=r"gold.rm.*nokey"):
        stage_configs(recipe, tmp_path, recipe.stages)
    # the gold RM is the rm section's config, on the gold part, into gold/
    recipe, _ = load_recipe(TINY, [out, GOLD_STAGES, "gold.rm.max_steps=3"])
    cfg = stage_configs(recipe, tmp_path, recipe.stages)
    assert cfg["gold"].data == [str(tmp_path / "data" / "preferences_gold.jsonl")]
    assert cfg["gold"].out == str(tmp_path / "gold") and cfg["gold"].max_steps == 3
    assert cfg["gold"].loss == cfg["rm"].loss and cfg["rm"].max_steps == 10
    assert cfg["ppo"].rewards == [f"rm:{tmp_path / 'rm'}"]


# ---------------------------------------------------------------- the pipeline
@pytest.mark.slow
def test_tiny_pipeline_with_a_gold_rm(tmp_path, capsys):
    from chatforge.cli import main

    out = tmp_path / "p"
    args = ["pipeline", str(TINY), f"out={out}", GOLD_STAGES, "gold.fraction=0.5",
            "sft.max_steps=2", "sft.eval_every=2", "sft.save_every=2", "rm.max_steps=2", "rm.eval_every=2",
            "rm.save_every=2", "ppo.max_steps=2", "ppo.save_every=1", "eval.max_prompts=3", "eval.max_new_tokens=8"]
    assert main(args) == 0
    capsys.readouterr()
    for stage in ("data", "sft", "rm", "gold", "ppo", "eval"):
        assert (out / stage / "DONE").exists(), stage
    assert (out / "gold" / "model").is_dir()
    assert "preferences_gold.jsonl" in (out / "gold" / "config.yaml").read_text()
    assert "preferences_gold" not in (out / "rm" / "config.yaml").read_text()
    ppo_cfg = (out / "ppo" / "config.yaml").read_text()
    assert str(out / "gold") not in ppo_cfg and "preferences_gold" not in ppo_cfg   # RL never saw it
    assert f"rm:{out / 'rm'}" in ppo_cfg
    data = json.loads((out / "eval" / "eval.json").read_text())
    assert data["gold"] == "rm" and data["selection"] == "gold_win_rate"
    rows = {r["label"]: r for r in data["rows"]}
    ppo = [r for r in rows.values() if r["run"] == "ppo"]
    assert len(ppo) == 2 and all(r["gold_score"] is not None and r["rm_score"] is not None for r in ppo)
    assert all(r["start"] in rows and rows[r["start"]]["run"] == "sft" for r in ppo)   # the start is a row
    assert rows[ppo[0]["start"]]["start"] == "base"                                    # and SFT's start, the base
    assert all(isinstance(r["refusal_rate"], float) for r in rows.values())
    md = (out / "report.md").read_text()
    assert (out / "overoptimisation.png").exists() and "overoptimisation.png" in md
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert all(f"| {c} |" in header for c in ("RM", "gold", "gold win", "refuse"))
    assert "(final, baseline, start)" in md                                           # sft's row is ppo's start
    if data["warnings"]:  # warnings come first, above the table
        assert md.index("## Warnings") < md.index("## Checkpoints")

"""The whole pipeline on the tiny recipe: every stage runs, artefacts exist, metrics are
finite, and a second run skips every finished stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from chatforge.cli import main
from chatforge.config import ConfigError
from chatforge.pipeline import load_recipe, stage_config, stage_inputs

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def _finite_numbers(obj) -> list[float]:
    out = []
    if isinstance(obj, dict):
        for v in obj.values():
            out += _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _finite_numbers(v)
    elif isinstance(obj, float):
        out.append(obj)
    return out


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["pipeline", str(TINY), f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "chatforge chat" in printed

    for stage in ("data", "sft", "rm", "ppo", "dpo", "eval"):
        assert (out / stage / "DONE").exists(), stage
    for stage in ("sft", "rm", "ppo", "dpo"):
        run = out / stage
        assert (run / "model").is_dir() and (run / "config.yaml").exists()
        rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        assert rows, f"{stage} logged no metrics"
        for r in rows:
            for k, v in r.items():
                if isinstance(v, float):
                    assert math.isfinite(v), f"{stage} metric {k} = {v}"
        summary = json.loads((run / "summary.json").read_text())
        assert all(math.isfinite(v) for v in _finite_numbers(summary)), stage
    # the canonical data the stages trained on
    assert sum(1 for _ in open(out / "data" / "sft.jsonl")) > 40
    assert sum(1 for _ in open(out / "data" / "preferences.jsonl")) > 50
    # evaluation covers every checkpoint of every policy run, with finite figures
    rows = [json.loads(l) for l in (out / "eval" / "eval.jsonl").read_text().splitlines() if l.strip()]
    labels = {r.get("label", r.get("name", "")) for r in rows}
    assert any(l.startswith("ppo") for l in labels) and any(l.startswith("dpo") for l in labels)
    html = (out / "report.html").read_text()
    assert "<table" in html and "http://" not in html.replace("http://www.w3.org", "")
    assert "| model |" in (out / "report.md").read_text()
    # chat defaults measured for the recommended model, recorded in its run folder, read by the chat
    from chatforge.chat.session import run_sampling_defaults

    rec = json.loads((out / "eval" / "chat_defaults.json").read_text())
    assert len(rec["candidates"]) >= 3 and rec["judge"] and rec["prompts"] > 0
    got = run_sampling_defaults(rec["model"])
    assert got is not None and got["temperature"] == rec["settings"]["temperature"]

    # a second run skips every finished stage
    assert main(["pipeline", str(TINY), f"out={out}"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 6


def test_recipe_errors_fail_before_any_stage(tmp_path):
    with pytest.raises(ConfigError, match="ppo"):
        recipe, _ = load_recipe(TINY, [f"out={tmp_path}", "ppo.not_a_key=1"])
        root = Path(recipe.out)
        inputs = stage_inputs(recipe, root)
        stage_config(recipe, "ppo", root, **inputs["ppo"])
    assert main(["pipeline", str(TINY), f"out={tmp_path / 'x'}", "stages=[sft,nope]"]) == 2
    assert main(["pipeline", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(ConfigError, match=r"eval.max_checkpoints=-1 is out of range"):
        load_recipe(TINY, [f"out={tmp_path}", "eval.max_checkpoints=-1"])
    assert not (tmp_path / "x" / "sft").exists()


def test_shipped_recipes_parse():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe, _ = load_recipe(path)
        root = Path("/nonexistent-run-root")
        inputs = stage_inputs(recipe, root)
        for stage in ("sft", "rm", "ppo", "dpo"):
            if stage in recipe.stages:
                stage_config(recipe, stage, root, **inputs[stage])


def test_budget_divides_the_wall_time_left_among_the_stages_left():
    from chatforge.pipeline import BudgetSpec, allot_minutes

    b = BudgetSpec(minutes=10, shares={"sft": 1, "rm": 1, "ppo": 2, "eval": 1})
    left = ["sft", "rm", "ppo", "eval"]
    # 10 min left, sft weighs 1 of 5 -> 2 min of wall, 30 % of it outside the loop -> 1.4 min of training
    assert allot_minutes(b, "sft", left, 600, 0.3) == pytest.approx(1.4)
    # a stage that ran over leaves less to the next ones: ppo gets 2/3 of what is left
    assert allot_minutes(b, "ppo", ["ppo", "eval"], 180, 0.0) == pytest.approx(2.0)
    assert allot_minutes(b, "ppo", ["ppo", "eval"], -30, 0.0) == b.min_minutes  # over budget: the floor
    with pytest.raises(ConfigError, match="budget.shares"):
        load_recipe(TINY, ["budget.shares.nope=1"])


def test_eval_price_counts_models_prompts_and_chat_defaults_answers():
    from types import SimpleNamespace as NS

    from chatforge.pipeline import PER_CHAT_ANSWER, PER_MODEL, eval_cost_s, expected_checkpoints

    # the base model's part (done) is the unit: 3 models -> 3 x PER_MODEL parts, less the one done
    assert eval_cost_s(20.0, 3, 24, 0) == pytest.approx(20.0 * (3 * PER_MODEL - 1))
    # chat defaults: an answer costs PER_CHAT_ANSWER of a base answer (base part / prompts)
    assert eval_cost_s(20.0, 1, 24, 40) - eval_cost_s(20.0, 1, 24, 0) == pytest.approx(20 / 24 * PER_CHAT_ANSWER * 40)
    assert eval_cost_s(40.0, 3, 24, 40) == pytest.approx(2 * eval_cost_s(20.0, 3, 24, 40))  # a CPU half as fast
    assert expected_checkpoints(NS(max_steps=16, save_every=8)) == 2
    assert expected_checkpoints(NS(max_steps=10, save_every=4)) == 3   # 4, 8 and the final model at 10
    assert expected_checkpoints(NS(max_steps=4, save_every=6)) == 1    # the final model only
    assert expected_checkpoints(NS(max_steps=0, save_every=8)) == 4    # epochs: not known in steps


@pytest.mark.slow
def test_budget_keeps_the_priced_evaluation_back_and_reuses_its_base_part(tmp_path, capsys):
    out = tmp_path / "priced"
    assert main(["pipeline", str(TINY), f"out={out}", "stages=[data,sft,eval]", "budget.minutes=2",
                 "sft.max_steps=4", "eval.chat_defaults_prompts=2"]) == 0
    printed = capsys.readouterr().out
    t = json.loads((out / "timings.json").read_text())
    priced = t["budget"]["eval_priced_s"]
    assert priced is not None and priced > 0 and "evaluation priced at" in printed
    base_s = json.loads((out / "eval" / "price.json").read_text())["base_s"]
    assert priced > base_s  # the sft model's part, KL and scoring are still to come
    # the training stage divides what is left after the reserve, not the eval's share
    assert "left for sft after" in printed
    # the eval stage finds the base model's part in the cache: it is not evaluated twice
    eval_log = printed[printed.index("[eval] running"):]
    assert "eval: base:" not in eval_log and "eval: sft" in eval_log
    rows = [json.loads(l) for l in (out / "eval" / "eval.jsonl").read_text().splitlines() if l.strip()]
    assert {"base", "sft"} <= {r["label"].split("/")[0] for r in rows}
    # a pipeline restarted before its eval prices again from the recorded time (the part is cached)
    from chatforge.pipeline import load_recipe, price_eval, stage_configs

    recipe = load_recipe(TINY, [f"out={out}", "stages=[data,sft,eval]", "sft.max_steps=4",
                                "eval.chat_defaults_prompts=2"])[0]
    stages = list(recipe.stages)
    again = price_eval(recipe, out, stages, stage_configs(recipe, out, stages), lambda *_: None)
    assert again == pytest.approx(priced, abs=0.1)


@pytest.mark.slow
def test_budget_caps_a_stage_that_would_run_longer(tmp_path, capsys):
    out = tmp_path / "b"
    # 100000 SFT steps cannot finish: the 0.6-minute pipeline budget must stop SFT and leave time for the RM
    assert main(["pipeline", str(TINY), f"out={out}", "stages=[data,sft,rm]", "budget.minutes=0.6",
                 "sft.max_steps=100000", "sft.eval_every=100000", "sft.save_every=100000", "rm.max_steps=2"]) == 0
    printed = capsys.readouterr().out
    assert "budget:" in printed and "of a 0.6-minute budget" in printed
    t = json.loads((out / "timings.json").read_text())
    sft_minutes = t["budget"]["allotted_loop_minutes"]["sft"]
    assert 0 < sft_minutes < 0.6
    summary = json.loads((out / "sft" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["train_time_s"] <= 60 * sft_minutes + 5
    assert (out / "rm" / "DONE").exists()

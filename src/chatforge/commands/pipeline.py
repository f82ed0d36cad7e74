"""``chatforge pipeline RECIPE.yaml [key=value ...] [--only STAGE ...] [--dry-run]``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="run data -> SFT -> RM (+ gold RM) -> PPO/DPO -> eval -> report from one recipe",
        description="Run a whole recipe. Finished stages are skipped, interrupted ones resume. "
                    "Recipes: recipes/demo.yaml (default demo), tiny.yaml (CI), malay.yaml, hh-rlhf.yaml, gpu.yaml, "
                    "arith.yaml (verifiable rewards).",
    )
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. out=runs/x sft.max_steps=20")
    p.add_argument("--only", action="append", choices=["data", "sft", "rm", "gold", "ppo", "dpo", "eval"],
                   help="run only this stage (repeatable); inputs come from earlier stages' folders")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe and every stage's config, print the plan, run nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from chatforge.eval.metrics import direction
    from chatforge.pipeline import final_policy, load_recipe, run_pipeline

    recipe, _ = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        return dry_run(recipe, args.only)
    t0 = time.time()
    root = run_pipeline(recipe, only=args.only)
    wall = time.time() - t0
    print(f"\npipeline finished in {wall / 60:.1f} min -> {root}")
    for name in ("report.html", "report.md"):
        if (root / name).exists():
            print(f"  report: {root / name}")
    chat_target = None
    summary = root / "eval" / "eval.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        rows = {r["label"]: r for r in data.get("rows", [])}
        for w in data.get("warnings", []):
            print(f"  warning: {w}")
        best = data.get("best", {}).get("overall")
        for label, r in rows.items():
            if r.get("win_rate") is not None and not r.get("baseline") and r.get("final"):
                gold = f", gold win rate {r['gold_win_rate']:.2f}" if r.get("gold_win_rate") is not None else ""
                if r.get("gold_delta") is not None and r.get("gold_delta_lo") is not None:
                    lo, hi = r["gold_delta_lo"], r["gold_delta_hi"]
                    word = direction(lo, hi)
                    verdict = f"{word} by gold" if word else "within noise"
                    gold += f", gold score {r['gold_delta']:+.3f} [{lo:+.3f}, {hi:+.3f}] vs SFT ({verdict})"
                kl = r.get("kl") if r.get("kl") is not None else float("nan")
                print(f"  {label}: RM win rate vs SFT {r['win_rate']:.2f}{gold}, KL {kl:.2f}, "
                      f"refusals {r.get('refusal_rate') or 0:.0%}")
        if best in rows:
            chat_target = rows[best].get("chat")
            print(f"  best checkpoint ({data.get('selection')}): {best}")
    pol = chat_target or final_policy(Path(root))
    if pol is not None:
        print(f"\nchat with the result:\n  chatforge chat {pol}")
    return 0


def dry_run(recipe, only) -> int:
    """Every check ``run_pipeline`` makes before its first stage, and the plan."""
    from pathlib import Path

    from chatforge.models.load import check_model_exists
    from chatforge.pipeline import stage_configs

    check_model_exists(recipe.model)
    root = Path(recipe.out)
    stages = [s for s in recipe.stages if not only or s in only]
    configs = stage_configs(recipe, root, stages)
    if "ppo" in configs:  # a rule reward must import now, not after the earlier stages
        from chatforge.train.rewards import load_function, parse_reward_spec

        for spec in map(parse_reward_spec, configs["ppo"].rewards):
            if spec.kind == "fn":
                load_function(spec.target)
    print(f"recipe ok: model {recipe.model}, out {root}, stages {', '.join(stages)}")
    if recipe.data.arith is not None:
        a = recipe.data.arith
        print(f"  data: arith {a.tier}, {a.train} train + {a.heldout} held-out problems")
    for name, cfg in configs.items():
        extra = f", algo {cfg.algo}, rewards {', '.join(cfg.rewards)}" if name == "ppo" else ""
        print(f"  {name}: model {cfg.model}{extra}, max_steps {cfg.max_steps}, max_minutes {cfg.max_minutes}")
    if recipe.budget.minutes:
        b = recipe.budget
        priced = "eval" in stages
        parts = ", ".join(f"{s} {b.weight(s):g}" for s in stages if not (priced and s == "eval"))
        print(f"  budget: {b.minutes:g} min wall for the whole pipeline"
              + ("; the evaluation is priced first (its base model's part, timed) and kept back" if priced else "")
              + f"; the rest divided by weight ({parts}) among the stages still to run; each training stage's "
                f"max_minutes is capped at its part")
    if "eval" in stages and recipe.eval.tasks:
        t = recipe.eval.arith
        arith = f" (arith: {', '.join(t.tiers)}, n {t.n}, {t.max_new_tokens} tokens)" if "arith" in recipe.eval.tasks else ""
        print(f"  eval: tasks {', '.join(recipe.eval.tasks)}{arith}")
    return 0

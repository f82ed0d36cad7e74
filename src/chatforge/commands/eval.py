"""``chatforge eval``: evaluate every checkpoint of one or more runs on held-out data.

    chatforge eval RUN... [--baseline RUN] [--prompts FILE] [--heldout FILE] [--rm RUN] [--gold RUN|judge]
                   [--out DIR] [--max-prompts N] [--max-new-tokens N]
                   [--judge-url URL --judge-model NAME] [--report]
    chatforge eval RUN... --task arith [--tier add2 ...] [--n 500] [--baseline RUN] [--out DIR]

RUN is a run folder (all its checkpoints and its final model are evaluated) or a model
name (``smollm2``, ``tiny``, a model directory); ``label=RUN`` names it in the table. Prints
one row per checkpoint, the best checkpoint of each run and a warning for every checkpoint
worse than an earlier one beyond noise. ``--rm`` is the proxy (the RM that RL optimised);
``--gold`` a gold judge RL never saw: a second RM (e.g. the pipeline's ``gold/``, trained on a
disjoint part of the preferences), or ``judge`` for the LLM judge of ``--judge-url``. With a
gold judge the best checkpoint is chosen by gold, and the warnings say when the proxy rose
while gold fell (over-optimisation). The model each run began from is always a row; warnings
also name jumps vs that start in refusal, loop and missing end-of-turn rates and in length.
Writes ``eval.json``, ``eval.jsonl``,
``samples.jsonl`` (and with ``--report`` ``report.html`` / ``report.md``) into ``--out``.

``--task arith`` scores every target on the fixed held-out arithmetic problems instead
(:mod:`chatforge.eval.tasks`): greedy, 16 new tokens by default, exact match of the first
number, per tier with a 95 % Wilson interval, and each target's paired difference to the
baseline (``--baseline``, else the first RUN). Writes ``arith.json`` and
``arith_responses.jsonl`` into ``--out``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_LABELLED = re.compile(r"^([A-Za-z0-9_.\-]+)=(.+)$")


def add_parser(subparsers) -> None:
    from chatforge.data.arith import TIERS
    from chatforge.eval.tasks import TASKS

    p = subparsers.add_parser("eval", help="evaluate checkpoints: perplexity, RM win rate, KL, degeneration",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders or model names (label=RUN to name one)")
    p.add_argument("--baseline", metavar="RUN", help="win rates are measured against this model's responses")
    p.add_argument("--prompts", metavar="FILE", help="held-out prompts (default: the held-out conversations' prompts)")
    p.add_argument("--heldout", metavar="FILE", help="held-out conversations for perplexity (default: the run's eval_data)")
    p.add_argument("--rm", metavar="RUN", help="reward model (run folder or directory) for RM score and win rate: "
                   "the proxy, the RM that RL optimised")
    p.add_argument("--gold", metavar="RUN|judge",
                   help="gold judge RL never saw: a second reward model (run folder or directory; best checkpoint "
                        "by its win rate / score), or 'judge' for the LLM judge of --judge-url (a folder named judge: "
                        "./judge)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: eval/ beside the first run folder)")
    p.add_argument("--max-prompts", type=int, default=32, metavar="N", help="held-out prompts used (default 32)")
    p.add_argument("--max-heldout", type=int, default=100, metavar="N",
                   help="held-out conversations for perplexity (default 100)")
    p.add_argument("--max-checkpoints", type=int, default=0, metavar="N",
                   help="evaluate N evenly spaced checkpoints per run, the last always (default 0: all)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="response budget (default 128; --task arith: 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples with --seed")
    p.add_argument("--samples", type=int, default=1, metavar="N",
                   help="responses per prompt (needs --temperature > 0): scores and win rates over all of them, "
                        "intervals over prompts (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, metavar="N", help="prompts decoded together (default 32, also for --task arith)")
    p.add_argument("--gen-dtype", choices=["auto", "fp32", "bf16"],
                   help="weights for decoding (default auto: bf16 on CPUs with native bf16; perplexity and KL stay "
                        "fp32; --task arith: fp32, so figures do not depend on the CPU)")
    p.add_argument("--judge-url", metavar="URL", help="OpenAI-compatible endpoint of an LLM judge (e.g. http://host:8000/v1)")
    p.add_argument("--judge-model", metavar="NAME", help="model name sent to the judge")
    p.add_argument("--report", action="store_true", help="also write report.html / report.md into --out")
    t = p.add_argument_group("task yardsticks (--task)")
    t.add_argument("--task", choices=TASKS, help="score on a task with checkable answers instead (arith: held-out "
                   "arithmetic problems, exact match)")
    t.add_argument("--tier", action="append", choices=TIERS,
                   help=f"arith tier (repeatable; default all: {', '.join(TIERS)})")
    t.add_argument("--n", type=int, metavar="N", help="held-out problems per tier (default 500)")
    p.set_defaults(func=run)


def default_out(runs: list[str]) -> Path:
    for r in runs:
        p = Path(r)
        if p.is_dir() and ((p / "checkpoints").is_dir() or (p / "DONE").exists()):
            return p.parent / "eval"
    return Path("eval")


def run(args) -> int:
    from chatforge.errors import ConfigError

    if bool(args.judge_url) != bool(args.judge_model):
        raise ConfigError("--judge-url and --judge-model go together")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be an integer >= 1, got {args.batch_size}")
    runs: dict[str, str] = {}
    for r in args.runs:
        m = _LABELLED.match(r)
        lab, path = (m.group(1), m.group(2)) if m and not Path(r).exists() else (Path(r).name or r, r)
        while lab in runs:
            lab += "'"
        runs[lab] = path
    if args.task:
        return run_task(args, runs)
    if args.tier or args.n is not None:
        raise ConfigError("--tier and --n are options of --task arith")

    from chatforge.eval.evaluate import EvalSettings, evaluate_runs
    from chatforge.eval.judge import Judge
    from chatforge.eval.report import text_table, write_report

    settings = EvalSettings(max_prompts=args.max_prompts, max_heldout=args.max_heldout,
                            max_new_tokens=_given(args.max_new_tokens, 128), temperature=args.temperature,
                            samples=args.samples, seed=args.seed, gen_batch_size=_given(args.batch_size, 32),
                            gen_dtype=args.gen_dtype or "auto")
    judge = Judge(args.judge_url, args.judge_model, api_key=os.environ.get("CHATFORGE_JUDGE_KEY")) \
        if args.judge_url else None
    out = Path(args.out) if args.out else default_out(list(runs.values()))
    res = evaluate_runs(runs, baseline=args.baseline, prompts=args.prompts, heldout=args.heldout, rm=args.rm,
                        judge=judge, out=out, settings=settings, max_checkpoints=args.max_checkpoints, gold=args.gold)
    print(text_table(res))
    for run_, lab in res.best.items():
        if run_ != "overall":
            print(f"best of {run_}: {lab} ({res.selection} {_value(res, lab)})")
    if "overall" in res.best:
        print(f"best overall: {res.best['overall']}: chatforge chat {res.row(res.best['overall'])['chat']}")
    for w in res.warnings:
        print(f"WARNING: {w}")
    for n in res.notes:
        print(f"note: {n}")
    if args.report:
        from chatforge.eval.evaluate import is_run_folder

        stages = {lab: p for lab, p in runs.items() if is_run_folder(Path(p))}
        html, md = write_report(out, stages, res, res.samples, title="chatforge eval")
        print(f"report: {html}")
    print(f"results: {out / 'eval.json'}, {out / 'samples.jsonl'}")
    return 0


def run_task(args, runs: dict[str, str]) -> int:
    """``--task arith``: the yardstick on every target, a table, ``arith.json``."""
    from chatforge.errors import ConfigError
    from chatforge.eval.tasks import ArithSettings, evaluate_arith, text_table

    unused = [f"--{k.replace('_', '-')}" for k in ("prompts", "heldout", "rm", "gold", "judge_url", "judge_model")
              if getattr(args, k)] + (["--report"] if args.report else [])
    if args.temperature:
        unused.append("--temperature")
    if args.samples != 1:
        unused.append("--samples")
    if unused:
        raise ConfigError(f"--task {args.task} decodes greedily on its own problems: {', '.join(unused)} do not apply")
    settings = ArithSettings(n=500 if args.n is None else args.n, max_new_tokens=_given(args.max_new_tokens, 16),
                             batch_size=_given(args.batch_size, 32), gen_dtype=args.gen_dtype or "fp32")
    if args.tier:
        settings.tiers = list(args.tier)
    try:
        settings.validate()
    except ConfigError as e:
        raise ConfigError(f"--task {args.task}: --{str(e).replace('_', '-')}") from None
    out = Path(args.out) if args.out else default_out(list(runs.values()))
    res = evaluate_arith(runs, settings, baseline=args.baseline, out=out, max_checkpoints=args.max_checkpoints)
    print(text_table(res))
    for n in res.notes:
        print(f"note: {n}")
    print(f"results: {out / 'arith.json'}, {out / 'arith_responses.jsonl'}")
    return 0


def _given(value, default):
    """An option's value, or its per-task default when it was not given."""
    return default if value is None else value


def _value(res, label: str) -> str:
    v = res.row(label).get(res.selection) if res.selection else None
    return "-" if v is None else f"{v:.4g}"

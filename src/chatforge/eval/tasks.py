"""Task yardsticks with checkable answers: ``chatforge eval RUN... --task arith``.

``arith`` scores a model on the fixed held-out arithmetic problems of
:mod:`chatforge.data.arith` (the same problems for every model, every run, every seed):

* **decoding**: greedy, ``max_new_tokens`` (16 by default) through the engine, batched, in
  fp32 by default so that a figure does not depend on the CPU's bf16 support
  (``gen_dtype=auto`` is faster on CPUs with native bf16);
* **accuracy**: exact match of the response's FINAL number with the answer (the rule of
  :func:`chatforge.data.arith.final_number`, shared with the RL reward
  ``fn:chatforge.train.reward_fns:arith_exact``), per tier, with a 95 % **Wilson** interval
  (:func:`wilson_interval`: right near 0 and 1, where the normal interval leaves [0, 1]);
* **number only**: the share of responses that are a number and nothing else (the format
  the prompt asks for); **no EOS**: the share cut by the token budget; **anywhere**: the
  share with the answer among *any* of its numbers (a loose upper bound that separates
  "cannot add" from "does not answer in the asked format": "70 * 3 = 210" is wrong by the
  final-number rule, right here);
* a few **examples** per tier, and each problem's 0/1 outcome (``correct``) in the JSON, so
  that two models can be compared later on the same problems.

:func:`paired_difference` compares two models on the same problems (before/after RL): the
accuracy difference with a 95 % interval from the paired (McNemar) standard error, and the
exact McNemar p-value. Only the problems one model gets right and the other wrong count,
so the interval is much narrower than two independent intervals would suggest.

The statistics here are pure (no torch); models are loaded one at a time inside
:func:`evaluate_arith`, each target (every checkpoint of a run folder, or a model name)
through :func:`chatforge.models.load.load`, and results are cached under ``OUT/cache/``
like :mod:`chatforge.eval.evaluate`'s.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from chatforge.data import arith
from chatforge.errors import ConfigError
from chatforge.eval import metrics as M

TASKS = ("arith",)
Z95 = 1.959963984540054
CACHE_TAG = "arith-1"  # in every cache key: bump when the scoring rule changes (prompts are in the key)


# ---------------------------------------------------------------- statistics (pure)
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion k/n: ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²))
    / (1 + z²/n)``. (None, None) when n == 0."""
    if n <= 0:
        return None, None
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    den = 1 + z * z / n
    lo = 0.0 if k == 0 else max(0.0, (centre - half) / den)  # exact ends: no 4e-19 from rounding
    hi = 1.0 if k == n else min(1.0, (centre + half) / den)
    return lo, hi


def paired_difference(before: Sequence[float], after: Sequence[float], z: float = Z95) -> dict[str, Any]:
    """Accuracy of ``after`` minus ``before`` on the same problems (0/1 outcomes, same order).

    ``gained`` = problems only ``after`` gets right, ``lost`` = only ``before``; the
    difference is ``(gained - lost) / n`` and its paired standard error
    ``sqrt(gained + lost - (gained - lost)² / n) / n`` gives the interval ``diff ± z se``.
    ``p_value``: exact two-sided McNemar test (binomial on the gained+lost discordant
    problems, p = 1/2)."""
    if len(before) != len(after):
        raise ValueError(f"paired_difference: {len(before)} vs {len(after)} outcomes (not the same problems)")
    n = len(before)
    if n == 0:
        return {"n": 0, "diff": None, "lo": None, "hi": None, "gained": 0, "lost": 0, "p_value": None}
    gained = sum(1 for a, b in zip(before, after) if not a and b)
    lost = sum(1 for a, b in zip(before, after) if a and not b)
    diff = (gained - lost) / n
    se = math.sqrt(max(0.0, gained + lost - (gained - lost) ** 2 / n)) / n
    return {"n": n, "diff": diff, "lo": max(-1.0, diff - z * se), "hi": min(1.0, diff + z * se), "se": se,
            "gained": gained, "lost": lost, "p_value": mcnemar_p(gained, lost)}


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value: P(X <= min) * 2 for X ~ Binomial(gained + lost, 1/2)."""
    m = gained + lost
    if m == 0:
        return 1.0
    k = min(gained, lost)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return min(1.0, 2 * tail)


# ---------------------------------------------------------------- settings
@dataclass
class ArithSettings:
    """How ``--task arith`` measures. Every field that changes a number is in the cache key."""

    tiers: list[str] = field(default_factory=lambda: list(arith.TIERS))
    n: int = 500                   # held-out problems per tier (the first n of the fixed pool)
    max_new_tokens: int = 16       # the answer budget
    batch_size: int = 32
    gen_dtype: str = "fp32"        # fp32 | bf16 | auto (bf16 on CPUs with native bf16)
    examples: int = 5              # responses shown per tier (the first ones, right or wrong)

    def validate(self) -> "ArithSettings":
        """Raise :class:`ConfigError` naming the first bad field (``key: reason``)."""
        if not self.tiers:
            raise ConfigError(f"tiers: name at least one of {', '.join(arith.TIERS)}")
        for t in self.tiers:
            if t not in arith.TIERS:
                raise ConfigError(f"tiers: unknown tier {t!r}; tiers are {', '.join(arith.TIERS)}")
        if len(set(self.tiers)) != len(self.tiers):
            raise ConfigError(f"tiers: a tier is listed twice in {self.tiers}")
        for k, lo in (("n", 1), ("max_new_tokens", 1), ("batch_size", 1), ("examples", 0)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{k}: must be an integer >= {lo}, got {v!r}")
        too_many = [t for t in self.tiers if self.n > arith.HELDOUT_POOL[t]]
        if too_many:
            raise ConfigError(f"n: {self.n} is more than the held-out pool of {too_many[0]} "
                              f"({arith.HELDOUT_POOL[too_many[0]]} problems)")
        if self.gen_dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"gen_dtype: must be auto, fp32 or bf16, got {self.gen_dtype!r}")
        return self


# ---------------------------------------------------------------- one model, one tier
def score_arith(problems: Sequence[Any], responses: Sequence[dict[str, Any]], examples: int = 5) -> dict[str, Any]:
    """Pure scoring of responses (``{"text", "finish_reason", "n_tokens"}``) to problems
    (Prompt records with ``meta["answer"]``, or solvable prompt text)."""
    if len(problems) != len(responses):
        raise ValueError(f"score_arith: {len(problems)} problems, {len(responses)} responses")
    answers = list(arith.iter_answers(list(problems)))
    correct = [1 if arith.is_correct(r["text"], a) else 0 for r, a in zip(responses, answers)]
    n, k = len(correct), sum(correct)
    lo, hi = wilson_interval(k, n)
    only = [arith.only_number(r["text"]) for r in responses]
    anywhere = [arith.answer_anywhere(r["text"], a) for r, a in zip(responses, answers)]
    out: dict[str, Any] = {
        "n": n, "n_correct": k, "accuracy": k / n if n else None, "lo": lo, "hi": hi,
        "number_only": sum(only) / n if n else None,
        "anywhere": sum(anywhere) / n if n else None,
        "no_eos": sum(r.get("finish_reason") == "length" for r in responses) / n if n else None,
        "len_tokens": sum(r.get("n_tokens", 0) for r in responses) / n if n else None,
        "correct": correct,
        "examples": [{"question": p.prompt[-1]["content"], "answer": a, "response": r["text"], "correct": bool(c)}
                     for p, a, r, c in list(zip(problems, answers, responses, correct))[:examples]],
    }
    return out


def answer_arith(model, tokenizer, problems: Sequence[Any], settings: ArithSettings, template: str = "auto",
                 engine: Any = None) -> list[dict[str, Any]]:
    """Greedy responses to every problem, in order. ``engine``: anything with the engine's
    ``generate(prompt_ids, SamplingConfig) -> [Completion]`` (default: an
    :class:`~chatforge.generate.engine.Engine` on ``model``; tests pass a fake one)."""
    from chatforge.data.tokenize import encode_prompt
    from chatforge.generate.engine import Engine
    from chatforge.generate.sampling import SamplingConfig

    engine = engine or Engine(model, tokenizer, template=template)
    cfg = SamplingConfig(max_new_tokens=settings.max_new_tokens, temperature=0.0)
    pids = [list(encode_prompt(tokenizer, p.prompt, template=template)) for p in problems]
    out: list[dict[str, Any]] = []
    for b in range(0, len(pids), settings.batch_size):
        for c in engine.generate(pids[b:b + settings.batch_size], cfg):
            out.append({"text": c.text, "finish_reason": c.finish_reason, "n_tokens": len(c.token_ids)})
    return out


def run_arith(model, tokenizer, problems: Sequence[Any], settings: ArithSettings | None = None,
              template: str = "auto", engine: Any = None) -> dict[str, Any]:
    """:func:`answer_arith` then :func:`score_arith`, plus every response (``responses``)."""
    s = (settings or ArithSettings()).validate()
    resp = answer_arith(model, tokenizer, problems, s, template, engine)
    res = score_arith(problems, resp, s.examples)
    res["responses"] = [r["text"] for r in resp]
    return res


# ---------------------------------------------------------------- many models
@dataclass
class ArithResult:
    rows: list[dict[str, Any]]          # one per (target, tier)
    comparisons: list[dict[str, Any]]   # each target vs the baseline, per tier (paired)
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    out: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"task": "arith", "settings": self.settings, "rows": self.rows, "comparisons": self.comparisons,
                "notes": self.notes}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate_arith(runs: Mapping[str, str], settings: ArithSettings | None = None, baseline: str | None = None,
                   out: str | Path | None = None, max_checkpoints: int = 0,
                   log: Callable[[str], None] = _log, compare_to: Sequence[str] = ()) -> ArithResult:
    """The arith task on every target of ``runs`` (label -> run folder / model name /
    checkpoint; a run folder gives every checkpoint and its final model, ``max_checkpoints``
    of them when > 0). Each target is compared with ``baseline`` (a label of ``runs`` or a
    model, evaluated first), else with the first target; and also with the final model of
    each run labelled in ``compare_to`` (e.g. ``sft``: did RL improve on the model it
    started from, not only on the base?). Writes ``arith.json`` and
    ``arith_responses.jsonl`` into ``out`` when given."""
    from chatforge.eval.evaluate import Cache, identity, key_of, targets_of
    from chatforge.eval.measure import decoding_copy
    from chatforge.models.load import load

    s = (settings or ArithSettings()).validate()
    runs = dict(runs)
    if not runs:
        raise ConfigError("no run or model to evaluate")
    if baseline is not None and baseline not in runs:
        runs = {"baseline": baseline, **runs} if "baseline" not in runs else {f"baseline-{baseline}": baseline, **runs}
        baseline = next(iter(runs))
    targets, notes = [], []
    for lab, path in runs.items():
        ts, n = targets_of(lab, path, None, max_checkpoints)
        targets += ts
        notes += n
    of_base = [t for t in targets if t.run == baseline]
    base = of_base[-1] if of_base else targets[0]  # a baseline run folder: its final model
    if base is not targets[0]:
        targets.remove(base)
        targets.insert(0, base)
    outp = Path(out) if out is not None else None
    cache = Cache(outp / "cache" if outp is not None else None)
    problems = {t: arith.records(t, "heldout", s.n) for t in s.tiers}
    gen_key = {k: v for k, v in asdict(s).items() if k not in ("tiers", "batch_size", "examples")}
    log(f"arith: {len(targets)} model(s) x {', '.join(s.tiers)} ({s.n} held-out problems each), "
        f"greedy, {s.max_new_tokens} tokens")

    results: dict[tuple[str, str], dict[str, Any]] = {}
    for t in targets:
        keys = {tier: key_of(CACHE_TAG, identity(t.path), t.template, [p.prompt for p in problems[tier]], gen_key)
                for tier in s.tiers}
        todo = []
        for tier in s.tiers:
            hit = cache.get("arith", keys[tier])
            if hit is not None:
                results[t.label, tier] = hit
            else:
                todo.append(tier)
        if not todo:
            continue
        t0 = time.time()
        model, tok = load(t.path, dtype="fp32", merge_adapter=True)
        model.eval()
        dec = decoding_copy(model, s.gen_dtype)
        for tier in todo:
            res = run_arith(dec, tok, problems[tier], s, t.template)
            results[t.label, tier] = cache.put("arith", keys[tier], res)
            log(f"arith: {t.label} {tier}: {res['accuracy']:.3f} [{res['lo']:.3f}-{res['hi']:.3f}] "
                f"({time.time() - t0:.0f}s)")
        del model, tok, dec
        gc.collect()

    refs = [base] + [[t for t in targets if t.run == lab][-1] for lab in compare_to
                     if lab != base.run and any(t.run == lab for t in targets)]
    rows, comparisons = [], []
    for t in targets:
        for tier in s.tiers:
            r = results[t.label, tier]
            rows.append({"label": t.label, "run": t.run, "checkpoint": t.name, "path": t.path, "step": t.step,
                         "final": t.final, "baseline": t is base, "tier": tier,
                         **{k: v for k, v in r.items() if k != "responses"}})
            for ref in refs:
                if t is base or t is ref or (ref is not base and t.run == ref.run):
                    continue  # a reference run's own checkpoints are not compared with its final model
                comparisons.append({"tier": tier, "baseline": ref.label, "label": t.label,
                                        **paired_difference(results[ref.label, tier]["correct"], r["correct"])})
    result = ArithResult(rows, comparisons, asdict(s), notes)
    if outp is not None:
        write_arith(result, results, problems, targets, outp)
    return result


def write_arith(result: ArithResult, results: dict, problems: dict, targets: list, out: Path) -> None:
    """``arith.json`` (rows, comparisons, settings) and ``arith_responses.jsonl`` (every answer)."""
    from chatforge.runs import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    result.out = out
    atomic_write_text(out / "arith.json", json.dumps(result.to_json(), indent=1, ensure_ascii=False) + "\n")
    lines = []
    for t in targets:
        for tier, probs in problems.items():
            r = results[t.label, tier]
            for p, text, ok in zip(probs, r["responses"], r["correct"]):
                lines.append(json.dumps({"label": t.label, "tier": tier, "id": p.meta["id"],
                                         "expression": p.meta["expression"], "answer": p.meta["answer"],
                                         "response": text, "correct": bool(ok)}, ensure_ascii=False) + "\n")
    atomic_write_text(out / "arith_responses.jsonl", "".join(lines))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def text_table(result: ArithResult) -> str:
    """model, tier, accuracy [95 % interval], n, number-only and no-EOS shares; then the
    paired differences to the baseline."""
    w = max([len("model")] + [len(r["label"]) for r in result.rows])
    lines = [f"{'model':<{w}}  {'tier':<8}  accuracy  95% interval       n  number-only  anywhere  no-EOS"]
    for r in result.rows:
        ci = f"[{_pct(r['lo'])}-{_pct(r['hi'])}]"
        lines.append(f"{r['label']:<{w}}  {r['tier']:<8}  {_pct(r['accuracy']):>8}  {ci:<15}  {r['n']:>4}  "
                     f"{_pct(r['number_only']):>11}  {_pct(r.get('anywhere')):>8}  {_pct(r['no_eos']):>6}")
    for ref in dict.fromkeys(c["baseline"] for c in result.comparisons):
        lines.append("")
        lines.append(f"paired on the same problems, vs {ref}:")
        for c in result.comparisons:
            if c["baseline"] != ref:
                continue
            d = "-" if c["diff"] is None else f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"
            p = "-" if c["p_value"] is None else f"{c['p_value']:.2g}"
            lines.append(f"  {c['label']:<{w}}  {c['tier']:<8}  {d}  gained {c['gained']}, lost {c['lost']}, "
                         f"McNemar p {p}")
    return "\n".join(lines)


def markdown_table(result: ArithResult) -> str:
    """The same table in Markdown (for a report)."""
    md = ["| model | tier | accuracy | 95% interval | n | number only | anywhere | no EOS |",
          "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in result.rows:
        md.append(f"| {r['label']} | {r['tier']} | {_pct(r['accuracy'])} | {_pct(r['lo'])}–{_pct(r['hi'])} | "
                  f"{r['n']} | {_pct(r['number_only'])} | {_pct(r.get('anywhere'))} | {_pct(r['no_eos'])} |")
    if result.comparisons:
        md += ["", "| model | tier | vs | difference | 95% interval | gained | lost | McNemar p |",
               "|---|---|---|---:|---|---:|---:|---:|"]
        for c in result.comparisons:
            if c["diff"] is None:
                continue
            md.append(f"| {c['label']} | {c['tier']} | {c['baseline']} | {c['diff']:+.3f} | "
                      f"[{c['lo']:+.3f}, {c['hi']:+.3f}] | {c['gained']} | {c['lost']} | {c['p_value']:.2g} |")
    return "\n".join(md) + "\n"


def verdict_lines(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    """One plain sentence per comparison: "better" or "worse" only when the paired 95 %
    interval excludes zero, else "no difference shown" -- a report must not call noise an
    improvement."""
    out = []
    for c in comparisons:
        if c.get("diff") is None:
            continue
        word = M.direction(c["lo"], c["hi"]) or "no difference shown (the interval includes 0)"
        out.append(f"arith {c['tier']}: {c['label']} vs {c['baseline']}: {c['diff']:+.3f} [{c['lo']:+.3f}, "
                   f"{c['hi']:+.3f}] on {c['n']} problems, McNemar p {c['p_value']:.2g}: {word}")
    return out

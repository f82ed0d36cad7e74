"""``chatforge pipeline RECIPE.yaml``: data -> SFT -> RM -> PPO and/or DPO -> eval -> report.

Each stage writes its own run folder under the pipeline folder (``out``)::

    runs/demo/
      data/      canonical JSONL per role (sft, preferences, prompts, heldout) + cleaning report
      sft/ rm/ gold/ ppo/ dpo/  run folders (config.yaml, metrics.jsonl, checkpoints, model/, DONE)
      eval/      per-checkpoint evaluation
      report.html report.md *.png

A stage whose run folder holds ``DONE`` is skipped; a stage with checkpoints but no
``DONE`` resumes from its newest checkpoint. ``stages=[sft]`` (or ``--only sft``) runs one
stage alone with the same recipe; inputs of skipped earlier stages are taken from their
folders.

Recipe keys (top level): ``out``, ``model``, ``seed``, ``stages``, ``data`` (see
:class:`DataSpec`), and one section per stage whose keys are that stage's config fields
(``chatforge sft --help`` etc.). ``model``/``data``/``out`` of a stage are filled in by the
pipeline; set them in a section only to override.

Verifiable rewards (``recipes/arith.yaml``): ``data.arith`` (:class:`ArithData`) generates
arithmetic problems (:mod:`chatforge.data.arith`) into ``data/prompts.jsonl`` (train) and
``data/arith_heldout.jsonl`` (the fixed held-out set, PPO's ``eval_data``); without an ``rm``
stage PPO's reward defaults to ``fn:chatforge.train.reward_fns:arith_exact``; ``eval.tasks:
[arith]`` scores the base model and every evaluated checkpoint on the held-out problems
(``eval.arith``: :class:`~chatforge.eval.tasks.ArithSettings`) into ``eval/arith.json`` and
``eval/arith.md``, with each model's paired difference to the base model.

A gold judge RL never sees (``gold:``, :class:`GoldSpec`; the proxy/gold set-up of Gao et
al. 2022): the data stage splits the preference records by record, seeded
(:func:`chatforge.data.split.split_indices`, after the held-out cut), into
``data/preferences.jsonl`` (the proxy part: the ``rm`` stage, whose RM PPO optimises, DPO,
and PPO's prompts when ``data.prompts`` is empty) and ``data/preferences_gold.jsonl`` (the
gold part); the ``gold`` stage trains a second RM on it with the ``rm`` section's config
(plus ``gold.rm``) into ``gold/``, and the eval stage scores every checkpoint by both.
``gold.judge: llm`` makes the LLM judge of ``eval.judge_url`` the gold judge instead.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from chatforge.config import ConfigError, check_range, deep_merge, from_dict, parse_overrides, read_yaml
from chatforge.data import arith
from chatforge.eval.tasks import TASKS, ArithSettings

STAGES = ("data", "sft", "rm", "gold", "ppo", "dpo", "eval")
TRAINED = ("sft", "rm", "gold", "ppo", "dpo")
ARITH_REWARD = "fn:chatforge.train.reward_fns:arith_exact"
DEMO_DIR = Path(__file__).parent / "data" / "demo"


def resolve_data_path(p: str, recipe_dir: Path) -> str:
    """``demo/NAME`` -> the demo data shipped in the package; relative paths are taken
    relative to the recipe file first, then to the current directory."""
    if p.startswith("demo/") and not Path(p).exists():
        return str(DEMO_DIR / p.split("/", 1)[1])
    q = Path(p).expanduser()
    if not q.is_absolute() and not q.exists() and (recipe_dir / q).exists():
        return str(recipe_dir / q)
    return str(q)


@dataclass
class ArithData:
    """``data.arith``: generated arithmetic problems (:mod:`chatforge.data.arith`)."""

    tier: str = "add2"              # add2 | mul | two_step
    train: int = 2000               # training prompts, appended to data/prompts.jsonl
    heldout: int = 500              # the first N of the tier's fixed held-out pool -> data/arith_heldout.jsonl
    seed: int | None = None         # training problems' seed (default: the recipe's seed)
    # With a reward model in the recipe too, RL's prompts mix chat and arithmetic and its reward
    # is the RM's score plus this weight times the exact-answer reward (0 on chat prompts):
    # RLOO / GRPO baselines are per prompt, so the two scales never compete inside a group.
    reward_weight: float = 1.0

    def validate(self) -> None:
        if self.tier not in arith.TIERS:
            raise ConfigError(f"data.arith.tier: {self.tier!r} is not one of {', '.join(arith.TIERS)}")
        check_range("data.arith.train", self.train, 1, None)
        check_range("data.arith.heldout", self.heldout, 1, arith.HELDOUT_POOL[self.tier])
        check_range("data.arith.reward_weight", self.reward_weight, 0.0, None, lo_open=True)


@dataclass
class DataSpec:
    """Input files per role. Each list may mix formats; every file is auto-detected."""

    sft: list[str] = field(default_factory=list)          # conversations for SFT
    preferences: list[str] = field(default_factory=list)  # pairs or rankings for RM and DPO
    prompts: list[str] = field(default_factory=list)      # RL prompts (any record kind: its prompt is used)
    heldout: list[str] = field(default_factory=list)      # held-out conversations for evaluation
    format: str | None = None                              # force one reader format for all files
    clean: bool = True                                     # apply `chatforge data clean` rules
    heldout_fraction: float = 0.1                          # carved from `sft` when `heldout` is empty
    preference_heldout_fraction: float = 0.0               # carved from `preferences` (by record, seeded):
                                                           # RM/DPO evaluate on it, eval prompts come from it
    max_records: int = 0                                   # per role; 0 = all
    arith: ArithData | None = None                         # generated arithmetic prompts (see ArithData)


@dataclass
class GoldSpec:
    """``gold:``: the gold judge, which RL never sees (see the module docstring)."""

    judge: Literal["rm", "llm"] = "rm"  # rm: a second RM on a disjoint part of the preferences; llm: eval.judge_url
    fraction: float | None = None       # judge rm: share of the preference records (after the held-out cut)
                                        # that go to the gold RM, by record (default 0.5); the rest is the proxy's
    seed: int | None = None             # the split's seed (default: the recipe's seed)
    rm: dict[str, Any] = field(default_factory=dict)  # keys of the `rm` section to change for the gold RM only

    def validate(self) -> None:
        if self.judge == "rm":
            if self.fraction is None:
                self.fraction = 0.5
            check_range("gold.fraction", self.fraction, 0, 1, lo_open=True, hi_open=True)
        else:
            if self.fraction is not None:
                raise ConfigError("gold.fraction: the LLM judge (gold.judge: llm) needs no preference records; "
                                  "drop gold.fraction, or use gold.judge: rm")
            if self.rm:
                raise ConfigError("gold.rm: configures a gold RM, but gold.judge is llm")


@dataclass
class EvalSpec:
    max_prompts: int = 16
    max_new_tokens: int = 96
    temperature: float = 0.0
    samples: int = 1                # responses per prompt (> 1 with temperature > 0: judged as users meet it)
    seed: int = 0
    max_checkpoints: int = 0        # per run, evenly spaced, the last always; 0 = every checkpoint
    judge_url: str | None = None
    judge_model: str | None = None
    tasks: list[str] = field(default_factory=list)  # task yardsticks run after the checkpoint evaluation: arith
    chat_defaults: bool = True      # measure sampling settings for the best model -> its chat_defaults.json
    chat_defaults_prompts: int = 16  # held-out prompts per candidate setting (eval/chat_defaults.py)
    arith: ArithSettings = field(default_factory=ArithSettings)  # eval.arith.{tiers, n, max_new_tokens, ...}

    def validate(self) -> None:
        check_range("eval.max_prompts", self.max_prompts, 1, None)
        check_range("eval.max_new_tokens", self.max_new_tokens, 1, None)
        check_range("eval.temperature", self.temperature, 0, None)
        check_range("eval.samples", self.samples, 1, None)
        if self.samples > 1 and self.temperature == 0:
            raise ConfigError(f"eval.samples: {self.samples} responses per prompt need eval.temperature > 0 "
                              f"(greedy decoding answers the same every time)")
        check_range("eval.max_checkpoints", self.max_checkpoints, 0, None)
        check_range("eval.chat_defaults_prompts", self.chat_defaults_prompts, 1, None)
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ConfigError(f"eval.tasks: unknown task(s) {bad}; valid: {', '.join(TASKS)}")
        if bool(self.judge_url) != bool(self.judge_model):
            raise ConfigError("eval.judge_url and eval.judge_model go together (the endpoint and the model it serves)")


# How a pipeline budget (``budget.minutes``) is divided: relative weights of the wall time
# left, re-divided before each stage among the stages still to run, so a stage that ran
# over (or under) its part takes it from (or gives it to) the ones after it. Weights from
# the demo's stage times on an AVX-512-BF16 EPYC (SFT 21 s, RM 62, RLOO 282, DPO 63, eval 127).
DEFAULT_SHARES = {"data": 0.05, "sft": 1.0, "rm": 1.5, "gold": 1.0, "ppo": 5.0, "dpo": 1.2, "eval": 2.0}


@dataclass
class BudgetSpec:
    """``budget:``: one wall-clock goal for the whole pipeline (the main job must fit any CPU).

    Before each training stage the pipeline gives it ``shares[stage] / sum(shares of the
    stages left)`` of the wall time left, and sets that stage's ``max_minutes`` (its loop's
    training-time budget, :mod:`chatforge.train.loop`) to that part minus the stage's time
    outside its loop (model loading, held-out evaluations, saving): first guessed as
    ``overhead`` of the part, then measured on the stages that ran (wall minus
    ``train_time_s``). A stage's own ``max_minutes``/``max_steps`` still cap it: on a fast
    CPU the recipe's step counts end the stages early and the budget is never reached; on a
    slow one the budget cuts them.

    The evaluation does not shrink with the CPU's speed the way a training stage's steps do:
    its work is fixed by the ``eval`` settings (models x prompts x tokens). So before the
    first training stage the pipeline evaluates the base model (which the eval stage needs
    anyway; it is cached, not repeated), prices the whole evaluation from that time
    (:func:`eval_cost_s`), and keeps that many seconds back: the training stages divide
    the rest by their shares. Without held-out prompts to price it on, the evaluation
    takes ``shares.eval`` of the budget like a training stage.
    """

    minutes: float = 0.0                # 0 = no pipeline budget
    shares: dict[str, float] = field(default_factory=dict)  # changes to DEFAULT_SHARES
    overhead: float = 0.3               # first guess of a training stage's share of time outside its loop
    min_minutes: float = 0.25           # a training stage always gets at least this much loop time

    def validate(self) -> None:
        check_range("budget.minutes", self.minutes, 0, None)
        check_range("budget.overhead", self.overhead, 0, 1, hi_open=True)
        check_range("budget.min_minutes", self.min_minutes, 0, None)
        bad = [k for k in self.shares if k not in STAGES]
        if bad:
            raise ConfigError(f"budget.shares: unknown stage(s) {bad}; valid: {', '.join(STAGES)}")
        for k, v in self.shares.items():
            check_range(f"budget.shares.{k}", v, 0, None)

    def weight(self, stage: str) -> float:
        return float(self.shares.get(stage, DEFAULT_SHARES[stage]))


# The eval stage's time in units of its base model's own part (load, held-out perplexity,
# greedy answers to the prompts, their log-probs; timed warm, :func:`measure_model`),
# measured on three demo runs (3 models x 24 prompts, 64 tokens; chat defaults 5 settings x 8
# prompts) on a 2-core AMD EPYC, natively (bf16) and with the ISA limited to AVX2 (fp32):
# another model's own part 0.84-1.12 units; KL, proxy and gold RM scoring (fp32) 0.59-0.95
# units per model; a chat-defaults answer 0.65-1.18 of a base answer (unit / prompts).
# Eval 80-214 s; priced within 12-50 %, about the host's own run-to-run speed change (docs/results/demo.md).
PER_MODEL = 1.8              # a model's own part + its share of KL and scoring, in base parts
PER_CHAT_ANSWER = 0.9        # one chat-defaults answer, in base answers (base part / prompts)


def eval_cost_s(base_s: float, models: int, prompts: int, chat_defaults_answers: int) -> float:
    """Seconds the eval stage is expected to take *after* its base model's own part
    (``base_s``, measured and cached before training), for ``models`` models evaluated (the
    base included) on ``prompts`` prompts and ``chat_defaults_answers`` answers (candidate
    settings x prompts; 0 when off)."""
    return base_s * (PER_MODEL * models - 1.0) + base_s / max(1, prompts) * PER_CHAT_ANSWER * chat_defaults_answers


def expected_checkpoints(cfg: Any) -> int:
    """Checkpoints a training stage will leave for the evaluation (``save_every`` over
    ``max_steps``, plus a final model off the save grid); 4 when its length is not set in steps."""
    steps, every = int(getattr(cfg, "max_steps", 0) or 0), int(getattr(cfg, "save_every", 0) or 0)
    if steps <= 0:
        return 4
    if every <= 0:
        return 1
    return steps // every + (1 if steps % every else 0)


def price_eval(recipe: "Recipe", root: Path, stages: list[str], configs: dict[str, Any],
               log: Callable[[str], None]) -> float | None:
    """Seconds to keep back for the eval stage (see :class:`BudgetSpec`): evaluates the base
    model's own part now, into the eval cache, and prices the rest with :func:`eval_cost_s`.
    None when there are no prompts to price it on."""
    from chatforge.eval.chat_defaults import CANDIDATES
    from chatforge.eval.evaluate import measure_model
    from chatforge.runs import atomic_write_text

    prompts, heldout = eval_inputs(root)
    if prompts is None:
        return None
    price = root / "eval" / "price.json"
    secs, n = measure_model(recipe.model, prompts, heldout, root / "eval", eval_settings(recipe))
    if secs is None:  # cached by an earlier attempt of this pipeline: its measured time
        try:
            secs = float(json.loads(price.read_text(encoding="utf-8"))["base_s"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    else:
        atomic_write_text(price, json.dumps({"base_s": round(secs, 2), "prompts": n}) + "\n")
    e = recipe.eval
    models = 1 + sum(e.max_checkpoints or expected_checkpoints(configs[s]) for s in ("sft", "ppo", "dpo")
                     if s in stages and s in configs)
    answers = len(CANDIDATES) * min(e.chat_defaults_prompts, n) if e.chat_defaults else 0
    cost = eval_cost_s(secs, models, n, answers)
    log(f"  budget: evaluation priced at {cost:.0f} s ({models} models x {n} prompts + {answers} chat-defaults "
        f"answers; the base model's part took {secs:.0f} s and is done), kept back from the training stages")
    return cost


def allot_minutes(budget: BudgetSpec, stage: str, left: list[str], wall_left_s: float, overhead: float) -> float:
    """Loop minutes for ``stage`` (the first of ``left``, the stages still to run) out of
    ``wall_left_s`` seconds of the pipeline budget; ``overhead``: the expected share of the
    stage's wall time spent outside its loop."""
    total = sum(budget.weight(s) for s in left) or 1.0
    wall = max(0.0, wall_left_s) * budget.weight(stage) / total
    return round(max(budget.min_minutes, wall * (1 - overhead) / 60), 2)


@dataclass
class Recipe:
    out: str = "runs/pipeline"
    model: str = "smollm2"
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    data: DataSpec = field(default_factory=DataSpec)
    sft: dict[str, Any] = field(default_factory=dict)
    rm: dict[str, Any] = field(default_factory=dict)
    ppo: dict[str, Any] = field(default_factory=dict)
    dpo: dict[str, Any] = field(default_factory=dict)
    gold: GoldSpec | None = None
    eval: EvalSpec = field(default_factory=EvalSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)

    @property
    def gold_rm(self) -> GoldSpec | None:
        """The gold section when it asks for a gold RM (``gold.judge: rm``)."""
        return self.gold if self.gold is not None and self.gold.judge == "rm" else None

    def validate(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"stages: unknown stage(s) {bad}; valid: {', '.join(STAGES)}")
        if self.gold_rm is not None:
            if not self.data.preferences:
                raise ConfigError("gold: a gold RM trains on preference records, but data.preferences is empty")
            if "rm" in self.stages and "gold" not in self.stages:
                raise ConfigError("stages: the recipe has a gold RM (gold:) but its stages do not list gold; add it "
                                  "after rm (else the proxy RM trains on part of the data and nothing judges with the "
                                  "rest)")
        elif self.gold is not None and not self.eval.judge_url:
            raise ConfigError("gold.judge: llm makes the LLM judge the gold judge: set eval.judge_url and "
                              "eval.judge_model")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    data = read_yaml(path)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    recipe = from_dict(Recipe, data)
    rdir = Path(path).resolve().parent
    for role in ("sft", "preferences", "prompts", "heldout"):
        setattr(recipe.data, role, [resolve_data_path(p, rdir) for p in getattr(recipe.data, role)])
    return recipe, rdir


# ---------------------------------------------------------------- stage configs
def stage_config(recipe: Recipe, stage: str, root: Path, **filled: Any):
    """The typed config of one training stage: pipeline-filled fields <- recipe section.

    Built (and so validated) before any stage runs, so a typo in the `ppo:` section
    fails in the first second, not after SFT.
    """
    from chatforge.train import dpo, ppo, rm, sft

    cls = {"sft": sft.SFTConfig, "rm": rm.RMConfig, "gold": rm.RMConfig, "ppo": ppo.PPOConfig,
           "dpo": dpo.DPOConfig}[stage]
    base: dict[str, Any] = {"seed": recipe.seed, "out": str(root / stage)}
    base.update(filled)
    # the gold RM: the rm section's config (same recipe, other data), with gold.rm's changes
    if stage == "gold":
        section = deep_merge(recipe.rm, recipe.gold.rm if recipe.gold else {})
    else:
        section = getattr(recipe, stage)
    try:
        return from_dict(cls, deep_merge(base, section))
    except ConfigError as e:
        where = "rm + gold.rm (the gold RM)" if stage == "gold" else stage
        raise ConfigError(f"recipe section {where}: {e}") from None


def stage_inputs(recipe: Recipe, root: Path) -> dict[str, dict[str, Any]]:
    """What each stage reads, as filled-in config fields."""
    d = root / "data"
    has = set(recipe.stages)
    sft_model = str(root / "sft") if "sft" in has or (root / "sft" / "DONE").exists() else recipe.model
    # held-out preferences (when the recipe carves them) are what RM and DPO evaluate on
    pref_eval = [str(d / "preferences_heldout.jsonl")] if recipe.data.preference_heldout_fraction > 0 else []
    ppo: dict[str, Any] = {"model": sft_model, "rewards": [f"rm:{root / 'rm'}"], "data": [str(d / "prompts.jsonl")]}
    if recipe.data.arith is not None:  # checkable answers: the rule reward, scored on the fixed held-out set
        ppo["eval_data"] = [str(d / "arith_heldout.jsonl")]
        if "rm" not in has and not (root / "rm" / "DONE").exists():
            ppo["rewards"] = [ARITH_REWARD]
        else:  # chat and arithmetic prompts: the RM scores both, the rule only the problems
            ppo["rewards"] = [f"rm:{root / 'rm'}", f"{ARITH_REWARD}@{recipe.data.arith.reward_weight:g}"]
    return {
        "sft": {"model": recipe.model, "data": [str(d / "sft.jsonl")]},
        "rm": {"model": sft_model, "data": [str(d / "preferences.jsonl")], "eval_data": pref_eval},
        "gold": {"model": sft_model, "data": [str(d / "preferences_gold.jsonl")], "eval_data": pref_eval},
        "ppo": ppo,
        "dpo": {"model": sft_model, "data": [str(d / "preferences.jsonl")], "eval_data": pref_eval},
    }


# ---------------------------------------------------------------- data stage
def run_data_stage(recipe: Recipe, root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Read every input file, clean, split, and write canonical JSONL per role."""
    from chatforge.data import clean as cleaning
    from chatforge.data.readers import iter_records
    from chatforge.data.split import split_records
    from chatforge.data.records import Conversation, Preference, Prompt, Ranking, prompt_of, write_jsonl
    from chatforge.errors import DataError

    out = root / "data"
    out.mkdir(parents=True, exist_ok=True)
    spec = recipe.data
    report: dict[str, Any] = {}
    rejected_all: list[dict] = []

    def load(role: str, paths: list[str], kinds: tuple[type, ...]) -> list:
        errors: list = []
        recs = list(iter_records(paths, spec.format, "skip", errors))
        wrong = [r for r in recs if not isinstance(r, kinds)]
        recs = [r for r in recs if isinstance(r, kinds)]
        kept, rejected = recs, []
        counts: dict[str, Any] = {}
        if spec.clean and recs:
            res = cleaning.clean(recs)
            kept, rejected, counts = res.kept, res.rejected, res.report
        if spec.max_records and len(kept) > spec.max_records:
            kept = kept[: spec.max_records]
        report[role] = {"files": paths, "read": len(recs) + len(wrong), "errors": len(errors),
                        "first_errors": [str(e) for e in errors[:5]], "wrong_kind": len(wrong),
                        "rejected": len(rejected), "rejected_by_rule": counts, "kept": len(kept)}
        for r, rule in rejected:
            rejected_all.append({"role": role, "rule": rule, "record": _as_dict(r)})
        if errors:
            log(f"  {role}: {len(errors)} unreadable records (first: {errors[0]})")
        if wrong:
            log(f"  {role}: {len(wrong)} records of another kind ignored for this role")
        return kept

    sft = load("sft", spec.sft, (Conversation, Preference)) if spec.sft else []
    # a preference used for SFT teaches its chosen answer (DeepSpeed-Chat's step 1 on hh-rlhf)
    sft = [r if isinstance(r, Conversation) else Conversation(r.prompt + [r.chosen], dict(r.meta)) for r in sft]
    heldout = load("heldout", spec.heldout, (Conversation,)) if spec.heldout else []
    if sft and not heldout and spec.heldout_fraction > 0 and not spec.preference_heldout_fraction:
        sft, heldout, _ = split_records(sft, spec.heldout_fraction, recipe.seed, min_eval=1)
    prefs = load("preferences", spec.preferences, (Preference, Ranking)) if spec.preferences else []
    prefs_heldout: list = []
    if prefs and spec.preference_heldout_fraction > 0:
        prefs, prefs_heldout, _ = split_records(prefs, spec.preference_heldout_fraction, recipe.seed, min_eval=1)
        write_jsonl(prefs_heldout, out / "preferences_heldout.jsonl")
        log(f"  preferences_heldout: {len(prefs_heldout)} records -> {out / 'preferences_heldout.jsonl'}")
        if not heldout:  # evaluate on the held-out prompts, with the preferred answer as reference
            heldout = [Conversation(r.prompt + [r.chosen if isinstance(r, Preference) else r.responses[0]],
                                    dict(r.meta)) for r in prefs_heldout]
    gold = recipe.gold_rm
    if gold is not None:  # proxy part -> preferences.jsonl (rm, dpo, ppo's prompts); gold part -> the gold RM only
        if len(prefs) < 2:
            raise DataError(f"gold: {len(prefs)} preference record(s) left after cleaning and the held-out cut; "
                            f"a proxy and a gold RM need at least one each")
        seed = recipe.seed if gold.seed is None else gold.seed
        prefs, gold_prefs, gold_idx = split_records(prefs, gold.fraction, seed, min_eval=1)
        write_jsonl(gold_prefs, out / "preferences_gold.jsonl")
        report["gold"] = {"fraction": gold.fraction, "seed": seed, "proxy": len(prefs), "gold": len(gold_prefs),
                          "gold_indices": gold_idx,
                          "note": "indices into the preference records after the held-out cut, in file order"}
        log(f"  preferences_gold: {len(gold_prefs)} records (gold RM only) -> {out / 'preferences_gold.jsonl'}; "
            f"{len(prefs)} stay for the proxy RM, DPO and RL")
    prompts_src = load("prompts", spec.prompts, (Prompt, Conversation, Preference, Ranking)) if spec.prompts else []
    prompts = [r if isinstance(r, Prompt) else Prompt(prompt_of(r), dict(r.meta)) for r in prompts_src]
    if not prompts and prefs:
        prompts = [Prompt(r.prompt, dict(r.meta)) for r in prefs]
    if spec.arith is not None:  # generated, not read: nothing to clean
        a = spec.arith
        seed = recipe.seed if a.seed is None else a.seed
        prompts += arith.records(a.tier, "train", a.train, seed)
        held = arith.records(a.tier, "heldout", a.heldout)
        write_jsonl(held, out / "arith_heldout.jsonl")
        report["arith"] = {"tier": a.tier, "train": a.train, "heldout": a.heldout, "seed": seed}
        log(f"  arith: {a.train} {a.tier} training problems (seed {seed}) -> prompts; "
            f"{a.heldout} held-out -> {out / 'arith_heldout.jsonl'}")

    for name, recs in (("sft", sft), ("heldout", heldout), ("preferences", prefs), ("prompts", prompts)):
        write_jsonl(recs, out / f"{name}.jsonl")
        log(f"  {name}: {len(recs)} records -> {out / (name + '.jsonl')}")
    write_jsonl(rejected_all, out / "rejected.jsonl")
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return report


def _as_dict(r) -> dict:
    from chatforge.data.records import to_dict

    return to_dict(r)


# ---------------------------------------------------------------- orchestration
def _train(stage: str, cfg) -> Path:
    from chatforge.train import dpo, ppo, rm, sft

    fn = {"sft": sft.train_sft, "rm": rm.train, "gold": rm.train, "ppo": ppo.train, "dpo": dpo.train}[stage]
    return fn(cfg, resume=True)


def stage_configs(recipe: Recipe, root: Path, stages: list[str]) -> dict[str, Any]:
    """The typed config of every training stage in ``stages``: built (and so validated)
    before anything runs; ``chatforge pipeline --dry-run`` stops here."""
    inputs = stage_inputs(recipe, root)
    check_gold_split(recipe, root)
    todo = [s for s in TRAINED if s in stages and (s != "gold" or recipe.gold_rm is not None)]
    configs = {s: stage_config(recipe, s, root, **inputs[s]) for s in todo}
    if "ppo" in configs and recipe.gold_rm is not None:  # the gold judge must stay unseen by RL
        from chatforge.train.rewards import parse_reward_spec

        gold_dir = (root / "gold").resolve()
        for r in configs["ppo"].rewards:
            spec = parse_reward_spec(r)
            if spec.kind == "rm" and Path(spec.target).resolve() == gold_dir:
                raise ConfigError(f"ppo.rewards: {r} is the gold RM; RL must never see the gold judge "
                                  f"(its reward is the proxy, rm:{root / 'rm'})")
    return configs


def check_gold_split(recipe: Recipe, root: Path) -> None:
    """A finished data stage must have split the preferences as the recipe's ``gold`` asks:
    adding (or dropping) a gold RM after the fact would let the proxy RM train on the gold
    part, or leave no gold part at all."""
    if not (root / "data" / "DONE").exists():
        return
    try:
        have = json.loads((root / "data" / "report.json").read_text(encoding="utf-8")).get("gold")
    except (OSError, json.JSONDecodeError):
        return
    g = recipe.gold_rm
    want = None if g is None else {"fraction": g.fraction, "seed": recipe.seed if g.seed is None else g.seed}
    have = None if not have else {"fraction": have.get("fraction"), "seed": have.get("seed")}
    if want != have:
        def say(x: dict | None) -> str:
            return "without a gold part" if x is None else f"with gold fraction {x['fraction']}, seed {x['seed']}"

        raise ConfigError(f"gold.fraction: {root / 'data'} was split {say(have)}, but the recipe asks {say(want)}; "
                          f"delete {root / 'data'} and the stages trained on it (rm, gold, ppo, dpo) to split again")


def run_pipeline(recipe: Recipe, only: list[str] | None = None, log: Callable[[str], None] = print) -> Path:
    root = Path(recipe.out)
    root.mkdir(parents=True, exist_ok=True)
    stages = [s for s in recipe.stages if not only or s in only]
    configs = stage_configs(recipe, root, stages)
    t0 = time.time()
    timings: dict[str, float] = {}
    budget, allotted, overheads = recipe.budget, {}, []
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # the evaluation's seconds, kept back from the training stages (priced once, before the first)
    reserve: float | None = None
    to_price = bool(budget.minutes) and "eval" in stages and not distributed and not (root / "eval" / "DONE").exists()
    for stage in stages:
        folder = root / stage
        if distributed and stage in ("data", "eval") and not (folder / "DONE").exists():
            raise ConfigError(f"run the {stage} stage without a launcher (plain `chatforge pipeline ... --only {stage}`); "
                              f"launch only the training stages with accelerate/torchrun")
        if (folder / "DONE").exists():
            log(f"[{stage}] done already ({folder}); skipped")
            continue
        if stage == "gold" and recipe.gold_rm is None:
            log("[gold] no gold RM in the recipe (gold: section with judge rm); skipped")
            continue
        if to_price and stage not in ("data", "eval"):
            to_price, tp = False, time.time()
            reserve = price_eval(recipe, root, stages, configs, log)
            timings["eval_price"] = round(time.time() - tp, 1)
        log(f"[{stage}] running -> {folder}")
        ts = time.time()
        if stage == "data":
            run_data_stage(recipe, root, log)
        elif stage == "eval":
            run_eval_stage(recipe, root, log)
        else:
            cfg = configs[stage]
            if budget.minutes:
                left, wall_left = stages[stages.index(stage):], budget.minutes * 60 - (ts - t0)
                if reserve is not None:
                    left, wall_left = [s for s in left if s != "eval"], wall_left - reserve
                allotted[stage] = budget_stage(budget, cfg, stage, left, wall_left, overheads, log, reserve)
            _train(stage, cfg)
            share = outside_loop_share(folder, time.time() - ts)
            if share is not None:
                overheads.append(share)
        timings[stage] = round(time.time() - ts, 1)
        log(f"[{stage}] finished in {timings[stage]:.0f} s")
    total = round(time.time() - t0, 1)
    record: dict[str, Any] = {"stages_s": timings, "total_s": total}
    if budget.minutes:
        record["budget"] = {"minutes": budget.minutes, "allotted_loop_minutes": allotted,
                            "eval_priced_s": None if reserve is None else round(reserve, 1),
                            "within": total <= budget.minutes * 60}
        log(f"pipeline: {total / 60:.1f} min of a {budget.minutes:g}-minute budget")
    (root / "timings.json").write_text(json.dumps(record, indent=2))
    return root


def budget_stage(budget: BudgetSpec, cfg, stage: str, left: list[str], wall_left_s: float, overheads: list[float],
                 log: Callable[[str], None], kept_s: float | None = None) -> float:
    """Cap ``cfg.max_minutes`` at the stage's part of the pipeline budget; returns the part.
    ``kept_s``: seconds already kept back for the evaluation (not in ``wall_left_s``)."""
    overhead = sum(overheads) / len(overheads) if overheads else budget.overhead
    minutes = allot_minutes(budget, stage, left, wall_left_s, min(overhead, 0.9))
    own = cfg.max_minutes
    if not own or minutes < own:
        cfg.max_minutes = minutes
    log(f"  budget: {cfg.max_minutes:g} min of training for {stage} ({wall_left_s / 60:.1f} min of the pipeline "
        f"budget left for {', '.join(left)}{'' if kept_s is None else f' after {kept_s:.0f} s kept for eval'}; "
        f"expected {overhead:.0%} outside the loop)")
    return cfg.max_minutes


def outside_loop_share(folder: Path, wall_s: float) -> float | None:
    """Share of a finished training stage's wall time spent outside its loop's steps
    (loading, evaluations, saving), from its summary's ``train_time_s``; None when unknown
    (the budget keeps its guess, ``budget.overhead``)."""
    try:
        train = float(json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("train_time_s", 0))
    except (OSError, ValueError, TypeError):
        return None
    return min(0.9, max(0.0, 1 - train / wall_s)) if wall_s > 0 else None


def final_policy(root: Path) -> Path | None:
    for s in ("ppo", "dpo", "sft"):
        if (root / s / "model").is_dir():
            return root / s
    return None


def eval_inputs(root: Path) -> tuple[str | None, str | None]:
    """(prompts, held-out conversations) of the eval stage: the held-out conversations for
    both, else the arithmetic problems as prompts (no perplexity); Nones when neither exists."""
    heldout = root / "data" / "heldout.jsonl"
    if heldout.exists() and heldout.stat().st_size > 0:
        return str(heldout), str(heldout)
    arith_heldout = root / "data" / "arith_heldout.jsonl"
    return (str(arith_heldout) if arith_heldout.exists() else None), None


def eval_settings(recipe: Recipe):
    """The :class:`~chatforge.eval.evaluate.EvalSettings` of the recipe's ``eval`` section
    (one place, so the budget's pricing and the eval stage measure the same thing)."""
    from chatforge.eval.evaluate import EvalSettings

    e = recipe.eval
    return EvalSettings(max_prompts=e.max_prompts, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                        samples=e.samples, seed=e.seed)


def run_eval_stage(recipe: Recipe, root: Path, log: Callable[[str], None]) -> None:
    from chatforge.eval.evaluate import evaluate_runs
    from chatforge.eval.report import write_report

    runs = [str(root / s) for s in ("sft", "ppo", "dpo") if (root / s / "model").is_dir()]
    rm = str(root / "rm") if (root / "rm" / "model").is_dir() else None
    gold = None  # the gold judge: the gold RM, or the LLM judge (gold.judge: llm); never the proxy
    if recipe.gold_rm is not None:
        if (root / "gold" / "model").is_dir():
            gold = str(root / "gold")
        else:
            log(f"  no gold RM at {root / 'gold'} (run the gold stage): judged by the proxy RM alone")
    elif recipe.gold is not None:
        gold = "judge"
    baseline = str(root / "sft") if (root / "sft" / "model").is_dir() else recipe.model
    prompts, heldout = eval_inputs(root)
    e = recipe.eval
    result = evaluate_runs(
        runs, baseline=baseline, base_model=recipe.model, prompts=prompts, heldout=heldout, rm=rm,
        out=str(root / "eval"), settings=eval_settings(recipe), max_checkpoints=e.max_checkpoints,
        judge_url=e.judge_url, judge_model=e.judge_model, gold=gold, log=log)
    if "arith" in e.tasks:
        run_arith_task(recipe, root, runs, log)
    if e.chat_defaults and prompts is not None:
        pick_chat_defaults(recipe, root, result, prompts, gold if gold != "judge" else None, rm, log)
    stages = {("gold-rm" if s == "gold" else s): str(root / s) for s in TRAINED if (root / s).is_dir()}
    write_report(root, stages, result)
    (root / "eval" / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


def pick_chat_defaults(recipe: Recipe, root: Path, result, prompts: str, gold: str | None, rm: str | None,
                       log: Callable[[str], None]) -> Path | None:
    """Measure the chat settings of the model the pipeline recommends (the best checkpoint,
    else the final policy) on held-out prompts, judged by the gold judge (else the proxy
    RM), and record them in its run folder (:mod:`chatforge.eval.chat_defaults`), where
    ``chatforge chat`` / ``serve`` read them."""
    from chatforge.chat.session import run_template
    from chatforge.eval.chat_defaults import choose_chat_defaults, write
    from chatforge.eval.evaluate import EvalSettings, load_eval_data

    best = result.best.get("overall")
    rows = {r["label"]: r for r in result.rows}
    target = rows[best].get("chat") if best in rows else None
    if target is None:
        final = final_policy(root)
        target = str(final) if final is not None else None
    if target is None or not Path(target).is_dir():
        return None
    e = recipe.eval
    msgs, _ = load_eval_data(prompts, None, EvalSettings(max_prompts=e.chat_defaults_prompts))
    judge = gold or rm
    log(f"  chat defaults for {target}: {len(msgs)} held-out prompts, judged by {judge or 'no judge'}")
    rec = choose_chat_defaults(target, msgs, run_template(target), judge, e.max_new_tokens, e.seed, log=log)
    path = write(rec, target)
    write(rec, root / "eval")
    log(f"  -> {path}")
    return path


def run_arith_task(recipe: Recipe, root: Path, runs: list[str], log: Callable[[str], None]) -> None:
    """``eval.tasks: [arith]``: the base model ("before") and every evaluated checkpoint of
    each trained stage on the fixed held-out problems; ``eval/arith.json`` + ``arith.md``."""
    from chatforge.eval.tasks import evaluate_arith, markdown_table, text_table, verdict_lines
    from chatforge.runs import atomic_write_text

    targets = {"base": recipe.model, **{Path(r).name: r for r in runs}}
    res = evaluate_arith(targets, recipe.eval.arith, baseline="base", out=root / "eval",
                         max_checkpoints=recipe.eval.max_checkpoints, log=log,
                         compare_to=["sft"] if "sft" in targets else [])  # RL's gain over its start, too
    atomic_write_text(root / "eval" / "arith.md", "# Arithmetic yardstick (held-out, greedy)\n\n" + markdown_table(res))
    for line in text_table(res).splitlines():
        log(f"  {line}")
    for line in verdict_lines(res.comparisons):
        log(f"  {line}")

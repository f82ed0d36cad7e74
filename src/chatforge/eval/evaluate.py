"""Evaluate every checkpoint of one or more runs: did training get better or worse?

For each *target* -- every ``checkpoints/step-N/`` of a run folder plus its final
``model/`` (when that is not just a copy of the last checkpoint), or a plain model name
such as ``smollm2`` -- on the same held-out data:

* **held-out perplexity**: ``exp(sum NLL / n)`` over assistant tokens only (the SFT label
  mask of :func:`chatforge.data.tokenize.encode_messages`) of held-out conversations;
* **responses** to held-out prompts from the engine (greedy, or sampling with a fixed seed),
  and their **degeneration** figures (:mod:`chatforge.eval.metrics`): length, repeated
  n-gram rate, distinct-1/2, share that fall into a loop, share that never end their turn;
* **KL to the reference** (the run's starting model, else ``baseline``): mean over prompts
  of ``sum_t log pi(y_t) - log pi_ref(y_t)`` over the target's own response tokens, both
  teacher-forced. A true KL estimate when sampling at temperature 1; with greedy decoding
  it is the log-ratio at the policy's mode (still 0 for an unchanged model, growing with drift);
* **refusal rate**: share of responses opening with a refusal ("I'm sorry", "I cannot", ...;
  :func:`chatforge.textstats.is_refusal`);
* **RM score** of the responses and **RM win rate** against the baseline's responses to the
  same prompts (ties, e.g. identical responses, count half), with a bootstrap 95% interval.
  This RM (``rm``) is the *proxy*: the one RL was trained against;
* optionally a **gold judge** RL never saw (``gold``): a second RM trained on a disjoint part
  of the preferences (the proxy/gold set-up of Gao et al. 2022), giving **gold score** and
  **gold win rate** the same way, or the LLM judge (``gold="judge"``);
* optionally an **LLM-judge win rate** (:mod:`chatforge.eval.judge`, both orders).

The model each run began from (its config's ``model``: the SFT or base model) is always a
row, added when it is not among the targets, so a run that made its start worse shows it.

Then, per run, the best checkpoint is flagged (by gold when there is a gold judge: gold win
rate > gold score, or the judge's win rate; else RM win rate > judge win rate > mean RM
score > held-out perplexity, whichever exists) and every checkpoint that is worse than an
earlier one beyond noise (paired test, :func:`chatforge.eval.metrics.regressions`) is
warned about: training oscillates (Chinese-Tiger-LoRA saw checkpoints degrade into
repeating words), so the last checkpoint is never silently taken as the best. Warnings in
words also name over-optimisation (proxy up while gold down), a last checkpoint worse than
its start by gold, and jumps vs the start in refusal, loop and missing end-of-turn rates
and in length (:mod:`chatforge.eval.overopt`, thresholds there).

One model is in memory at a time: each target is loaded, measured and freed; log-probs
under each reference are computed afterwards, loading each reference once; the reward
model is loaded once at the end, then the gold RM once. Every part is cached in
``OUT/cache/`` under a key made of the checkpoint's files (path, sizes, mtimes) and the
settings, so re-running after one more checkpoint only evaluates the new one.
"""

from __future__ import annotations

import filecmp
import gc
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from chatforge.errors import ConfigError, DataError
from chatforge.generate.sampling import SamplingConfig
from chatforge.eval import metrics as M
from chatforge.eval.measure import decoding_copy, generate_responses, heldout_nll, response_logprobs
from chatforge.eval.overopt import findings
from chatforge.runs import atomic_write_text, checkpoint_step, list_checkpoints

CACHE_VERSION = 2
REF_KEYS = ("ref_model", "reference", "ref")  # config keys naming a run's reference, else "model"


@dataclass
class EvalSettings:
    """What is measured, and how. Every field that changes a number is in the cache key."""

    max_prompts: int = 32
    max_heldout: int = 100
    max_new_tokens: int = 128
    temperature: float = 0.0       # 0 = greedy
    samples: int = 1               # responses per prompt (> 1 needs temperature > 0): the expected judgement
                                   # of the policy as a user meets it when sampling (Gao et al. score samples)
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 8            # perplexity / log-prob passes (halved) and RM scoring
    gen_batch_size: int = 32       # answers decoded together: one batch of 24 decodes 1.15-1.6x faster than
                                   # three of 8 on 2-core EPYCs (bf16 5.4 vs 8.6 s; AVX2 fp32 1 thread 19.2 vs 26.8)
    max_len: int = 1024            # truncation for perplexity / KL / RM inputs
    dtype: str = "fp32"            # weights for perplexity, log-probs, KL: fp32 keeps small checkpoint deltas
    gen_dtype: str = "auto"        # weights for decoding: auto = bf16 on CPUs with native bf16 (~1.5x faster
                                   # here, and what `chatforge chat` uses), else as `dtype`
    z: float = 2.0                 # regressions: paired difference beyond z standard errors

    def validate(self) -> "EvalSettings":
        for k, lo in (("max_prompts", 1), ("max_heldout", 0), ("max_new_tokens", 1), ("batch_size", 1),
                      ("gen_batch_size", 1), ("max_len", 8),
                      ("samples", 1)):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < lo:
                raise ConfigError(f"{k}: must be an integer >= {lo}, got {getattr(self, k)!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0, got {self.temperature}")
        if self.samples > 1 and self.temperature == 0:
            raise ConfigError(f"samples: {self.samples} responses per prompt need sampling: set temperature > 0 "
                              f"(greedy decoding gives the same response every time)")
        for k in ("dtype", "gen_dtype"):
            if getattr(self, k) not in ("auto", "fp32", "bf16", "fp16"):
                raise ConfigError(f"{k}: must be auto, fp32, bf16 or fp16, got {getattr(self, k)!r}")
        return self


@dataclass
class Target:
    """One model to evaluate: a checkpoint of a run, a run's final model, or a model name."""

    run: str                 # label of its run (or of the plain model)
    name: str                # step-0000100 | final | the model name
    path: str                # what chatforge.models.load.load() accepts
    step: int | None = None
    final: bool = False
    ref: str | None = None   # KL reference
    template: str = "auto"
    run_dir: str | None = None  # the run folder it belongs to
    start: str | None = None    # the model its run began from (config ``model``), when loadable here

    @property
    def label(self) -> str:
        return self.run if self.name == self.run else f"{self.run}/{self.name}"


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]             # one per target, training order within each run
    samples: list[dict[str, Any]]          # one per target per prompt
    prompts: list[dict[str, Any]]          # {"index", "text", "messages"}
    best: dict[str, str]                   # run -> best target label (and "overall")
    selection: str | None                  # metric used to pick the best
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    gold: str | None = None                # which judge is gold: "rm" (gold_score), "judge", or None

    def row(self, label: str) -> dict[str, Any]:
        for r in self.rows:
            if r["label"] == label:
                return r
        raise KeyError(label)

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "selection": self.selection, "gold": self.gold, "best": self.best,
                "warnings": self.warnings, "notes": self.notes, "rows": self.rows, "prompts": self.prompts}


# ================================================================ targets
def _read_yaml(p: Path) -> dict[str, Any]:
    if not p.exists():
        return {}
    import yaml

    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return d if isinstance(d, dict) else {}


def is_run_folder(p: Path) -> bool:
    return p.is_dir() and ((p / "checkpoints").is_dir() or (p / "DONE").exists()) and not (p / "config.json").exists()


def _resolvable(name: str, near: Path) -> str | None:
    """``name`` as given if it loads, else relative to the run's pipeline folder, else None."""
    from chatforge.models.load import resolve

    for cand in (name, str(near / name), str(near.parent / name)):
        try:
            resolve(cand)
            return cand
        except Exception:
            continue
    return None


def _weights(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())


def same_weights(a: Path, b: Path) -> bool:
    """True when two model folders hold identical weight files (``model/`` is published as
    a copy of the last checkpoint: evaluating both would cost twice for one row)."""
    wa, wb = _weights(a), _weights(b)
    if not wa or [f.name for f in wa] != [f.name for f in wb]:
        return False
    return all(filecmp.cmp(x, y, shallow=True) and x.stat().st_size == y.stat().st_size for x, y in zip(wa, wb))


def targets_of(label: str, run: str | Path, baseline: str | None = None, max_checkpoints: int = 0
               ) -> tuple[list[Target], list[str]]:
    """Targets of one run folder (every checkpoint + final) or of a model name; and notes.

    ``max_checkpoints > 0`` keeps that many, evenly spaced, always including the last."""
    from chatforge.models.load import resolve

    notes: list[str] = []
    p = Path(run).expanduser()
    if not is_run_folder(p):
        resolve(str(run))  # raises ModelNotFound (a user error) with the reason
        return [Target(label, label, str(run), ref=baseline if baseline and str(baseline) != str(run) else None)], notes
    cfg = _read_yaml(p / "config.yaml")
    start = next((cfg[k] for k in REF_KEYS if isinstance(cfg.get(k), str) and cfg.get(k)), cfg.get("model"))
    ref = _resolvable(str(start), p.parent) if isinstance(start, str) and start else None
    began = cfg.get("model")
    began = (ref if began == start else _resolvable(began, p.parent)) if isinstance(began, str) and began else None
    if ref is None:
        ref = baseline
        if start:
            notes.append(f"{label}: its starting model {start!r} is not loadable here; KL is measured to "
                         f"{'the baseline' if baseline else 'nothing (skipped)'}")
    template = cfg.get("template") if isinstance(cfg.get("template"), str) else "auto"
    out = [Target(label, ck.name, str(ck), checkpoint_step(ck), False, ref, template, str(p), began)
           for ck in list_checkpoints(p)]
    final = p / "model"
    if final.is_dir():
        if out and same_weights(final, Path(out[-1].path)):
            out[-1].final = True
        else:
            steps = _read_json(p / "summary.json").get("steps")
            out.append(Target(label, "final", str(final), steps if isinstance(steps, int) else None, True, ref,
                              template, str(p), began))
    if not out:
        raise ConfigError(f"{p}: run folder has no checkpoints and no model/ to evaluate")
    if 0 < max_checkpoints < len(out):
        keep = sorted({round(i * (len(out) - 1) / max(1, max_checkpoints - 1)) for i in range(max_checkpoints)}
                      if max_checkpoints > 1 else {len(out) - 1})
        notes.append(f"{label}: {len(keep)} of {len(out)} checkpoints evaluated (max_checkpoints={max_checkpoints})")
        out = [out[i] for i in keep]
    return out, notes


def _read_json(p: Path) -> dict[str, Any]:
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _labels(runs: Sequence[str | Path] | Mapping[str, str | Path]) -> list[tuple[str, str]]:
    if isinstance(runs, Mapping):
        return [(str(k), str(v)) for k, v in runs.items()]
    out, seen = [], set()
    for r in runs:
        lab = Path(str(r)).name or str(r)
        base, i = lab, 2
        while lab in seen:
            lab, i = f"{base}-{i}", i + 1
        seen.add(lab)
        out.append((lab, str(r)))
    return out


# ================================================================ data
def read_records(path: str | Path):
    """Records of a data file (any format the readers know); a file with none is an error."""
    from chatforge.data.readers import read_file

    res = read_file(path)
    if not res.records:
        first = f": {res.errors[0]}" if res.errors else ""
        raise DataError(f"{path}: no usable records{first}")
    return res.records


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """A prompt as plain text (for the judge and the report): the user message alone when
    it is the only turn, else the turns labelled by role; an assistant turn that called a
    tool shows its ``<tool_call>`` text (its content is None)."""
    from chatforge.data.templates import message_as_text

    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return message_as_text(turns[0])
    return "\n\n".join(f"{m['role'].capitalize()}: {message_as_text(m)}" for m in messages)


def load_eval_data(prompts: str | Path | None, heldout: str | Path | None, settings: EvalSettings,
                   fallback_heldout: str | None = None) -> tuple[list[list[dict]], list[list[dict]]]:
    """(prompt message lists, held-out conversation message lists). Prompts default to the
    held-out conversations' prompts; held-out defaults to a run's ``eval_data``."""
    from chatforge.data.records import Conversation, prompt_of

    explicit = heldout is not None
    heldout = heldout or fallback_heldout
    if prompts is None and heldout is None:
        raise ConfigError("nothing to evaluate on: pass --prompts FILE and/or --heldout FILE")
    convs: list[list[dict]] = []
    if heldout is not None:
        convs = [r.messages for r in read_records(heldout) if isinstance(r, Conversation)]
        # a run's own eval_data may hold prompts only (an RL run's): no perplexity then, not an error
        if not convs and (explicit or prompts is None):
            raise DataError(f"{heldout}: held-out data must hold conversations (with assistant turns)")
    if prompts is not None:
        pr = [prompt_of(r) for r in read_records(prompts)]
    else:
        pr = [Conversation(c).prompt for c in convs]
    pr = [p for p in pr if p and p[-1]["role"] == "user"][: settings.max_prompts]
    if not pr:
        raise DataError(f"{prompts or heldout}: no prompt ending in a user message")
    return pr, convs[: settings.max_heldout]


# ================================================================ cache
def identity(path: str) -> list[Any]:
    """What a model's numbers depend on: resolved folder + its weight/config files' stats."""
    from chatforge.models.load import resolve

    r = resolve(path)
    if r.kind in ("tiny", "hub"):
        return [r.kind, r.path]
    p = Path(r.path).resolve()
    files = [f for f in sorted(p.iterdir()) if f.is_file() and (f.suffix in (".safetensors", ".bin", ".gguf")
                                                                 or f.name.endswith("config.json"))]
    if r.gguf_file:
        files = [p / r.gguf_file]
    return [str(p), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:24]


class Cache:
    def __init__(self, root: Path | None):
        self.root = root

    def get(self, kind: str, key: str) -> Any:
        if self.root is None:
            return None
        f = self.root / f"{kind}-{key}.json"
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, kind: str, key: str, value: Any) -> Any:
        if self.root is not None:
            atomic_write_text(self.root / f"{kind}-{key}.json", json.dumps(value))
        return value


# ================================================================ the evaluation
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate_runs(runs: Sequence[str | Path] | Mapping[str, str | Path], baseline: str | Path | None = None,
                  prompts: str | Path | None = None, heldout: str | Path | None = None, rm: str | Path | None = None,
                  max_prompts: int = 32, max_new_tokens: int = 128, seed: int = 0, judge: Any = None, *,
                  base_model: str | None = None, temperature: float = 0.0, samples: int = 1,
                  max_checkpoints: int = 0, judge_url: str | None = None,
                  judge_model: str | None = None, out: str | Path | None = None, settings: EvalSettings | None = None,
                  gold: str | Path | None = None, log: Callable[[str], None] = _log) -> EvalResult:
    """Evaluate every checkpoint of each run (see the module docstring); writes
    ``eval.json``, ``eval.jsonl`` and ``samples.jsonl`` into ``out`` when given.

    ``runs`` is a list of run folders / model names, or a mapping label -> run (e.g.
    ``{"base": "smollm2", "sft": "runs/x/sft"}``); ``base_model`` adds a plain model as
    ``base`` in front. ``judge`` is a :class:`chatforge.eval.judge.Judge`, or give
    ``judge_url`` + ``judge_model``. ``settings`` overrides the individual knobs.
    ``max_checkpoints > 0`` evaluates that many checkpoints per run (evenly spaced, the last
    always), for a time budget; the default is every checkpoint.

    ``rm`` is the *proxy* (the reward model RL optimised); ``gold`` the gold judge RL never
    saw: a second reward model (run folder or directory), or ``"judge"`` for the LLM judge.
    The model each run began from is always evaluated too (a row, added when missing).
    """
    from chatforge.models.load import load

    s = settings or EvalSettings(max_prompts=max_prompts, max_new_tokens=max_new_tokens, seed=seed,
                                 temperature=temperature, samples=samples)
    s.validate()
    if judge is None and judge_url:
        from chatforge.eval.judge import Judge

        if not judge_model:
            raise ConfigError("judge_url needs judge_model (the model name the endpoint serves)")
        judge = Judge(judge_url, judge_model)
    gold_kind = _check_gold(gold, rm, judge, baseline)
    progress = log
    outp = Path(out) if out is not None else None
    cache = Cache(outp / "cache" if outp is not None else None)
    notes: list[str] = []

    # ---- targets (baseline first: everyone's win rate is measured against it)
    pairs = _labels(runs)
    if base_model is not None and not any(r == str(base_model) for _, r in pairs):
        pairs.insert(0, ("base", str(base_model)))
    if not pairs:
        raise ConfigError("no run or model to evaluate")
    base_str = str(baseline) if baseline is not None else None
    targets: list[Target] = []
    for lab, r in pairs:
        ts, n = targets_of(lab, r, base_str, max_checkpoints)
        targets += ts
        notes += n
    base_target: Target | None = None
    if base_str is not None:
        base_target = find_target(targets, base_str)
        if base_target is None:
            lab = Path(base_str).name if Path(base_str).exists() else base_str
            if any(t.run == lab for t in targets):  # e.g. another pipeline's "sft"
                lab = f"baseline-{lab}"
            bt, n = targets_of(lab, base_str, None)
            base_target = bt[-1]  # a run's final model (its newest checkpoint when unfinished)
            notes += n
            targets.insert(0, base_target)
    # ---- the model each run began from is a row too, so "worse than where it started" shows
    added: set[str] = set()  # labels of start rows added for comparison only (no trajectory of their own)
    for t in list(targets):
        if t.start is None or find_target(targets, t.start) is not None:
            continue
        lab = Path(t.start).name if Path(t.start).exists() else t.start
        if any(x.run == lab for x in targets):
            lab = f"start-{lab}"
        st, n = targets_of(lab, t.start, base_str)
        notes += n
        targets.insert(1 if targets[0] is base_target else 0, st[-1])
        added.add(st[-1].label)
    starts = {t.label: st.label for t in targets if t.start is not None and (st := find_target(targets, t.start))
              and st is not t}

    fallback = None
    for t in targets:
        ed = _read_yaml(Path(t.run_dir) / "config.yaml").get("eval_data") if t.run_dir else None
        if isinstance(ed, list) and ed:
            fallback = ed[0]
            break
    prompt_msgs, convs = load_eval_data(prompts, heldout, s, fallback)
    if not convs:
        notes.append("no held-out conversations: perplexity not measured (pass --heldout FILE)")
    gen_msgs = answered(prompt_msgs, s)
    progress(f"eval: {len(targets)} model(s) x {len(prompt_msgs)} prompts, {len(convs)} held-out conversations")

    # ---- phase 1: per target, one model in memory: perplexity, responses, own log-probs
    gen: dict[str, dict] = {}
    gkeys: dict[str, str] = {}
    for t in targets:
        gkeys[t.label], gen[t.label], secs = _own_part(t, prompt_msgs, convs, s, cache)
        if secs is not None:
            progress(f"eval: {t.label}: {secs:.1f}s")

    # ---- phase 2: KL, loading each reference once
    kl: dict[str, list[float]] = {}
    by_ref: dict[str, list[Target]] = {}
    for t in targets:
        if t.ref is not None:
            by_ref.setdefault(t.ref, []).append(t)
    for ref, ts in by_ref.items():
        rid = identity(ref)
        todo = []
        for t in ts:
            hit = cache.get("kl", key_of("kl", gkeys[t.label], rid))
            if hit is not None:
                kl[t.label] = hit
            else:
                todo.append(t)
        if not todo:
            continue
        model, tok = load(ref, dtype=s.dtype, merge_adapter=True)
        model.eval()
        for t in todo:
            g = gen[t.label]
            if len(tok) != g["vocab"]:
                notes.append(f"{t.label}: reference {ref} has another vocabulary; KL skipped")
                continue
            ref_lp = response_logprobs(model, [r["prompt_ids"] for r in g["responses"]],
                                       [r["token_ids"] for r in g["responses"]], max(1, s.batch_size // 2), s.max_len)
            kl[t.label] = cache.put("kl", key_of("kl", gkeys[t.label], rid),
                                    [r["logp"] - x for r, x in zip(g["responses"], ref_lp)])
        del model, tok
        gc.collect()

    # ---- phase 3: reward model (loaded once) and RM win rate vs the baseline
    rm_scores: dict[str, list[float]] = {}
    if rm is not None:
        rm_scores = _score_all(rm, targets, gen, gkeys, gen_msgs, s, cache, notes)
    gold_scores: dict[str, list[float]] = {}
    if gold_kind == "rm":  # the gold RM: loaded after the proxy is freed, cached under its own identity
        gold_scores = _score_all(gold, targets, gen, gkeys, gen_msgs, s, cache, notes)

    # ---- phase 4: LLM judge
    judged: dict[str, list[tuple[float, list]]] = {}
    if judge is not None:
        if base_target is None:
            notes.append("the LLM judge compares against a baseline: pass --baseline; judge skipped")
        else:
            base_resp = gen[base_target.label]["responses"]
            for t in targets:
                if t is base_target:
                    continue
                k = key_of("judge", gkeys[t.label], gkeys[base_target.label], judge.url, judge.model)
                hit = cache.get("judge", k)
                if hit is None:
                    res = []
                    for pm, a, b in zip(gen_msgs, gen[t.label]["responses"], base_resp):
                        res.append((0.5, ["same", "same"]) if a["text"].strip() == b["text"].strip()
                                   else judge.compare(prompt_text(pm), a["text"], b["text"]))
                    hit = cache.put("judge", k, res)
                judged[t.label] = [(float(o), v) for o, v in hit]

    result = assemble(targets, gen, kl, rm_scores, judged, base_target, prompt_msgs, s, notes,
                      gold_scores=gold_scores, gold=gold_kind, starts=starts, added=added)
    if outp is not None:
        write_outputs(result, outp)
    return result


def answered(prompt_msgs: list, s: EvalSettings) -> list:
    """The prompts as decoded: with ``samples`` > 1 each is answered that many times, the
    answers of a prompt kept together."""
    return [p for p in prompt_msgs for _ in range(s.samples)]


def _own_part(t: Target, prompt_msgs: list, convs: list, s: EvalSettings, cache: Cache
              ) -> tuple[str, dict, float | None]:
    """What needs ``t`` alone in memory: held-out NLL, responses and their log-probs under ``t``.
    Returns (cache key, the part, seconds it took; None when it came from the cache)."""
    from chatforge.models.load import load

    gen_settings = {k: v for k, v in asdict(s).items() if k not in ("z",)}
    k = key_of("gen", identity(t.path), t.template, key_of(prompt_msgs, convs), gen_settings)
    hit = cache.get("gen", k)
    if hit is not None:
        return k, hit, None
    t0 = time.time()
    model, tok = load(t.path, dtype=s.dtype, merge_adapter=True)
    model.eval()
    nll = heldout_nll(model, tok, convs, t.template, max(1, s.batch_size // 2), s.max_len) if convs else []
    sampling = SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                              top_k=s.top_k, seed=s.seed)
    gen_msgs = answered(prompt_msgs, s)
    resp = generate_responses(decoding_copy(model, s.gen_dtype), tok, gen_msgs, t.template, sampling,
                              s.gen_batch_size, s.max_len)
    lps = response_logprobs(model, [r["prompt_ids"] for r in resp], [r["token_ids"] for r in resp],
                            max(1, s.batch_size // 2), s.max_len)
    for r, lp in zip(resp, lps):
        r["logp"] = lp
    part = cache.put("gen", k, {"nll": nll, "responses": resp, "vocab": len(tok)})
    del model, tok
    gc.collect()
    return k, part, time.time() - t0


def measure_model(model: str | Path, prompts: str | Path | None, heldout: str | Path | None, out: str | Path,
                  settings: EvalSettings) -> tuple[float | None, int]:
    """Evaluate one plain model's own part (perplexity, responses, log-probs) into the cache
    under ``out``; returns (the seconds it took, None when it was cached already; the number
    of prompts).

    A budgeted pipeline calls this for the base model before it trains: the base model is
    evaluated anyway, so nothing is spent twice (:func:`evaluate_runs` finds it in the
    cache), and its time prices the whole evaluation on this CPU before the training
    stages divide what is left of the budget."""
    s = settings.validate()
    prompt_msgs, convs = load_eval_data(prompts, heldout, s)
    (t,), _ = targets_of("base", model)
    cache = Cache(Path(out) / "cache")
    _warm_up(t, prompt_msgs, s)
    return _own_part(t, prompt_msgs, convs, s, cache)[2], len(prompt_msgs)


def _warm_up(t: Target, prompt_msgs: list, s: EvalSettings) -> None:
    """Pay the process's one-time costs (first load, the engine's kernel choice for this batch
    shape) outside the timed part: they came to 4-9 s of a 25-34 s base part on a 2-core CPU,
    and the eval stage, later in the same process, does not pay them again."""
    from chatforge.models.load import load

    model, tok = load(t.path, dtype=s.dtype, merge_adapter=True)
    model.eval()
    msgs = answered(prompt_msgs, s)[: s.gen_batch_size]
    generate_responses(decoding_copy(model, s.gen_dtype), tok, msgs, t.template,
                       SamplingConfig(max_new_tokens=2, temperature=s.temperature, seed=s.seed), s.gen_batch_size,
                       s.max_len)
    del model, tok
    gc.collect()


def find_target(targets: Sequence[Target], model: str | Path) -> Target | None:
    """The target that *is* ``model``: a run folder's final model (or newest checkpoint), or
    the target loading the same model folder; None when ``model`` is not among them."""
    from chatforge.models.load import resolve

    m = str(model)
    p = Path(m).expanduser()
    if p.is_dir():
        rp = p.resolve()
        hit = next((t for t in targets if t.final and t.run_dir and Path(t.run_dir).resolve() == rp), None)
        if hit is not None:
            return hit
    d = Path(resolve(m).path).resolve()
    return next((t for t in targets
                 if t.path == m or (Path(t.path).exists() and Path(resolve(t.path).path).resolve() == d)), None)


def _check_gold(gold: str | Path | None, rm: str | Path | None, judge: Any, baseline: Any) -> str | None:
    """``"rm"``, ``"judge"`` or None; ConfigError for a gold judge that cannot work."""
    if gold is None:
        return None
    if str(gold) == "judge":
        if judge is None:
            raise ConfigError("gold=judge makes the LLM judge the gold judge: give judge_url and judge_model "
                              "(--judge-url, --judge-model)")
        if baseline is None:
            raise ConfigError("gold=judge compares every response with the baseline's: give a baseline (--baseline)")
        return "judge"
    gp = Path(str(gold)).expanduser()
    if not gp.exists():
        raise ConfigError(f"gold: {gold}: no such reward model (a run folder or a model directory)")
    if rm is not None and _rm_identity(gp)[0] == _rm_identity(Path(str(rm)).expanduser())[0]:
        raise ConfigError(f"gold: {gold} is the proxy reward model (--rm) itself: the gold judge must be one RL "
                          f"never saw (e.g. an RM trained on a disjoint part of the preferences)")
    return "rm"


def _score_all(rm: str | Path, targets: list[Target], gen: dict, gkeys: dict, prompt_msgs: list, s: EvalSettings,
               cache: Cache, notes: list[str]) -> dict[str, list[float]]:
    from chatforge.models.heads import load_scorer

    rid = _rm_identity(Path(str(rm)))
    scores: dict[str, list[float]] = {}
    todo = []
    for t in targets:
        hit = cache.get("rm", key_of("rm", gkeys[t.label], rid))
        if hit is not None:
            scores[t.label] = hit
        else:
            todo.append(t)
    if todo:
        scorer = load_scorer(rm, batch_size=s.batch_size, max_len=s.max_len, precision="fp32", dtype=s.dtype,
                             tokenizer_from=todo[0].path)
        for t in todo:
            texts = [r["text"] for r in gen[t.label]["responses"]]
            sc = scorer.score(prompt_msgs, texts, template=t.template)
            scores[t.label] = cache.put("rm", key_of("rm", gkeys[t.label], rid), sc)
        del scorer
        gc.collect()
    return scores


def _rm_identity(p: Path) -> list[Any]:
    from chatforge.models.load import run_model_dir

    d = run_model_dir(p) or p
    return [str(d.resolve()), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(d.rglob("*"))
                               if f.is_file() and (f.suffix == ".safetensors" or f.name.endswith(".json"))]]


# ================================================================ rows, best, warnings
def _fin(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


# selection metrics in order of preference: (row key, items key, higher is better, min delta for regressions)
GOLD_SELECTION = {"rm": [("gold_win_rate", "gwin", True, 0.0), ("gold_score", "gold", True, 0.0)],
                  "judge": [("judge_win_rate", "judge", True, 0.0)]}
SELECTION = [("win_rate", "win", True, 0.0), ("judge_win_rate", "judge", True, 0.0), ("rm_score", "rm", True, 0.0),
             ("ppl", "nll", False, 0.005)]
TIE_BREAK = {"win_rate": "rm_score", "judge_win_rate": "rm_score", "gold_win_rate": "gold_score"}
GOLD_KEY = {"rm": "gold_score", "judge": "judge_win_rate"}  # the gold value of a row, for the warnings


def _score_wins(resp: list[dict], base_resp: list[dict], sc: list[float], base_sc: list[float]) -> list[float]:
    """Per-prompt outcomes by score vs the baseline's response (identical texts tie)."""
    return [0.5 if a["text"].strip() == b["text"].strip() else M.compare_scores(x, y, 1e-6)
            for a, b, x, y in zip(resp, base_resp, sc, base_sc)]


def per_prompt(xs: Sequence[float], n: int) -> list[float]:
    """Means over each prompt's ``n`` responses (they come grouped): the items of paired tests and
    bootstrap intervals, since one prompt's samples are not independent of each other."""
    return list(xs) if n <= 1 else [M.mean(xs[i:i + n]) for i in range(0, len(xs), n)]


def assemble(targets: list[Target], gen: dict, kl: dict, rm_scores: dict, judged: dict, base_target: Target | None,
             prompt_msgs: list, s: EvalSettings, notes: list[str], *, gold_scores: dict | None = None,
             gold: str | None = None, starts: Mapping[str, str] | None = None, added: Sequence[str] = ()
             ) -> EvalResult:
    """Rows, samples, best checkpoint per run, regression and over-optimisation warnings (pure: no models).

    ``rm_scores`` are the proxy RM's, ``gold_scores`` the gold RM's; ``gold`` says which judge
    is gold (``"rm"``, ``"judge"`` or None); ``starts`` maps a label to its run's start row,
    ``added`` lists start rows added only for comparison."""
    gold_scores = gold_scores or {}
    starts = starts or {}
    rows, samples = [], []
    items: dict[str, dict[str, list[float]]] = {}
    base_lab = base_target.label if base_target else None
    per = s.samples  # responses per prompt, grouped
    for t in targets:
        g = gen[t.label]
        resp = g["responses"]
        texts = [r["text"] for r in resp]
        nll = g["nll"]
        ntok = sum(n for _, n in nll)
        conv_nll = [x / n for x, n in nll if n > 0]
        loops = [1.0 if r.get("token_loop") or M.falls_into_loop(x) else 0.0 for r, x in zip(resp, texts)]
        row: dict[str, Any] = {
            "run": t.run, "checkpoint": t.name, "label": t.label, "path": t.path, "step": t.step,
            "final": t.final, "baseline": t.label == base_lab, "ref": t.ref,
            "chat": t.run_dir if t.final and t.run_dir else t.path,  # what `chatforge chat` should load
            "ppl": math.exp(sum(x for x, _ in nll) / ntok) if ntok else None,
            "nll": M.mean(conv_nll) if conv_nll else None, "nll_se": M.stderr(conv_nll) if conv_nll else None,
            "kl": M.mean(kl[t.label]) if t.label in kl else None,
            "len_tokens": M.mean([len(r["token_ids"]) for r in resp]),
            "len_words": M.mean([len(M.words(x)) for x in texts]),
            **M.degeneration(texts, [r["finish_reason"] for r in resp]),
            "loop_rate": M.mean(loops),  # words or tokens (see token_loop)
            "refusal_rate": M.refusal_rate(texts),
            "start": starts.get(t.label), "n_prompts": len(resp) // per, "n_responses": len(resp),
        }
        it = {"nll": conv_nll, "loop": per_prompt(loops, per)}
        outcomes: dict[str, list[float]] = {}  # per response, for samples.jsonl
        for scores, pre, score_key, win_key in ((rm_scores, "", "rm", "win"), (gold_scores, "gold_", "gold", "gwin")):
            if t.label not in scores:
                continue
            sc = scores[t.label]
            row[f"{pre or 'rm_'}score"], row[f"{pre or 'rm_'}score_std"] = M.mean(sc), M.std(sc)
            it[score_key] = per_prompt(sc, per)
            if base_lab is not None and base_lab in scores:  # the baseline itself: all ties, 0.5
                outc = _score_wins(resp, gen[base_lab]["responses"], sc, scores[base_lab])
                row[f"{pre}win_rate"] = M.win_rate(outc)
                row[f"{pre}win_lo"], row[f"{pre}win_hi"] = M.bootstrap_ci(per_prompt(outc, per), seed=s.seed)
                it[win_key], outcomes[win_key] = per_prompt(outc, per), outc
                # the paired difference in mean score, per prompt: continuous, so far more sensitive than
                # the win rate (which counts a tiny and a large margin alike and ties identical answers)
                d = [x - y for x, y in zip(it[score_key], per_prompt(scores[base_lab], per))]
                row[f"{pre or 'rm_'}delta"] = M.mean(d)
                row[f"{pre or 'rm_'}delta_lo"], row[f"{pre or 'rm_'}delta_hi"] = M.bootstrap_ci(d, seed=s.seed)
        if t.label == base_lab and judged:
            judged[t.label] = [(0.5, ["same", "same"])] * len(resp)
        if t.label in judged:
            outc = [o for o, _ in judged[t.label]]
            row["judge_win_rate"], row["judge_win_rate_std"] = M.win_rate(outc), M.std(outc)
            it["judge"] = per_prompt(outc, per)
        rows.append({k: _fin(v) if isinstance(v, float) else v for k, v in row.items()})
        items[t.label] = it
        for i, r in enumerate(resp):
            smp = {"label": t.label, "run": t.run, "checkpoint": t.name, "prompt_index": i // per, "sample": i % per,
                   "response": r["text"],
                   "finish_reason": r["finish_reason"], "n_tokens": len(r["token_ids"]), "loop": bool(loops[i]),
                   "refusal": M.is_refusal(texts[i])}
            if t.label in kl:
                smp["kl"] = kl[t.label][i]
            if t.label in rm_scores:
                smp["rm_score"] = rm_scores[t.label][i]
            if "win" in it:
                smp["rm_outcome"] = outcomes["win"][i]
            if t.label in gold_scores:
                smp["gold_score"] = gold_scores[t.label][i]
            if "gwin" in it:
                smp["gold_outcome"] = outcomes["gwin"][i]
            if t.label in judged:
                smp["judge_outcome"], smp["judge_verdicts"] = judged[t.label][i]
            samples.append(smp)

    # ---- which metric picks the best checkpoint
    def has(k: str) -> bool:
        return any(r.get(k) is not None for r in rows if not r["baseline"])

    selection, key, higher, min_delta = None, None, True, 0.0
    for sel, k, hi, md in GOLD_SELECTION.get(gold or "", []) + SELECTION:  # by gold first, when there is one
        if has(sel):
            selection, key, higher, min_delta = sel, k, hi, md
            break
    if selection is None:
        notes.append("no selection metric (no held-out conversations and no RM/judge): best checkpoint not flagged")

    best: dict[str, str] = {}
    warnings: list[str] = []
    by_run: dict[str, list[int]] = {}
    run_best: list[int] = []  # the best row of each run, plain models included
    evaluated_runs = {t.run for t in targets if t is not base_target and t.label not in added}
    for i, r in enumerate(rows):
        if r["run"] in evaluated_runs:  # a baseline added only for comparison has no trajectory
            by_run.setdefault(r["run"], []).append(i)
    for run, idx in by_run.items():
        if selection is None:
            break
        bi = _best_row(rows, idx, selection, higher)
        if bi is None:
            continue
        run_best.append(bi)
        if len(idx) < 2:  # a plain model: nothing to choose between, but it competes overall
            continue
        rows[bi]["best"] = True
        best[run] = rows[bi]["label"]
        if bi != idx[-1]:  # strictly better than the last (exact ties go to the later one)
            last = rows[idx[-1]]
            tie = TIE_BREAK.get(selection)
            by = [selection] + ([tie] if tie and last.get(selection) == rows[bi][selection] else [])
            notes.append(f"{run}: best checkpoint is {rows[bi]['checkpoint']} ("
                         + ", ".join(f"{k} {_fmt(rows[bi].get(k))}" for k in by) + "), not the last ("
                         + ", ".join(f"{k} {_fmt(last.get(k))}" for k in by) + f"): {rows[bi]['path']}")
        proxy = "win_rate" if has("win_rate") else "rm_score"
        pi = _best_row(rows, idx, proxy, True) if gold and has(proxy) else None
        if pi is not None and pi != bi:  # what choosing by the proxy would have taken instead
            notes.append(f"{run}: by the proxy RM the best would be {rows[pi]['checkpoint']} ({proxy} "
                         f"{_fmt(rows[pi].get(proxy))}); by gold it is {rows[bi]['checkpoint']} ({selection} "
                         f"{_fmt(rows[bi].get(selection))} vs {_fmt(rows[pi].get(selection))})")
        # oscillation: later checkpoints worse than earlier ones beyond noise
        labs = [rows[i]["label"] for i in idx]
        for metric, k, hi, md, what in ((selection, key, higher, min_delta, selection),
                                        ("loop_rate", "loop", False, 0.1, "loop rate")):
            series = [items[lab].get(k) for lab in labs]
            if any(x is None for x in series) or len(series) < 2:
                continue
            for reg in M.regressions(series, hi, z=s.z, min_delta=md):
                ri, re_ = rows[idx[reg.index]], rows[idx[reg.earlier]]
                v, ev = ri.get(metric), re_.get(metric)
                msg = (f"{run}: {ri['checkpoint']} is worse than the earlier {re_['checkpoint']} on {what} "
                       f"({_fmt(v)} vs {_fmt(ev)}; paired difference {reg.delta:.3g} > {s.z:g} x se {reg.se:.2g})")
                warnings.append(msg)
                ri.setdefault("regressions", []).append(f"{what} worse than {re_['checkpoint']}")
    # over-optimisation (proxy up, gold down) and jumps vs the start: refusals, loops, no end-of-turn, length
    # (a baseline's run counts here: SFT that made the base model worse must say so)
    for f in findings(rows, GOLD_KEY.get(gold or ""), runs=sorted({t.run for t in targets if t.label not in added})):
        warnings.append(f.text)
        next(r for r in rows if r["label"] == f.label).setdefault("flags", []).append(f.kind)
    run_best += [i for i, r in enumerate(rows) if r["run"] not in evaluated_runs]  # a baseline may beat them all
    if selection is not None and run_best:
        best["overall"] = rows[_best_row(rows, run_best, selection, higher)]["label"]
    for r in rows:
        r.setdefault("best", False)
    pr = [{"index": i, "text": prompt_text(p), "messages": p} for i, p in enumerate(prompt_msgs)]
    st = asdict(s)
    return EvalResult(rows, samples, pr, best, selection, warnings, notes, st, gold=gold)


def _best_row(rows: list[dict], idx: list[int], selection: str, higher: bool) -> int | None:
    """The best of ``rows[idx]`` by ``selection``. Win rates saturate (every response beats
    the baseline, or all tie), so ties are broken by the mean score of the same judge
    (:data:`TIE_BREAK`), then by the *later* checkpoint: equal quality for more training is
    no reason to step back."""
    sign = 1.0 if higher else -1.0
    ok = [i for i in idx if rows[i].get(selection) is not None]
    if not ok:
        return None
    tie = TIE_BREAK.get(selection)

    def tie_value(i: int) -> float:
        v = rows[i].get(tie) if tie else 0.0
        return -math.inf if v is None else v

    return max(ok, key=lambda i: (sign * rows[i][selection], tie_value(i), idx.index(i)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_outputs(result: EvalResult, out: Path) -> None:
    """``eval.json`` (everything), ``eval.jsonl`` (one row per checkpoint), ``samples.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    result.out = out
    atomic_write_text(out / "eval.json", json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "eval.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows))
    atomic_write_text(out / "samples.jsonl",
                      "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in result.samples))

"""Chat and serve defaults chosen from measurements, not guessed.

The sampling settings people chat with (temperature, top-p, repetition penalty) decide what
a model sounds like as much as its training does: a small model that answers well greedily
can ramble at temperature 0.7, and one that loops greedily can be fine with a repetition
penalty. :func:`choose_chat_defaults` decodes the same held-out prompts with each of a few
candidate settings, judges the answers (the gold judge when there is one, else the reward
model, else none), measures loops and replies cut off without an end of turn, and picks:

1. among candidates whose loop rate and missing-end-of-turn rate are each within
   ``slack`` of the best candidate's (a setting that degenerates more is never chosen for
   a higher score: reward models are known to pay for rambling); when none is near the
   best on both, among those whose loop + missing-end-of-turn rate is within ``slack`` of
   the lowest,
2. the one with the highest mean judge score (without a judge: the lowest loop + no-EOS
   rate, ties to the earlier candidate).

The result is written as ``chat_defaults.json`` into the model's run folder;
``chatforge chat RUN`` and ``chatforge serve RUN`` start from it
(:func:`chatforge.chat.session.run_sampling_defaults`), and the file keeps every candidate's
figures so the choice can be checked.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from chatforge import textstats as M
from chatforge.generate.sampling import SamplingConfig
from chatforge.runs import CHAT_DEFAULTS_FILE as FILE

# What the candidates vary: the two usual chat temperatures, greedy, and a mild repetition
# penalty on each (1.1: the common choice of llama.cpp / HF chat UIs for small models).
CANDIDATES: tuple[dict[str, float], ...] = (
    {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.0},
    {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1},
    {"temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.1},
    {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0},
    {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.1},
)


def choose(rows: Sequence[dict[str, Any]], slack: float = 0.1) -> int:
    """Index of the chosen candidate among measured ``rows`` (see the module docstring)."""
    best_loop = min(r["loop_rate"] for r in rows)
    best_eos = min(r["no_eos_rate"] for r in rows)
    ok = [i for i, r in enumerate(rows) if r["loop_rate"] <= best_loop + slack and r["no_eos_rate"] <= best_eos + slack]
    if not ok:  # no setting is near the best on both (one loops least, another ends its turns most): the
        # settings nearest the best on the two together
        both = [r["loop_rate"] + r["no_eos_rate"] for r in rows]
        ok = [i for i, b in enumerate(both) if b <= min(both) + slack]
    if all(r.get("score") is not None for r in rows):
        return max(ok, key=lambda i: (rows[i]["score"], -i))
    return min(ok, key=lambda i: (rows[i]["loop_rate"] + rows[i]["no_eos_rate"], i))


def choose_chat_defaults(model: str | Path, prompts: list[list[dict]], template: str = "auto",
                         judge: str | Path | None = None, max_new_tokens: int = 96, seed: int = 0, batch_size: int = 8,
                         candidates: Sequence[dict[str, float]] = CANDIDATES, slack: float = 0.1,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every candidate on ``prompts`` (OpenAI messages lists) and return the record
    written to ``chat_defaults.json``: the chosen ``settings`` and every candidate's figures.
    ``template``: the chat template the model was trained with (its run's)."""
    import gc

    from chatforge.eval.measure import decoding_copy, generate_responses
    from chatforge.models.heads import load_scorer
    from chatforge.models.load import load

    if not prompts:
        raise ValueError("choose_chat_defaults: no prompts")
    t0 = time.time()
    m, tok = load(str(model), merge_adapter=True)
    m.eval()
    dec = decoding_copy(m, "auto")
    answers = []
    for c in candidates:
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, seed=seed, **c)
        answers.append(generate_responses(dec, tok, prompts, template, cfg, batch_size))
    del m, dec
    gc.collect()
    scores: list[list[float] | None] = [None] * len(candidates)
    if judge is not None:
        scorer = load_scorer(judge, batch_size=batch_size)
        scores = [scorer(prompts, [r["text"] for r in a]) for a in answers]
        del scorer
        gc.collect()
    rows = []
    for c, a, sc in zip(candidates, answers, scores):
        texts, reasons = [r["text"] for r in a], [r["finish_reason"] for r in a]
        loops = [M.falls_into_loop(t) or r["token_loop"] for t, r in zip(texts, a)]
        rows.append({"settings": dict(c), "score": None if sc is None else round(M.mean(sc), 4),
                     "loop_rate": round(sum(loops) / len(loops), 4), "no_eos_rate": round(M.no_eos_rate(reasons), 4),
                     "mean_tokens": round(sum(len(r["token_ids"]) for r in a) / len(a), 1)})
    pick = choose(rows, slack)
    record = {"settings": {**rows[pick]["settings"], "max_tokens": 512},
              "chosen_by": ("highest mean score of the judge" if judge is not None else
                            "lowest loop + missing end-of-turn rate (no judge)") +
                           f" among candidates within {slack:g} of the best loop and no-EOS rates",
              "judge": None if judge is None else str(judge), "model": str(model), "prompts": len(prompts),
              "max_new_tokens": max_new_tokens, "seed": seed, "candidates": rows,
              "time_s": round(time.time() - t0, 1), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for i, r in enumerate(rows):
        s = r["settings"]
        mark = " <- chosen" if i == pick else ""
        score = "-" if r["score"] is None else f"{r['score']:.3f}"
        log(f"  chat defaults: T={s['temperature']:g} top_p={s['top_p']:g} rep={s['repetition_penalty']:g}: "
            f"score {score}, loops {r['loop_rate']:.0%}, no end-of-turn {r['no_eos_rate']:.0%}, "
            f"{r['mean_tokens']:.0f} tokens{mark}")
    return record


def write(record: dict[str, Any], folder: str | Path) -> Path:
    from chatforge.runs import atomic_write_text

    p = Path(folder) / FILE
    atomic_write_text(p, json.dumps(record, indent=2) + "\n")
    return p

"""The pipeline report: ``report.html`` (self-contained) and ``report.md`` (terminals).

``report.html`` opens from disk anywhere: CSS inline, every figure a PNG embedded as a
base64 data URI, no script, no external reference. The PNGs are also written beside it
(into the pipeline folder) so ``report.md`` can show them where Markdown renders images.

Contents: the warnings first (over-optimisation, jumps vs the start, regressions), the
checkpoint table (best flagged), notes, the over-optimisation curve (proxy and gold reward
against KL, when there is a gold judge), training curves of each stage (from its
``metrics.jsonl``), the evaluation's per-checkpoint curves, and sample responses side by
side on the same held-out prompts.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from chatforge.eval.evaluate import EvalResult
from chatforge.eval.tasks import verdict_lines
from chatforge.runs import atomic_write_text, read_metrics

# metric keys never worth a panel
_BOOKKEEPING = ("step", "time", "lr", "tokens_per_s", "step_time_s", "grad_norm", "epoch", "peak_rss", "samples_per_s",
                "wall", "tokens", "episodes", "episodes_per_s", "train_min")
# the panels of each kind of stage: (title, metric keys drawn together); train and held-out
# values of one quantity share a panel so they can be compared at a glance
PANELS = {
    "sft": [("loss", ["loss", "eval_loss"]), ("held-out perplexity", ["eval_ppl"])],
    "rm": [("accuracy", ["acc", "eval_acc"]), ("loss", ["loss", "eval_loss"]), ("margin", ["margin", "eval_margin"]),
           ("ranking", ["eval_tau", "eval_top1"])],
    "ppo": [("reward", ["reward", "score"]), ("KL to reference", ["kl", "kl_k3"]), ("entropy", ["entropy"]),
            ("response length", ["response_len"]), ("end-of-turn rate", ["eot_rate"])],
    "dpo": [("loss", ["loss", "eval_loss"]), ("accuracy", ["acc", "eval_acc"]), ("margin", ["margin", "eval_margin"]),
            ("KL to reference", ["kl"])],
}
MAX_PANELS = 5

# (row key, column header, format)
COLUMNS = [
    ("step", "step", "d"),
    ("ppl", "ppl", ".2f"),
    ("kl", "KL", ".2f"),
    ("rm_score", "RM", ".3f"),
    ("win_rate", "win", ".2f"),
    ("gold_score", "gold", ".3f"),
    ("gold_delta", "gold Δ", "+.3f"),
    ("gold_win_rate", "gold win", ".2f"),
    ("judge_win_rate", "judge", ".2f"),
    ("len_tokens", "len", ".0f"),
    ("rep_ngram", "rep3", ".2f"),
    ("distinct_1", "d-1", ".2f"),
    ("distinct_2", "d-2", ".2f"),
    ("loop_rate", "loop", ".0%"),
    ("no_eos_rate", "no-EOS", ".0%"),
    ("refusal_rate", "refuse", ".0%"),
]
WIN_INTERVALS = {"win_rate": "win", "gold_win_rate": "gold_win", "gold_delta": "gold_delta"}  # -> its _lo/_hi

LEGEND = ("ppl: held-out perplexity (assistant tokens) · KL: Σ log π/π_ref over the response, to the run's "
          "starting model (a plain model: to the baseline) · RM: mean reward by the proxy RM (the one RL "
          "optimised) · win: its win rate vs the baseline (ties ½) [95% bootstrap] · gold / gold win: the same "
          "by the gold RM, which RL never saw · gold Δ: mean gold score minus the baseline's, paired by prompt [95% bootstrap over prompts] · judge: LLM-judge win rate (both orders) · len: response tokens · rep3: repeated "
          "3-gram rate · d-1/d-2: distinct-1/2 · loop: share of responses ending in a loop · no-EOS: share cut by "
          "the token budget · refuse: share opening with a refusal (\"I'm sorry\", \"I cannot\", ...) · "
          "start: the model a run began from · ★ best checkpoint of its run (by gold when there is a gold judge) · "
          "⚠ worse than an earlier checkpoint beyond noise, or warned about above")


# ---------------------------------------------------------------- figures
def stage_kind(name: str, rows: Sequence[dict[str, Any]] = ()) -> str:
    n = name.lower()
    for kind in ("sft", "dpo", "ppo", "rloo", "rm", "reward"):
        if kind in n:
            return {"rloo": "ppo", "reward": "rm"}.get(kind, kind)
    keys = {k for r in rows for k in r}
    if any("kl" in k for k in keys) and any("reward" in k for k in keys):
        return "ppo"
    return "sft"


def numeric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Metric keys with numbers, bookkeeping (time, lr, throughput) and details left out."""
    out: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k in out or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if any(k == b or k.startswith(b + "_") or k.endswith("_" + b) for b in _BOOKKEEPING):
                continue
            if "/" in k or k.endswith("_std"):  # reward parts, spreads: detail for metrics.jsonl
                continue
            out.append(k)
    return out


def stage_panels(rows: Sequence[dict[str, Any]], kind: str) -> list[tuple[str, list[str]]]:
    """The known panels of a stage kind that have data; else one panel per metric."""
    have = set(numeric_keys(rows))
    panels = [(t, [k for k in keys if k in have]) for t, keys in PANELS.get(kind, [])]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        panels = [(k, [k]) for k in numeric_keys(rows)]
    return panels[:MAX_PANELS]


def plot_panels(rows: Sequence[dict[str, Any]], panels: list[tuple[str, list[str]]], out: Path, title: str = "",
                x: str = "step") -> Path | None:
    """One PNG, a panel per (title, keys); several keys in a panel are drawn as labelled lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels), 3.0), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r[x], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and x in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None,
                    label=k, linestyle="--" if k.startswith("eval_") else "-")
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def stage_curves(name: str, run: str | Path, out_dir: Path) -> Path | None:
    rows = read_metrics(Path(run) / "metrics.jsonl")
    if not rows:
        return None
    return plot_panels(rows, stage_panels(rows, stage_kind(name, rows)), out_dir / f"curves_{_slug(name)}.png",
                       title=f"{name} ({Path(run).name})")


def checkpoint_curves(result: EvalResult, out: Path) -> Path | None:
    """Per-checkpoint evaluation figures vs training step, a row of panels per run with at
    least two checkpoints: where the oscillations show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in (result.selection, "kl", "loop_rate", "refusal_rate", "rep_ngram", "len_tokens") if k]
    keys = list(dict.fromkeys(keys))
    runs: dict[str, list[dict]] = {}
    for r in result.rows:
        if r.get("step") is not None:
            runs.setdefault(r["run"], []).append(r)
    runs = {k: v for k, v in runs.items() if len(v) >= 2}
    keys = [k for k in keys if any(r.get(k) is not None for v in runs.values() for r in v)]
    if not runs or not keys:
        return None
    # one row of panels per run: steps of different stages are not on one scale
    fig, axes = plt.subplots(len(runs), len(keys), figsize=(3.6 * len(keys), 2.7 * len(runs) + 0.4), squeeze=False)
    for row_axes, (run, rs) in zip(axes, runs.items()):
        for ax, k in zip(row_axes, keys):
            pts = sorted(((r["step"], r[k], r) for r in rs if r.get(k) is not None), key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            for x, y, r in pts:
                if k == result.selection and r.get("best"):
                    ax.plot([x], [y], marker="*", markersize=15, color="gold", markeredgecolor="k")
                if r.get("regressions"):
                    ax.plot([x], [y], marker="x", markersize=10, color="red", mew=2)
            ax.set_title(f"{run}: {k}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.suptitle("evaluation per checkpoint (★ best, × worse than an earlier checkpoint)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


GOLD_LABEL = {"rm": ("gold_score", "gold RM score"), "judge": ("judge_win_rate", "gold: LLM-judge win rate")}


def overoptimisation_curve(result: EvalResult, out: Path) -> Path | None:
    """The over-optimisation curve (Gao et al. 2022): per run, the proxy reward (left axis) and
    the gold value (right axis) of its start and of every checkpoint against the KL to the
    start (the start at 0). Proxy rising while gold turns down is reward hacking. None
    without a gold judge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gold_key, gold_name = GOLD_LABEL.get(result.gold or "", (None, None))
    if gold_key is None:
        return None
    label_of = {r["label"]: r for r in result.rows}
    runs: dict[str, list[tuple[float, dict, bool]]] = {}
    for r in result.rows:
        st = label_of.get(r.get("start") or "")
        if st is None or r.get("kl") is None or (r.get("rm_score") is None and r.get(gold_key) is None):
            continue
        pts = runs.setdefault(r["run"], [(0.0, st, True)])
        pts.append((r["kl"], r, False))
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 3.4), squeeze=False)
    for ax, (run, pts) in zip(axes[0], runs.items()):
        ax2 = ax.twinx()
        for a, key, colour, name in ((ax, "rm_score", "C0", "proxy RM score"), (ax2, gold_key, "C1", gold_name)):
            xy = [(x, r[key], r, st) for x, r, st in pts if r.get(key) is not None]
            a.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", color=colour, label=name)
            a.set_ylabel(name, color=colour, fontsize=9)
            for x, y, r, is_start in xy:
                if is_start:
                    a.annotate("start", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
                elif key == gold_key and r.get("best"):
                    a.plot([x], [y], marker="*", markersize=15, color="gold", markeredgecolor="k")
                if "overoptimisation" in (r.get("flags") or []) and key == gold_key:
                    a.plot([x], [y], marker="x", markersize=10, color="red", mew=2)
        ax.set_title(f"{run}: proxy and gold vs KL", fontsize=10)
        ax.set_xlabel("KL to the start (Σ log π/π_ref per response)")
        ax.grid(alpha=0.3)
    fig.suptitle("over-optimisation curve (★ best by gold, × proxy up while gold down)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- the table
def _cell(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if fmt == "d":
        return str(int(v))
    return format(v, fmt)


def table(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the checkpoint table (only the columns that have a value)."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in result.rows)]
    header = ["model"] + [c[1] for c in cols]
    body = []
    starts = {r.get("start") for r in result.rows}
    for r in result.rows:
        tags = [t for t, on in (("final", r.get("final") and r["checkpoint"] != "final"),
                                ("baseline", r.get("baseline")), ("start", r["label"] in starts)) if on]
        name = r["label"] + (f" ({', '.join(tags)})" if tags else "")
        name += " ★" if r.get("best") else ""
        name += " ⚠" if r.get("regressions") or r.get("flags") else ""
        cells = [name]
        for k, _, fmt in cols:
            c = _cell(r.get(k), fmt)
            pre = WIN_INTERVALS.get(k)
            if pre and r.get(f"{pre}_lo") is not None and not r.get("baseline"):
                lo, hi = r[f"{pre}_lo"], r[f"{pre}_hi"]
                c += f" [{lo:+.2f}, {hi:+.2f}]" if k.endswith("_delta") else f" [{lo:.2f}–{hi:.2f}]"
            cells.append(c)
        body.append(cells)
    return header, body


def best_lines(result: EvalResult) -> list[str]:
    """'best of ppo: ppo/step-40 (win_rate 0.71)' per run, then the overall best and how to chat with it."""
    out = []
    for run, lab in result.best.items():
        if run == "overall":
            continue
        v = result.row(lab).get(result.selection) if result.selection else None
        out.append(f"best of {run}: {lab} ({result.selection} {_cell(v, '.3g')})")
    if "overall" in result.best:
        row = result.row(result.best["overall"])
        out.append(f"best overall: {row['label']} - chat with it: chatforge chat {row.get('chat') or row['path']}")
    return out


def markdown_table(result: EvalResult) -> str:
    header, body = table(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def text_table(result: EvalResult) -> str:
    """Aligned plain-text table for the terminal."""
    header, body = table(result)
    w = [max(len(x) for x in col) for col in zip(header, *body)]
    fmt = lambda row: "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * x for x in w)] + [fmt(r) for r in body])


# ---------------------------------------------------------------- samples side by side
def sample_columns(result: EvalResult) -> list[dict[str, Any]]:
    """One row per run to show: its best checkpoint, else its final model, else its last."""
    out: dict[str, dict] = {}
    for r in result.rows:
        cur = out.get(r["run"])
        rank = (2 if r.get("best") else 1 if r.get("final") else 0)
        if cur is None or rank >= (2 if cur.get("best") else 1 if cur.get("final") else 0):
            out[r["run"]] = r
    return list(out.values())


def side_by_side(result: EvalResult, samples: Sequence[dict[str, Any]], max_prompts: int = 6
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(columns, [{"prompt": text, "responses": [sample or None per column]}])."""
    cols = sample_columns(result)
    by: dict[tuple[str, int], dict[str, Any]] = {}
    for s in samples:  # with several responses per prompt, the first is shown
        by.setdefault((s["label"], s["prompt_index"]), s)
    rows = []
    for p in result.prompts[:max_prompts]:
        rows.append({"prompt": p["text"], "responses": [by.get((c["label"], p["index"])) for c in cols]})
    return cols, rows


# ---------------------------------------------------------------- writing
def _column_title(row: dict[str, Any]) -> str:
    tags = [t for t, on in (("best", row.get("best")), ("baseline", row.get("baseline"))) if on]
    return row["label"] + (f" ({', '.join(tags)})" if tags else "")


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s)


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1280px;color:#222;
padding:0 16px;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;font-size:.88em;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f4f4f6;text-align:center} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.best td{background:#fff8d6} tr.regressed td:first-child{color:#b00020}
.warn{background:#fdecea;border-left:4px solid #d93025;padding:6px 10px;margin:4px 0}
.note{background:#eef3fd;border-left:4px solid #4a76d4;padding:6px 10px;margin:4px 0}
.legend{color:#555;font-size:.82em;max-width:1100px}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
table.samples{table-layout:fixed;width:100%} table.samples td{white-space:pre-wrap;word-wrap:break-word;font-size:.85em}
table.samples td.prompt{background:#fafafa;font-weight:600}
.tag{display:inline-block;font-size:.75em;padding:0 5px;border-radius:3px;background:#eee;color:#555;margin-left:4px}
.tag.bad{background:#fdecea;color:#b00020}
"""


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n].rstrip() + " …"


def render_html(title: str, figures: list[tuple[str, Path]], result: EvalResult | None,
                samples: Sequence[dict[str, Any]], stages: Mapping[str, str | Path], max_chars: int = 1200,
                yardstick: Mapping[str, Any] | None = None) -> str:
    h = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_esc(title)}</title>",
         f"<style>{CSS}</style></head><body>", f"<h1>{_esc(title)}</h1>",
         f"<p class=meta>written {time.strftime('%Y-%m-%d %H:%M')}"]
    if stages:
        h.append(" · stages: " + ", ".join(f"<b>{_esc(k)}</b> <code>{_esc(v)}</code>" for k, v in stages.items()))
    h.append("</p>")
    if result is not None and result.warnings:
        h.append("<h2>Warnings</h2>")
        for w in result.warnings:
            h.append(f"<div class=warn>⚠ {_esc(w)}</div>")
    if result is not None:
        h.append("<h2>Checkpoints</h2>")
        st = result.settings
        per = st.get("samples") or 1
        h.append(f"<p class=meta>{len(result.prompts)} held-out prompts · max {_esc(st.get('max_new_tokens'))} new "
                 f"tokens · {'greedy' if not st.get('temperature') else 'temperature ' + _esc(st.get('temperature'))}"
                 f"{f' · {per} responses per prompt (intervals over prompts)' if per > 1 else ''}"
                 f" · best by <b>{_esc(result.selection or 'nothing')}</b></p>")
        for line in best_lines(result):
            h.append(f"<p>★ {_esc(line)}</p>")
        header, body = table(result)
        h.append("<table class=ckpt><tr>" + "".join(f"<th>{_esc(x)}</th>" for x in header) + "</tr>")
        for r, cells in zip(result.rows, body):
            cls = " ".join(c for c, on in (("best", r.get("best")),
                                           ("regressed", r.get("regressions") or r.get("flags"))) if on)
            h.append(f"<tr class='{cls}'><td>{_esc(cells[0])}</td>"
                     + "".join(f"<td class=num>{_esc(c)}</td>" for c in cells[1:]) + "</tr>")
        h.append("</table>")
        h.append(f"<p class=legend>{_esc(LEGEND)}</p>")
        for n in result.notes:
            h.append(f"<div class=note>{_esc(n)}</div>")
    if yardstick:
        h += yardstick_html(yardstick)
    if figures:
        h.append("<h2>Curves</h2>")
        for cap, png in figures:
            h.append(f"<figure><img alt='{_esc(cap)}' src='{_data_uri(png)}'><figcaption class=meta>{_esc(cap)}"
                     "</figcaption></figure>")
    if result is not None and samples:
        cols, rows = side_by_side(result, samples)
        if rows:
            h.append("<h2>Sample responses</h2><p class=meta>the same held-out prompts; each run's best checkpoint "
                     "(else its final model)</p><table class=samples><tr><th>prompt</th>"
                     + "".join(f"<th>{_esc(_column_title(c))}</th>" for c in cols) + "</tr>")
            for row in rows:
                h.append(f"<tr><td class=prompt>{_esc(_clip(row['prompt'], 600))}</td>")
                for s in row["responses"]:
                    if s is None:
                        h.append("<td>–</td>")
                        continue
                    tags = ""
                    if s.get("loop"):
                        tags += "<span class='tag bad'>loop</span>"
                    if s.get("finish_reason") == "length":
                        tags += "<span class='tag bad'>no EOS</span>"
                    if s.get("refusal"):
                        tags += "<span class='tag bad'>refusal</span>"
                    if s.get("rm_score") is not None:
                        tags += f"<span class=tag>RM {s['rm_score']:.2f}</span>"
                    if s.get("gold_score") is not None:
                        tags += f"<span class=tag>gold {s['gold_score']:.2f}</span>"
                    h.append(f"<td>{_esc(_clip(s['response'].strip(), max_chars)) or '<i>(empty)</i>'}{tags}</td>")
                h.append("</tr>")
            h.append("</table>")
    h.append("</body></html>")
    return "\n".join(h)


def render_markdown(title: str, figures: list[tuple[str, Path]], result: EvalResult | None,
                    samples: Sequence[dict[str, Any]], max_chars: int = 300,
                    yardstick: Mapping[str, Any] | None = None) -> str:
    md = [f"# {title}", ""]
    if result is not None and result.warnings:
        md += ["## Warnings", ""] + [f"> ⚠ {w}" + "  " for w in result.warnings] + [""]
    if result is not None:
        md += ["## Checkpoints", "", markdown_table(result), "", LEGEND, ""]
        md += [f"★ {line}  " for line in best_lines(result)]
        md += [""] + [f"- {n}" for n in result.notes] + [""]
    if yardstick:
        md += yardstick_markdown(yardstick)
    if figures:
        md += ["## Curves", ""] + [f"![{cap}]({png.name})" for cap, png in figures] + [""]
    if result is not None and samples:
        cols, rows = side_by_side(result, samples)
        if rows:
            md += ["## Sample responses", ""]
            for row in rows:
                md.append(f"**{_clip(row['prompt'], 300)}**".replace("\n", " "))
                md.append("")
                for c, s in zip(cols, row["responses"]):
                    txt = "–" if s is None else _clip(s["response"].strip(), max_chars).replace("\n", " ") or "(empty)"
                    md.append(f"- *{_column_title(c)}*: {txt}")
                md.append("")
    return "\n".join(md) + "\n"


def load_yardstick(eval_dir: str | Path) -> dict[str, Any] | None:
    """``eval/arith.json`` (the objective yardstick, ``eval.tasks: [arith]``) when it was run."""
    p = Path(eval_dir) / "arith.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def yardstick_html(data: Mapping[str, Any]) -> list[str]:
    """Accuracy per model and tier, then the paired differences with their verdicts."""
    h = ["<h2>Objective yardstick: arithmetic</h2>",
         f"<p class=meta>held-out problems never used in training · greedy · "
         f"{_esc(data['settings'].get('max_new_tokens'))} new tokens · reward rule: the final number</p>"]
    for line in verdict_lines(data.get("comparisons", [])):
        h.append(f"<p>{'★ ' if line.endswith(': better') else ''}{_esc(line)}</p>")
    h.append("<table><tr>" + "".join(f"<th>{x}</th>" for x in
                                      ("model", "tier", "accuracy", "95% interval", "n", "number only", "no EOS"))
             + "</tr>")
    for r in data.get("rows", []):
        cells = [_cell(r.get("accuracy"), ".3f"), f"{_cell(r.get('lo'), '.3f')}–{_cell(r.get('hi'), '.3f')}",
                 str(r.get("n")), _cell(r.get("number_only"), ".3f"), _cell(r.get("no_eos"), ".3f")]
        h.append(f"<tr><td>{_esc(r['label'])}</td><td>{_esc(r['tier'])}</td>"
                 + "".join(f"<td class=num>{_esc(c)}</td>" for c in cells) + "</tr>")
    h.append("</table>")
    return h


def yardstick_markdown(data: Mapping[str, Any]) -> list[str]:
    md = ["## Objective yardstick: arithmetic", "",
          f"Held-out problems never used in training, greedy, {data['settings'].get('max_new_tokens')} new tokens.", ""]
    md += [f"- {line}" for line in verdict_lines(data.get("comparisons", []))] + [""]
    md += ["| model | tier | accuracy | 95% interval | n | number only | no EOS |", "|---|---|---:|---|---:|---:|---:|"]
    for r in data.get("rows", []):
        md.append(f"| {r['label']} | {r['tier']} | {_cell(r.get('accuracy'), '.3f')} | {_cell(r.get('lo'), '.3f')}–"
                  f"{_cell(r.get('hi'), '.3f')} | {r.get('n')} | {_cell(r.get('number_only'), '.3f')} | "
                  f"{_cell(r.get('no_eos'), '.3f')} |")
    return md + [""]


def load_result(eval_dir: str | Path) -> tuple[EvalResult, list[dict[str, Any]]]:
    """An evaluation written by :func:`chatforge.eval.evaluate.write_outputs`, read back."""
    d = Path(eval_dir)
    data = json.loads((d / "eval.json").read_text(encoding="utf-8"))
    samples = [json.loads(x) for x in (d / "samples.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    res = EvalResult(data["rows"], samples, data["prompts"], data["best"], data["selection"], data["warnings"],
                     data["notes"], data["settings"], d, data.get("gold"))
    return res, samples


def write_report(pipeline_dir: str | Path, stages: Mapping[str, str | Path], eval_result: EvalResult | str | Path | None,
                 samples: Sequence[dict[str, Any]] | None = None, title: str = "chatforge report") -> tuple[Path, Path]:
    """Write the PNGs, ``report.html`` and ``report.md`` into ``pipeline_dir``.

    ``stages`` maps a stage name (sft, rm, ppo, dpo, ...) to its run folder; the kind of
    curves drawn follows the name. ``eval_result`` is an :class:`EvalResult` or the folder
    it was written to; ``samples`` default to the result's own.
    """
    out = Path(pipeline_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(eval_result, (str, Path)):
        eval_result, loaded = load_result(eval_result)
        samples = samples if samples is not None else loaded
    if samples is None and eval_result is not None:
        samples = eval_result.samples
    figures: list[tuple[str, Path]] = []
    if eval_result is not None:
        png = overoptimisation_curve(eval_result, out / "overoptimisation.png")
        if png is not None:
            figures.append(("over-optimisation: proxy and gold reward against KL to the start", png))
        png = checkpoint_curves(eval_result, out / "eval_checkpoints.png")
        if png is not None:
            figures.append(("evaluation per checkpoint", png))
    for name, run in stages.items():
        png = stage_curves(name, run, out)
        if png is not None:
            figures.append((f"{name}: training curves", png))
    yardstick = load_yardstick(eval_result.out if eval_result is not None and eval_result.out else out / "eval")
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, render_html(title, figures, eval_result, samples or [], stages, yardstick=yardstick))
    atomic_write_text(md_path, render_markdown(title, figures, eval_result, samples or [], yardstick=yardstick))
    return html_path, md_path

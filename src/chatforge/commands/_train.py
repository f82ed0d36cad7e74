"""What the training commands (sft, rm, dpo, ppo) share: turning files, flags, a recipe
and ``key=value`` overrides into one validated config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

OVERRIDE = re.compile(r"^[A-Za-z_][\w.\-]*=")


def take_overrides(items: list[str] | None, overrides: list[str]) -> list[str]:
    """``--data a.jsonl lr=1e-5``: argparse hands ``lr=1e-5`` to --data; move such items
    (that are not existing files) to ``overrides`` and return the files."""
    files = []
    for item in items or []:
        (overrides if OVERRIDE.match(item) and not Path(item).exists() else files).append(item)
    return files


def build_train_config(cls: type, section: str, args: Any, flags: dict[str, Any], overrides: list[str]):
    """Defaults <- saved config (``--resume``) <- recipe (its ``section`` if it has one)
    <- ``key=value`` overrides <- explicit flags (those not None)."""
    from chatforge.config import deep_merge, load_config, parse_overrides, read_yaml

    over = deep_merge(parse_overrides(overrides), {k: v for k, v in flags.items() if v is not None})
    recipe = args.config
    r = read_yaml(recipe) if recipe is not None else {}
    sec = section if isinstance(r.get(section), dict) else None
    base = None
    if args.resume:  # continue with the config the run was started with
        out = over.get("out")
        if out is None and recipe is not None:
            out = (r.get(sec) or {}).get("out") if sec else r.get("out")
        saved = Path(str(out or "runs/run")) / "config.yaml"
        if saved.is_file():
            base = read_yaml(saved)
    return load_config(cls, path=recipe, overrides=over, section=sec, base=base)

"""``chatforge sft``: supervised fine-tuning (full or LoRA) on conversation data.

    chatforge sft --model smollm2 --data FILE... --out runs/NAME [--lora] [--config RECIPE.yaml]
                  [--resume] [--overwrite] [key=value ...]

Every field of :class:`chatforge.train.sft.SFTConfig` can be set in the recipe (a flat SFT
recipe, or a pipeline recipe's ``sft:`` section) or as ``key=value`` (``lr=1e-4``,
``max_steps=200``, ``lora_cfg.r=8``); the flags win over both. ``--resume`` continues the
run in ``--out`` from its newest checkpoint with the config it was started with
(``key=value`` may still change e.g. ``max_steps``).
"""

from __future__ import annotations

from chatforge.commands._train import build_train_config, take_overrides


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sft", help="supervised fine-tuning (full or LoRA)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model to start from: smollm2 (default), tiny, HF dir, run folder, .gguf, hub id")
    p.add_argument("--data", nargs="+", metavar="FILE", help="conversation / instruction files (any supported format)")
    p.add_argument("--eval-data", nargs="+", metavar="FILE", help="held-out files (default: eval_fraction of --data)")
    p.add_argument("--out", help="run folder (default runs/run)")
    p.add_argument("--lora", action="store_true", default=None, help="train a LoRA adapter instead of all weights")
    p.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe (its 'sft' section if it has one)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any SFTConfig field, e.g. lr=1e-4 max_steps=200")
    p.set_defaults(func=run)


def split_overrides(args) -> tuple[list[str], list[str]]:
    """(data files, overrides): see :func:`take_overrides`."""
    overrides = list(args.overrides or [])
    return take_overrides(args.data, overrides), overrides


def build_config(args):
    from chatforge.train.sft import SFTConfig

    files, overrides = split_overrides(args)
    flags = {"model": args.model, "data": files or None, "eval_data": args.eval_data, "out": args.out,
             "lora": args.lora}
    return build_train_config(SFTConfig, "sft", args, flags, overrides)


def run(args) -> int:
    from chatforge.train.sft import train_sft

    cfg = build_config(args)
    model_dir = train_sft(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"done: {model_dir}")
    return 0

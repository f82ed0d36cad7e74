"""``chatforge rm``: train a reward model on preference pairs or K-wise rankings.

    chatforge rm --model RUN_OR_MODEL --data FILE... --out runs/NAME
                 [--loss pairwise|kwise|listwise] [--lora] [--config RECIPE.yaml] [--resume] [key=value ...]

Every field of :class:`chatforge.train.rm.RMConfig` can be set in the recipe or as
``key=value`` (e.g. ``max_minutes=30 lr=2e-5 margin=0.5``); the flags win over both.
``--resume`` continues the run in ``--out`` from its newest checkpoint with the config it was
started with.
"""

from __future__ import annotations

from chatforge.commands._train import build_train_config, take_overrides


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("rm", help="train a reward model (pairwise, K-wise or listwise)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="backbone to start from: SFT run folder, model dir, adapter, smollm2, tiny")
    p.add_argument("--data", nargs="+", metavar="FILE", help="preference / ranking files (any supported format)")
    p.add_argument("--eval-data", nargs="+", metavar="FILE", help="held-out data (default: eval_fraction of --data)")
    p.add_argument("--out", help="run folder (default runs/run)")
    p.add_argument("--loss", choices=["pairwise", "kwise", "listwise"],
                   help="pairwise = rankings expanded to pairs (default); kwise = InstructGPT, a ranking per sample; "
                        "listwise = Plackett-Luce")
    p.add_argument("--lora", action="store_true", default=None, help="train a LoRA adapter + head (base frozen)")
    p.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe (its 'rm' section if it has one)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any RMConfig field, e.g. lr=1e-5 max_minutes=30")
    p.set_defaults(func=run)


def split_overrides(args) -> tuple[list[str], list[str]]:
    """(data files, overrides): see :func:`take_overrides`."""
    overrides = list(args.overrides or [])
    return take_overrides(args.data, overrides), overrides


def build_config(args):
    from chatforge.train.rm import RMConfig

    files, overrides = split_overrides(args)
    flags = {"model": args.model, "data": files or None, "eval_data": args.eval_data, "out": args.out,
             "loss": args.loss, "lora": args.lora}
    return build_train_config(RMConfig, "rm", args, flags, overrides)


def run(args) -> int:
    from chatforge.train.rm import train

    cfg = build_config(args)
    model_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"done: {model_dir}")
    return 0

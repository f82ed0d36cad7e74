"""``chatforge dpo``: direct preference optimisation of a policy on preference / ranking data.

    chatforge dpo --policy runs/sft --data prefs.jsonl --out runs/dpo [--loss sigmoid|ipo]
                  [--beta 0.1] [--lora] [--config RECIPE.yaml] [--resume] [key=value ...]

Every field of :class:`chatforge.train.dpo.DPOConfig` can be set in the recipe or as
``key=value``; the flags win over both. ``--resume`` continues the run in ``--out`` from its
newest checkpoint with the config it was started with (``key=value`` may still change e.g.
``max_steps``).
"""

from __future__ import annotations

from chatforge.commands._train import build_train_config, take_overrides


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("dpo", help="direct preference optimisation (DPO, IPO, conservative DPO)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", help="starting policy and reference: SFT run folder, model dir, adapter, smollm2, tiny")
    p.add_argument("--data", nargs="+", metavar="FILE", help="preference or ranking files (any supported format)")
    p.add_argument("--eval-data", nargs="+", metavar="FILE", help="held-out pairs (default: eval_fraction of --data)")
    p.add_argument("--out", help="run folder (default runs/run)")
    p.add_argument("--loss", choices=["sigmoid", "ipo"], help="sigmoid = DPO (default), ipo = IPO")
    p.add_argument("--beta", type=float, help="KL strength (default 0.1)")
    p.add_argument("--lora", action="store_true", default=None, help="train a LoRA adapter (reference = adapter off)")
    p.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe (its 'dpo' section if it has one)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any DPOConfig field, e.g. lr=1e-5 max_steps=200")
    p.set_defaults(func=run)


def split_overrides(args) -> tuple[list[str], list[str], list[str]]:
    """(data files, eval data files, overrides): see :func:`take_overrides`."""
    overrides = list(args.overrides or [])
    files = take_overrides(args.data, overrides)
    return files, take_overrides(args.eval_data, overrides), overrides


def build_config(args):
    from chatforge.train.dpo import DPOConfig

    files, eval_files, overrides = split_overrides(args)
    flags = {"model": args.policy, "data": files or None, "eval_data": eval_files or None, "out": args.out,
             "loss": args.loss, "beta": args.beta, "lora": args.lora}
    return build_train_config(DPOConfig, "dpo", args, flags, overrides)


def run(args) -> int:
    from chatforge.train.dpo import train

    cfg = build_config(args)
    model_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"done: {model_dir}")
    return 0

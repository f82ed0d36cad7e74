"""``chatforge ppo``: RLHF of a policy against a reward, with a KL penalty to the start policy.

    chatforge ppo --policy runs/sft --reward rm:runs/rm --prompts prompts.jsonl --out runs/ppo
                  [--reward "fn:chatforge.train.reward_fns:non_repetition@0.5"] [--algo ppo|rloo]
                  [--lora] [--config RECIPE.yaml] [--resume] [key=value ...]

Rewards (repeat ``--reward`` to add them up, ``@w`` weights one, ``?k=v`` passes options):
``rm:RUN`` a reward-model run; ``fn:MODULE:FUNCTION`` (or ``fn:file.py:FUNCTION``) a Python
function ``f(prompts, responses) -> list[float]``; ``clf:MODEL:LABEL`` a Hugging Face
sequence classifier's logit for LABEL. Prompts come from any data file: Prompt records, or
the prompt part of conversations, preference pairs and rankings.

Every field of :class:`chatforge.train.ppo.PPOConfig` can be set in the recipe (its ``ppo``
section if it has one) or as ``key=value``; the flags win over both. ``--resume`` continues
the run in ``--out`` from its newest checkpoint with the config it was started with.
"""

from __future__ import annotations

from chatforge.commands._train import build_train_config, take_overrides


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ppo", help="RLHF with PPO (KL penalty to the start policy) or RLOO",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", help="starting policy and reference: SFT run folder, model dir, adapter, smollm2, tiny")
    p.add_argument("--reward", action="append", metavar="SPEC",
                   help="rm:RUN | fn:MODULE:FUNCTION | clf:MODEL:LABEL, optional ?key=value and @weight; repeatable")
    p.add_argument("--prompts", nargs="+", metavar="FILE", help="prompt files (any supported format and record kind)")
    p.add_argument("--eval-prompts", nargs="+", metavar="FILE",
                   help="held-out prompts for the final comparison (default: eval_fraction of --prompts)")
    p.add_argument("--out", help="run folder (default runs/run)")
    p.add_argument("--algo", choices=["ppo", "rloo", "grpo"],
                   help="ppo (value head + GAE, default), rloo (k samples, leave-one-out baseline) or grpo "
                        "(k samples, group-normalised; grpo_variant=dr_grpo for Dr. GRPO)")
    p.add_argument("--lora", action="store_true", default=None,
                   help="train a LoRA adapter: one frozen backbone serves policy and reference")
    p.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe (its 'ppo' section if it has one)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any PPOConfig field, e.g. kl_coef=0.05 max_steps=100 response_len=64")
    p.set_defaults(func=run)


def split_overrides(args) -> tuple[list[str], list[str], list[str]]:
    """(data files, eval data files, overrides): see :func:`take_overrides`."""
    overrides = list(args.overrides or [])
    files = take_overrides(args.prompts, overrides)
    return files, take_overrides(args.eval_prompts, overrides), overrides


def build_config(args):
    from chatforge.train.ppo import PPOConfig

    files, eval_files, overrides = split_overrides(args)
    flags = {"model": args.policy, "data": files or None, "eval_data": eval_files or None, "out": args.out,
             "algo": args.algo, "lora": args.lora, "rewards": args.reward}
    return build_train_config(PPOConfig, "ppo", args, flags, overrides)


def run(args) -> int:
    from chatforge.train.ppo import train

    cfg = build_config(args)
    model_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"done: {model_dir}")
    return 0

"""PPO episodes/s and peak RSS: chatforge vs TRL 1.12 ``trl.experimental.ppo.PPOTrainer``.

Same model (SmolLM2-135M-Instruct from the same folder, fp32 master weights, the precision
this CPU makes fast on both: bf16 autocast with native bf16 matmul, else fp32; ``--precision``),
same prompts (hh-rlhf harmless-base prompts of at most ``--max-prompt`` tokens,
``steps * batch`` of them, so each side sees every prompt once), same reward (a rule:
``length_target`` -- 0 at 20 words, falling to -1 -- which TRL gets as a tiny
"sequence classifier" module, since it only takes reward *models*), same batch (one
minibatch per step), response length, PPO epochs, lr, KL coefficient (k1), clip ranges,
temperature 1, stop at end-of-turn, no gradient checkpointing on either side. Each side
runs in its own subprocess (its own interpreter: TRL 1.12 lives in a separate venv), so
peak RSS is its own; episodes/s is measured over the training loop only (model loading
excluded on both sides).

What differs is the design: TRL 1.12 holds policy, frozen reference copy, a full value
network and the reward model (four networks; with LoRA the reference becomes adapter-off
but the value network stays a full trainable copy), computes the LM head over prompt and
response and generates with ``transformers.generate``. chatforge (``--layout lora``): one
frozen backbone (policy = adapter, reference = adapter off, value = a head on the policy's
hidden states), the LM head on response positions only, its own KV-cache engine;
(``--layout full``): policy + frozen reference copy + value head.

    .venv/bin/python bench/ppo.py                              # 8 steps, batch 8, 48 tokens, both layouts
    .venv/bin/python bench/ppo.py --steps 2 --batch 4 --response-len 16 --layout lora   # smoke run

TRL 1.12 in its own venv (never in .venv)::

    python3 -m venv /work/venvs/trl112
    /work/venvs/trl112/bin/pip install torch==2.13.0 && /work/venvs/trl112/bin/pip install "trl==1.12.*"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

from _sides import add_precision_arg, fast_precision, machine_header, report_result, run_side

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base_test.jsonl.gz"
TRL_PYTHON = os.environ.get("TRL_PYTHON", "/work/venvs/trl112/bin/python")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="episodes per step = one minibatch")
    p.add_argument("--response-len", type=int, default=48)
    p.add_argument("--epochs", type=int, default=2, help="PPO epochs per step")
    p.add_argument("--max-prompt", type=int, default=128, help="only prompts up to this many tokens (no truncation)")
    p.add_argument("--layout", choices=["lora", "full", "both"], default="both")
    add_precision_arg(p)
    p.add_argument("--side", choices=["both", "chatforge", "trl"], default="both")
    p.add_argument("--data", default=str(HH))
    p.add_argument("--trl-python", default=TRL_PYTHON)
    p.add_argument("--child", choices=["chatforge", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- the shared rule reward
_WORD = re.compile(r"[A-Za-z0-9']+")


def rule_reward(prompts, responses, target: int = 20) -> list[float]:
    """0 at ``target`` words, falling linearly to -1 at 0 and 2x target (as
    ``chatforge.train.reward_fns.length_target``; repeated here so the TRL side, which has
    no chatforge, computes exactly the same numbers)."""
    return [-min(abs(len(_WORD.findall(r)) - target) / target, 1.0) for r in responses]


# ---------------------------------------------------------------- parent
def prepare(args, workdir: Path) -> dict:
    """Prompts (as chatforge Prompt records and as token ids for TRL) and the model folder."""
    from chatforge.data.readers import read_file
    from chatforge.data.records import Prompt, prompt_of, write_jsonl
    from chatforge.data.tokenize import encode_prompt
    from chatforge.models.load import load_tokenizer, smollm2_dir

    tok = load_tokenizer("smollm2")
    need = args.steps * args.batch
    prompts, ids, seen = [], [], set()
    for rec in read_file(args.data).records:
        p = prompt_of(rec)
        key = json.dumps(p)
        if key in seen:
            continue
        seen.add(key)
        x = encode_prompt(tok, p)
        if len(x) <= args.max_prompt:
            prompts.append(p)
            ids.append(x)
        if len(prompts) == need:
            break
    if len(prompts) < need:
        raise SystemExit(f"only {len(prompts)} prompts of <= {args.max_prompt} tokens in {args.data}")
    write_jsonl([Prompt(p) for p in prompts], workdir / "prompts.jsonl")
    return {"model_dir": str(smollm2_dir()), "prompts_file": str(workdir / "prompts.jsonl"), "prompt_ids": ids,
            "steps": args.steps, "batch": args.batch, "response_len": args.response_len, "epochs": args.epochs,
            "workdir": str(workdir), "eos_id": tok.eos_token_id, "precision": args.precision}


def run_child(python: str, side: str, spec_path: Path) -> dict:
    return run_side([str(Path(__file__).resolve()), "--child", side, "--spec", str(spec_path)], python=python,
                    env={"TRL_EXPERIMENTAL_SILENCE": "1"})


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        res = child_chatforge(spec) if args.child == "chatforge" else child_trl(spec)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report_result(res)
        return 0
    args.precision = fast_precision(args.precision)  # the children get the resolved one
    print(machine_header(args.precision), flush=True)
    layouts = ["lora", "full"] if args.layout == "both" else [args.layout]
    sides = ["chatforge", "trl"] if args.side == "both" else [args.side]
    if "trl" in sides and not Path(args.trl_python).exists():
        raise SystemExit(f"{args.trl_python} not found: create the TRL 1.12 venv (see this file's docstring)")
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        base = prepare(args, Path(tmp))
        print(f"PPO bench: SmolLM2-135M, {args.steps} steps x {args.batch} episodes, response <= {args.response_len} "
              f"tokens, {args.epochs} PPO epochs, prompts <= {args.max_prompt} tokens (hh-rlhf), {args.precision}")
        table = []
        for layout in layouts:
            spec = dict(base, layout=layout)
            sp = Path(tmp) / f"spec-{layout}.json"
            sp.write_text(json.dumps(spec))
            res = {}
            for side in sides:
                res[side] = run_child(sys.executable if side == "chatforge" else args.trl_python, side, sp)
            table.append((layout, res))
        print(f"\n{'layout':<6} {'side':<10} {'episodes/s':>10} {'loop s':>8} {'peak RSS MB':>12} {'reward first->last':>20}")
        for layout, res in table:
            for side, r in res.items():
                if "error" in r:
                    print(f"{layout:<6} {side:<10} {r['error']}")
                    continue
                print(f"{layout:<6} {side:<10} {r['episodes_per_s']:>10.3f} {r['loop_s']:>8.1f} {r['peak_rss_mb']:>12.0f} "
                      f"{r.get('reward_first', float('nan')):>9.3f} -> {r.get('reward_last', float('nan')):.3f}")
            if all("error" not in r for r in res.values()) and len(res) == 2:
                c, t = res["chatforge"], res["trl"]
                sp_ = c["episodes_per_s"] / t["episodes_per_s"]
                mem = c["peak_rss_mb"] / t["peak_rss_mb"]
                print(f"{layout:<6} chatforge/TRL: {sp_:.2f}x episodes/s (goal >= 3x), {mem:.2f}x peak RSS (goal <= 0.5x)")
        return 0


# ---------------------------------------------------------------- children
def child_chatforge(spec: dict) -> dict:
    import torch  # noqa: F401

    from chatforge.config import load_config
    from chatforge.runs import read_metrics
    from chatforge.train.ppo import PPOConfig, train

    out = Path(spec["workdir"]) / f"cf-{spec['layout']}"
    cfg = load_config(PPOConfig, overrides={
        "model": spec["model_dir"], "data": [spec["prompts_file"]], "out": str(out), "lora": spec["layout"] == "lora",
        "max_steps": spec["steps"], "rollout_batch": spec["batch"], "batch_size": spec["batch"], "grad_accum": 1,
        "response_len": spec["response_len"], "ppo_epochs": spec["epochs"], "max_prompt_len": 100_000,
        "temperature": 1.0, "kl_coef": 0.05, "kl_estimator": "k1", "clip": 0.2, "vf_clip": 0.2, "vf_coef": 0.1,
        "eval_fraction": 0.0, "final_eval": False, "save_every": 10_000, "sample_every": 10_000, "seed": 0,
        "precision": spec["precision"]})
    train(cfg, overwrite=True, reward_fns=[rule_reward])
    s = json.loads((out / "summary.json").read_text())
    rows = read_metrics(out / "metrics.jsonl")
    return {"episodes": s["episodes"], "loop_s": s["train_time_s"], "episodes_per_s": s["episodes"] / s["train_time_s"],
            "reward_first": rows[0]["reward"], "reward_last": rows[-1]["reward"]}


def child_trl(spec: dict) -> dict:
    import torch
    import torch.nn as nn
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    class RuleBackbone(nn.Module):
        """Fakes a reward model's backbone: every position's "hidden state" is the rule
        reward of the response decoded from the whole (prompt + response) row."""

        def forward(self, input_ids, attention_mask=None, **_):
            texts = tok.batch_decode(input_ids, skip_special_tokens=False)
            resp = []
            for t in texts:
                t = t.rsplit("<|im_start|>assistant\n", 1)[-1]
                resp.append(t.split("<|im_end|>")[0].replace("<|endoftext|>", ""))
            r = torch.tensor(rule_reward(None, resp), dtype=torch.float32)
            h = r[:, None, None].expand(input_ids.shape[0], input_ids.shape[1], 1).contiguous()

            class Out:
                hidden_states = (h,)

            return Out()

    class RuleRewardModel(nn.Module):
        base_model_prefix = "model"

        def __init__(self):
            super().__init__()
            self.model = RuleBackbone()
            self.score = nn.Identity()

    lora = spec["layout"] == "lora"
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1, dtype=torch.float32)
    value.config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,  # = chatforge default
                                 task_type="CAUSAL_LM")
    args = PPOConfig(
        output_dir=str(Path(spec["workdir"]) / f"trl-{spec['layout']}"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, num_mini_batches=1, total_episodes=spec["steps"] * spec["batch"],
        num_ppo_epochs=spec["epochs"], response_length=spec["response_len"], stop_token="eos", temperature=1.0,
        learning_rate=1e-4 if lora else 1e-5, kl_coef=0.05, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2,
        vf_coef=0.1, local_rollout_forward_batch_size=spec["batch"], num_sample_generations=0,
        gradient_checkpointing=False, bf16=spec["precision"] == "bf16", use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=1,
        seed=0, dataloader_num_workers=0, per_device_eval_batch_size=1, lr_scheduler_type="constant")
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=RuleRewardModel(),
                         train_dataset=ds, value_model=value, eval_dataset=ds.select(range(1)),
                         peft_config=peft_config)
    t0 = time.time()
    trainer.train()
    loop = time.time() - t0
    scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    episodes = spec["steps"] * spec["batch"]
    return {"episodes": episodes, "loop_s": loop, "episodes_per_s": episodes / loop,
            "reward_first": scores[0] if scores else float("nan"), "reward_last": scores[-1] if scores else float("nan")}


if __name__ == "__main__":
    sys.exit(main())

"""Reward-model step time and peak RSS: chatforge vs TRL ``RewardTrainer``, side by side, one run.

Same model (SmolLM2-135M-Instruct + a 1-output linear head, fp32 master weights, the
precision this CPU makes fast set explicitly on both: bf16 autocast with native bf16 matmul,
else fp32; ``--precision``), same data (hh-rlhf harmless-base pairs whose two sides fit
``--max-len`` untruncated, so both compute the same tokens; ``steps * batch`` of them, one
epoch, so both see the same pairs), same batch / lr / constant schedule / steps, pairwise
Bradley-Terry loss, gradient checkpointing set explicitly on both. Each side runs in its own
subprocess so peak RSS is its own. Step time is the median/mean without the first step.

    .venv/bin/python bench/rm.py                       # 20 steps, batch 4, max_len 512
    .venv/bin/python bench/rm.py --steps 3 --batch 2   # smoke run
    .venv/bin/python bench/rm.py --lora --grad-ckpt

TRL is bench-only: ``.venv/bin/pip install trl==1.16.0 --no-deps`` (keeps torch/transformers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _sides import add_precision_arg, run_side, step_bench_main

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base_test.jsonl.gz"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="pairs per step (no gradient accumulation)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--lora", action="store_true", help="LoRA (r=16, all linear layers) on both sides")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on both sides")
    add_precision_arg(p)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--data", default=str(HH))
    p.add_argument("--side", choices=["both", "chatforge", "trl"], default="both")
    p.add_argument("--child", choices=["chatforge", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- data (parent)
def prepare_data(args, workdir: Path) -> dict:
    """``steps * batch`` hh-rlhf pairs that fit max_len untruncated: canonical JSONL for
    chatforge, conversational prompt / chosen / rejected JSONL for TRL."""
    from chatforge.data.readers import read_file
    from chatforge.data.records import write_jsonl
    from chatforge.models.heads import encode_for_reward
    from chatforge.models.load import load_tokenizer

    tok = load_tokenizer("smollm2")
    need = args.steps * args.batch
    picked, tokens = [], 0
    for rec in read_file(args.data).records:
        if getattr(rec, "kind", "") != "preference" or rec.chosen["content"].strip() == rec.rejected["content"].strip():
            continue
        enc = [encode_for_reward(tok, rec.prompt, r["content"], 10**6) for r in (rec.chosen, rec.rejected)]
        lens = [len(ids) for ids, _ in enc]
        if max(lens) <= args.max_len:
            picked.append(rec)
            tokens += sum(lens)
        if len(picked) == need:
            break
    if len(picked) < need:
        sys.exit(f"only {len(picked)} pairs of {args.data} fit max_len={args.max_len}; need {need}")
    write_jsonl(picked, workdir / "pairs.jsonl")
    with open(workdir / "trl.jsonl", "w", encoding="utf-8") as f:
        for r in picked:
            f.write(json.dumps({"prompt": r.prompt, "chosen": [r.chosen], "rejected": [r.rejected]}) + "\n")
    return {"pairs": len(picked), "tokens": tokens, "mean_seq_len": tokens / (2 * len(picked))}


# ---------------------------------------------------------------- the two sides (children)
def run_chatforge(args, workdir: Path) -> dict:
    from chatforge.runs import peak_rss_mb, read_metrics
    from chatforge.train.rm import RMConfig, train

    cfg = RMConfig(model="smollm2", data=[str(workdir / "pairs.jsonl")], out=str(workdir / "cf-run"),
                   loss="pairwise", max_steps=args.steps, batch_size=args.batch, grad_accum=1, max_len=args.max_len,
                   lr=args.lr, warmup_steps=0, schedule="constant", precision=args.precision,
                   gradient_checkpointing=args.grad_ckpt, lora=args.lora, eval_fraction=0.0, log_every=1,
                   eval_every=10**9, save_every=10**9)
    cfg.validate()
    t0 = time.perf_counter()
    train(cfg, overwrite=True)
    total = time.perf_counter() - t0
    rows = [r for r in read_metrics(workdir / "cf-run" / "metrics.jsonl") if "step_time_s" in r]
    return {"step_times": [r["step_time_s"] for r in rows], "total_s": total, "peak_rss_mb": peak_rss_mb()}


def run_trl(args, workdir: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from chatforge.models.load import smollm2_dir
    from chatforge.runs import peak_rss_mb

    path = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = "<|endoftext|>"  # as chatforge: pad != end-of-turn, so HF reads the reward at <|im_end|>
    ds = load_dataset("json", data_files=str(workdir / "trl.jsonl"), split="train")
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    cfg = RewardConfig(output_dir=str(workdir / "trl-run"), per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, warmup_steps=0,
                       lr_scheduler_type="constant", bf16=args.precision == "bf16",
                       gradient_checkpointing=args.grad_ckpt,
                       max_length=args.max_len, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                       dataloader_num_workers=0, seed=0, model_init_kwargs={"dtype": torch.float32},
                       disable_tqdm=True)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        from chatforge.models.lora import DEFAULT_TARGETS, LoraSettings

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=LoraSettings().dropout, target_modules=DEFAULT_TARGETS,
                                 task_type="SEQ_CLS")
    t0 = time.perf_counter()
    trainer = RewardTrainer(model=path, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    trainer.add_callback(Timer())
    trainer.train()
    return {"step_times": times, "total_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------- report (parent)
def child(side: str, args, workdir: Path) -> dict:
    cmd = [__file__, "--child", side, "--workdir", str(workdir), "--steps", str(args.steps),
           "--batch", str(args.batch), "--max-len", str(args.max_len), "--lr", str(args.lr),
           "--precision", args.precision]
    cmd += ["--lora"] * args.lora + ["--grad-ckpt"] * args.grad_ckpt
    return run_side(cmd, 0)


def main(argv=None) -> int:
    return step_bench_main(parse_args(argv), "rm", "Reward model (pairwise)", prepare_data, run_chatforge, run_trl, child)


if __name__ == "__main__":
    sys.exit(main())

"""DPO step time and peak RSS: chatforge vs TRL ``DPOTrainer``, side by side, one run.

Same model (SmolLM2-135M-Instruct, fp32 master weights, the precision this CPU makes fast on
both: bf16 autocast with native bf16 matmul, else fp32; ``--precision``), same data
(hh-rlhf harmless-base pairs that fit ``--max-len`` untruncated, so both sides compute the
same tokens), same max_len, batch, steps (one epoch over ``steps * batch`` pairs, so both see
the same pairs), same lr / beta / sigmoid loss, gradient checkpointing set explicitly on
both. Each side runs in its own subprocess so peak RSS is its own.

What differs is what each trainer does by default: TRL keeps a second, frozen reference
model in memory and runs it every step (full fine-tuning); chatforge scores the data with
the reference once before training (reported separately as ``reference pass``) and runs
only the policy per step, applying the LM head to response positions only.

    .venv/bin/python bench/dpo.py                      # 20 steps, batch 4, max_len 512
    .venv/bin/python bench/dpo.py --steps 3 --batch 2  # smoke run
    .venv/bin/python bench/dpo.py --lora               # LoRA on both sides

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
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads per side (0 = torch default); 1 avoids OpenMP stalls on a busy machine")
    p.add_argument("--data", default=str(HH))
    p.add_argument("--side", choices=["both", "chatforge", "trl"], default="both")
    p.add_argument("--child", choices=["chatforge", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- data (parent)
def prepare_data(args, workdir: Path) -> dict:
    """``steps * batch`` hh-rlhf pairs whose both sides fit max_len untruncated, written as
    canonical JSONL (chatforge) and conversational JSONL (TRL: prompt / chosen / rejected)."""
    from chatforge.data.readers import read_file
    from chatforge.data.records import write_jsonl
    from chatforge.data.tokenize import encode_prompt_response
    from chatforge.models.load import load_tokenizer

    tok = load_tokenizer("smollm2")
    need = args.steps * args.batch
    res = read_file(args.data)
    picked, tokens = [], 0
    for rec in res.records:
        if getattr(rec, "kind", "") != "preference" or rec.chosen["content"].strip() == rec.rejected["content"].strip():
            continue
        lens = [len(encode_prompt_response(tok, rec.prompt, r["content"]).input_ids) for r in (rec.chosen, rec.rejected)]
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
    from chatforge.train.dpo import DPOConfig, train

    cfg = DPOConfig(model="smollm2", data=[str(workdir / "pairs.jsonl")], out=str(workdir / "cf-run"),
                    max_steps=args.steps, batch_size=args.batch, grad_accum=1, max_len=args.max_len, lr=args.lr,
                    warmup_steps=0, schedule="constant", precision=args.precision,
                    gradient_checkpointing=args.grad_ckpt,
                    lora=args.lora, eval_fraction=0.0, kl_prompts=0, log_every=1, eval_every=10**9,
                    save_every=10**9, ref_batch_size=max(8, args.batch))
    t0 = time.perf_counter()
    train(cfg, overwrite=True)
    total = time.perf_counter() - t0
    rows = [r for r in read_metrics(workdir / "cf-run" / "metrics.jsonl") if "step_time_s" in r]
    summary = json.loads((workdir / "cf-run" / "summary.json").read_text())
    return {"step_times": [r["step_time_s"] for r in rows], "total_s": total,
            "reference_s": summary.get("reference_time_s"), "peak_rss_mb": peak_rss_mb()}


def run_trl(args, workdir: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from chatforge.models.load import smollm2_dir
    from chatforge.runs import peak_rss_mb

    path = str(smollm2_dir())  # a folder: TRL rebuilds its reference model from config._name_or_path
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = load_dataset("json", data_files=str(workdir / "trl.jsonl"), split="train")
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    cfg = DPOConfig(output_dir=str(workdir / "trl-run"), per_device_train_batch_size=args.batch,
                    gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, warmup_steps=0,
                    lr_scheduler_type="constant", bf16=args.precision == "bf16",
                    gradient_checkpointing=args.grad_ckpt,
                    max_length=args.max_len, beta=0.1, loss_type=["sigmoid"], logging_steps=1, save_strategy="no",
                    report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                    model_init_kwargs={"dtype": torch.float32}, disable_tqdm=True)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        from chatforge.models.lora import DEFAULT_TARGETS, LoraSettings

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=LoraSettings().dropout, target_modules=DEFAULT_TARGETS,
                                 task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=path, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    trainer.add_callback(Timer())
    trainer.train()
    return {"step_times": times, "total_s": time.perf_counter() - t0, "reference_s": None,
            "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------- report (parent)
def child(side: str, args, workdir: Path) -> dict:
    cmd = [__file__, "--child", side, "--workdir", str(workdir), "--steps", str(args.steps),
           "--batch", str(args.batch), "--max-len", str(args.max_len), "--lr", str(args.lr),
           "--precision", args.precision]
    cmd += ["--lora"] * args.lora + ["--grad-ckpt"] * args.grad_ckpt
    return run_side(cmd, args.threads)


def main(argv=None) -> int:
    return step_bench_main(parse_args(argv), "dpo", "DPO", prepare_data, run_chatforge, run_trl, child, extra_rows=lambda r: {"reference pass (s)": "-" if r["reference_s"] is None else f"{r['reference_s']:.1f}"}, goal="goal >= 1.5x")


if __name__ == "__main__":
    sys.exit(main())

"""SFT throughput and peak RSS: chatforge vs TRL ``SFTTrainer``, side by side, one run.

Same model (SmolLM2-135M-Instruct, the folder ``load("smollm2")`` converts to), same data
(Malay alpaca records from ../shared/data that fit ``--max-len`` untruncated; a synthetic
set when that folder is absent), same row length (256), batch (4 rows, no accumulation),
precision (the one this CPU makes fast: bf16 where it has native bf16 matmul -- ``bf16=True``
in TRL's config --, fp32 elsewhere; ``--precision`` overrides), gradient checkpointing (off on both,
set explicitly), steps, lr and constant schedule. Both sides pack examples into rows with
a block-diagonal attention (chatforge: 4 rows of 256 with per-example position ids; TRL:
its default ``bfd`` packing, which flattens the batch padding-free) and both put the loss
on the response only (TRL gets prompt-completion records, so ``completion_only_loss``
applies). Each side runs in its own subprocess, so peak RSS is its own.

Printed: tokens/s (real, non-pad tokens over the steady steps -- the first ``--warmup``
steps are oneDNN/allocator warm-up and are left out), the ratio, peak RSS, and chatforge's
share of this machine's matmul peak in that precision, measured here first (about 2 s, bounded
by time). The header records the CPU model and its bf16-relevant flags.
Every figure comes per wall second and per CPU second of the side's process: on a
shared machine wall time measures the neighbours, CPU time (best with ``--threads 1``,
where no OpenMP thread spins waiting for a descheduled sibling) still measures the work.

* MFU counts model FLOPs per token as ``6 * N + 12 * L * d * S`` (N parameters -- the tied
  LM head counted once, as it is one matmul --, L layers, d hidden, S = row length): the
  usual definition, what the step *should* cost.
* HFU counts what chatforge executes: the LM head (V x d) only on label positions.

    .venv/bin/python bench/sft.py                  # 20 steps
    .venv/bin/python bench/sft.py --steps 6        # smoke run
    .venv/bin/python bench/sft.py --side chatforge --variant bf16_weights=false   # a lever off
    .venv/bin/python bench/sft.py --profile        # + top ops of one chatforge step

TRL is bench-only: ``.venv/bin/pip install trl==1.16.0 --no-deps`` (keeps torch/transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _sides import (add_precision_arg, fast_precision, machine_header, matmul_peak, print_columns, report_result,
                    run_side)

MALAY = Path(__file__).resolve().parents[2] / "shared" / "data" / "mychatgpt" / "stanford" / "malay.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures")
    p.add_argument("--batch", type=int, default=4, help="rows per step (no gradient accumulation)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--lora", action="store_true", help="LoRA (r=16, all linear layers) on both sides")
    add_precision_arg(p)
    p.add_argument("--trl-packing", choices=["bfd", "wrapped", "off"], default="bfd",
                   help="TRL's packing (off = pad each batch to its longest example)")
    p.add_argument("--variant", nargs="*", default=[], metavar="key=value", help="chatforge SFTConfig overrides")
    p.add_argument("--side", choices=["both", "chatforge", "trl"], default="both")
    p.add_argument("--profile", action="store_true", help="print the top ops of one chatforge step")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per side (0 = torch's default); 1 gives steadier figures on a busy machine")
    p.add_argument("--data", default=str(MALAY))
    p.add_argument("--child", choices=["chatforge", "trl", "profile"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- peak and FLOPs (parent)
def model_shape() -> dict:
    from transformers import AutoConfig

    from chatforge.models.load import smollm2_dir

    c = AutoConfig.from_pretrained(smollm2_dir())
    d, L, V, f = c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d
    n = L * per_layer + V * d + d  # tied embeddings / LM head counted once
    return {"params": n, "layers": L, "hidden": d, "vocab": V}


def flops_per_token(shape: dict, seq: int, label_share: float = 1.0) -> float:
    """6N + 12 L d S; with ``label_share`` < 1 the LM head's 6 V d only on that share of tokens."""
    head = 6 * shape["vocab"] * shape["hidden"]
    return 6 * shape["params"] - head * (1 - label_share) + 12 * shape["layers"] * shape["hidden"] * seq


# ---------------------------------------------------------------- data (parent)
def prepare_data(args, workdir: Path) -> dict:
    """Records whose whole chat fits max_len, as canonical JSONL (chatforge) and as
    conversational prompt-completion JSONL (TRL)."""
    from chatforge.data.records import Conversation, write_jsonl
    from chatforge.data.tokenize import encode_messages
    from chatforge.models.load import load_tokenizer

    tok = load_tokenizer("smollm2")
    if Path(args.data).exists():
        from chatforge.data.readers import read_file

        records, source = read_file(args.data).records, Path(args.data).name
    else:
        import random

        rng = random.Random(0)
        words = "the a model data train token answer question short long blue green one two three".split()
        records = [Conversation([{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(5, 30)))},
                                 {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(10, 120)))}])
                   for _ in range(1500)]
        source = "synthetic"
    picked, tokens, labels = [], 0, 0
    for rec in records:
        enc = encode_messages(tok, rec.messages)
        if len(enc) <= args.max_len and len(rec.messages) == 2:
            picked.append(rec)
            tokens += len(enc)
            labels += sum(1 for x in enc.labels if x != -100)
    write_jsonl(picked, workdir / "chats.jsonl")
    with open(workdir / "trl.jsonl", "w", encoding="utf-8") as f:
        for r in picked:
            f.write(json.dumps({"prompt": r.messages[:1], "completion": r.messages[1:]}, ensure_ascii=False) + "\n")
    return {"records": len(picked), "source": source, "mean_len": tokens / len(picked), "label_share": labels / tokens}


# ---------------------------------------------------------------- the two sides (children)
def run_chatforge(args, workdir: Path) -> dict:
    from chatforge.config import load_config
    from chatforge.runs import peak_rss_mb, read_metrics
    from chatforge.train.sft import SFTConfig, train_sft

    over = dict(model="smollm2", data=[str(workdir / "chats.jsonl")], out=str(workdir / "cf-run"),
                max_steps=args.steps, batch_size=args.batch, grad_accum=1, max_len=args.max_len, lr=args.lr,
                warmup_steps=0, schedule="constant", precision=args.precision, gradient_checkpointing=False,
                lora=args.lora, pack=True, eval_fraction=0.0, eval_at_start=False, log_every=1,
                eval_every=10 ** 9, save_every=10 ** 9)
    from chatforge.config import deep_merge, parse_overrides

    cfg = load_config(SFTConfig, overrides=deep_merge(over, parse_overrides(args.variant)))
    cpu = [time.process_time()]
    t0 = time.perf_counter()
    train_sft(cfg, overwrite=True, on_step=lambda *a: cpu.append(time.process_time()))
    total = time.perf_counter() - t0
    rows = [r for r in read_metrics(workdir / "cf-run" / "metrics.jsonl") if "step_time_s" in r]
    return {"step_times": [r["step_time_s"] for r in rows],
            "step_cpu": [b - a for a, b in zip(cpu, cpu[1:])],
            "step_tokens": [r["tokens_per_s"] * r["step_time_s"] for r in rows],
            "total_s": total, "peak_rss_mb": peak_rss_mb()}


def run_trl(args, workdir: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from chatforge.models.load import smollm2_dir
    from chatforge.runs import peak_rss_mb

    path = str(smollm2_dir())  # a folder: TRL rebuilds the model from config._name_or_path
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = load_dataset("json", data_files=str(workdir / "trl.jsonl"), split="train")
    times: list[float] = []
    cpu: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    packing = args.trl_packing != "off"
    cfg = SFTConfig(output_dir=str(workdir / "trl-run"), per_device_train_batch_size=args.batch,
                    gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, warmup_steps=0,
                    lr_scheduler_type="constant", bf16=args.precision == "bf16", gradient_checkpointing=False,
                    max_length=args.max_len, packing=packing,
                    packing_strategy=args.trl_packing if packing else "bfd", logging_steps=1, save_strategy="no",
                    report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                    model_init_kwargs={"dtype": torch.float32}, disable_tqdm=True)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        from chatforge.models.lora import DEFAULT_TARGETS, LoraSettings

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=LoraSettings().dropout, target_modules=DEFAULT_TARGETS,
                                 task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=path, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    trainer.add_callback(Timer())
    trainer.train()
    seen = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]  # cumulative, real tokens
    step_tokens = [b - a for a, b in zip([0.0] + seen[:-1], seen)]
    return {"step_times": times, "step_cpu": cpu, "step_tokens": step_tokens, "total_s": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb()}


def run_profile(args, workdir: Path) -> dict:
    """Top ops (self CPU time) of one steady chatforge step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from chatforge.config import load_config
    from chatforge.train.sft import SFTConfig, train_sft

    table = {}

    def on_step(step, idx, model):
        if step == args.warmup:
            table["prof"] = profile(activities=[ProfilerActivity.CPU])
            table["prof"].__enter__()
        elif step == args.warmup + 1:
            table["prof"].__exit__(None, None, None)
            table["text"] = table["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=18)

    cfg = load_config(SFTConfig, overrides=dict(
        model="smollm2", data=[str(workdir / "chats.jsonl")], out=str(workdir / "prof-run"),
        max_steps=args.warmup + 1, batch_size=args.batch, grad_accum=1, max_len=args.max_len, lr=args.lr,
        precision=args.precision, lora=args.lora, eval_fraction=0.0, eval_at_start=False, save_every=10 ** 9,
        eval_every=10 ** 9, warmup_steps=0))
    train_sft(cfg, overwrite=True, on_step=on_step)
    return {"table": table.get("text", "")}


# ---------------------------------------------------------------- report (parent)
def child(side: str, args, workdir: Path) -> dict:
    cmd = [__file__, "--child", side, "--workdir", str(workdir), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--max-len", str(args.max_len),
           "--lr", str(args.lr), "--trl-packing", args.trl_packing, "--threads", str(args.threads),
           "--precision", args.precision]
    cmd += ["--lora"] * args.lora + (["--variant", *args.variant] if args.variant else [])
    return run_side(cmd, args.threads)


def steady(r: dict, warmup: int) -> tuple[float, float, float]:
    """(tokens per wall second, tokens per CPU second, median step seconds) after the warm-up."""
    k = warmup if len(r["step_times"]) > warmup else 0
    t, c, n = r["step_times"][k:], r["step_cpu"][k:], r["step_tokens"][k:]
    return sum(n) / sum(t), sum(n[:len(c)]) / sum(c), statistics.median(t)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        fn = {"chatforge": run_chatforge, "trl": run_trl, "profile": run_profile}[args.child]
        report_result(fn(args, Path(args.workdir)))
        return 0
    args.precision = fast_precision(args.precision)  # the children get the resolved one
    print(machine_header(args.precision), flush=True)
    peak, peak_cpu, peak_n = matmul_peak(args.precision)
    shape = model_shape()
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        workdir = Path(tmp)
        info = prepare_data(args, workdir)
        sides = ["chatforge", "trl"] if args.side == "both" else [args.side]
        res = {s: child(s, args, workdir) for s in sides}
        prof = child("profile", args, workdir) if args.profile else None
    mode = "LoRA r=16" if args.lora else "full fine-tuning"
    print(f"\nSFT, SmolLM2-135M ({shape['params'] / 1e6:.1f}M params), {mode}, {args.precision}, grad ckpt off, "
          f"{args.steps} steps x {args.batch} rows x {args.max_len} tokens (first {args.warmup} left out), "
          f"{info['records']} {info['source']} records (mean {info['mean_len']:.0f} tokens, "
          f"{info['label_share']:.0%} labelled), TRL packing {args.trl_packing}, {os.cpu_count()} CPU cores")
    if args.variant:
        print(f"chatforge variant: {' '.join(args.variant)}")
    import torch

    print(f"{args.precision} matmul peak here ({peak_n}^3, ~2 s): {peak:.0f} GFLOP/s with {torch.get_num_threads()} "
          f"threads, {peak_cpu:.0f} GFLOP per CPU-second")
    table, tps, tpc = {}, {}, {}
    fpt = flops_per_token(shape, args.max_len)
    # LoRA skips the frozen weights' gradient matmuls: 4N instead of 6N (approximately)
    fpt_eff = fpt * (4 / 6 if args.lora else 1)
    for s in sides:
        r = res[s]
        if "error" in r:
            table[s] = {"tokens / s": r["error"]}
            continue
        tps[s], tpc[s], med = steady(r, args.warmup)
        table[s] = {"tokens / s": f"{tps[s]:.0f}", "tokens / CPU-s": f"{tpc[s]:.0f}", "step median (s)": f"{med:.2f}",
                    "tokens / step": f"{statistics.fmean(r['step_tokens'][args.warmup:] or r['step_tokens']):.0f}",
                    "MFU (6N+attn)": f"{tps[s] * fpt_eff / 1e9 / peak:.0%}",
                    "MFU per CPU-s": f"{tpc[s] * fpt_eff / 1e9 / peak_cpu:.0%}",
                    "total wall (s)": f"{r['total_s']:.0f}", "peak RSS (MiB)": f"{r['peak_rss_mb']:.0f}"}
    if "chatforge" in tps:
        hfu = flops_per_token(shape, args.max_len, info["label_share"]) * (4 / 6 if args.lora else 1)
        table["chatforge"]["HFU (executed)"] = f"{tps['chatforge'] * hfu / 1e9 / peak:.0%}"
        table["chatforge"]["HFU per CPU-s"] = f"{tpc['chatforge'] * hfu / 1e9 / peak_cpu:.0%}"
    print_columns(table, width=26)
    if len(tps) == 2:
        print(f"{'speed-up (tokens/s)':26}{tps['chatforge'] / tps['trl']:>13.2f}x  (goal >= 1.5x)")
        print(f"{'speed-up (tokens/CPU-s)':26}{tpc['chatforge'] / tpc['trl']:>13.2f}x")
        print(f"{'RSS ratio (TRL / ours)':26}{res['trl']['peak_rss_mb'] / res['chatforge']['peak_rss_mb']:>13.2f}x")
    if prof:
        print("\none chatforge step, top ops by self CPU time:\n" + prof.get("table", prof.get("error", "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

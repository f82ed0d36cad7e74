"""Decoding speed: chatforge's engine vs ``transformers.generate``, against the memory roofline.

One run on SmolLM2-135M-Instruct: tokens/s at batch 1 and batch 8, fp32 weights and, where
this CPU has native bf16 matmul (AVX-512-BF16 or AMX), bf16 weights (``--dtypes`` asks for
either explicitly; emulated bf16 on an AVX2-only CPU is slow to measure and never the fast path),
for ``model.generate`` (greedy, dynamic cache: the baseline), chatforge's generic decoder
(``Engine(fast=False)``: the model's own forward + our loop), the fast Llama decoder with the
C kernels forced on ("C kernels"), and chatforge's default engine (the fast decoder, which
times the C matrix-vector kernel against PyTorch's GEMM on the model's weights once per
process and batch size and takes the faster: "auto", with its pick; the per-layer glue ops
stay in C either way). Every side generates exactly ``--tokens`` new tokens per
sequence (end-of-sequence disabled), greedy, from the same chat-formatted prompts; time is
wall time of the whole call (prefill included), best of ``--repeats``.

The last column counts sequences whose greedy tokens equal ``generate``'s (up to the first
end-of-turn). fp32 should be all; bf16 rounds every matmul output to 8 bits of mantissa, so
any change of summation order (another GEMM kernel, another batch size) can flip a near-tie:
``generate`` itself gives different greedy outputs for the same prompt at batch 1 and 8.

Roofline: decoding one token at batch 1 reads every weight once, so tokens/s cannot exceed
memory bandwidth / weight bytes. Bandwidth is measured here by copying a 1 GiB tensor
(reported as bytes copied per second, i.e. counting the read side only, and as read+write
traffic) and by summing it (pure reads). The roofline column uses the copy rate.

The header records the CPU model, its bf16-relevant flags and the precisions measured.

    .venv/bin/python bench/generate.py                   # ~3-5 min on 2 cores
    .venv/bin/python bench/generate.py --tokens 16 --repeats 1 --dtypes bf16   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from _sides import fast_precision, machine_header

PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Explain photosynthesis in simple words.",
    "Tell me a joke about cats.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue? Answer in two sentences.",
    "List the days of the week.",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per sequence")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"],
                   help="weight dtypes to measure (default: fp32, plus bf16 where this CPU has native bf16)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per cell (best is reported)")
    p.add_argument("--no-generic", action="store_true", help="skip the Engine(fast=False) column")
    return p.parse_args(argv)


def bandwidth(gib: float = 1.0, repeats: int = 5) -> tuple[float, float]:
    """(copy rate, read rate) in GB/s over a ``gib`` GiB fp32 tensor."""
    a = torch.ones(int(gib * 2**30) // 4)
    b = torch.empty_like(a)
    b.copy_(a)  # fault the pages in
    t_copy = t_sum = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        t_copy = min(t_copy, time.perf_counter() - t)
        t = time.perf_counter()
        a.sum()
        t_sum = min(t_sum, time.perf_counter() - t)
    n = a.numel() * 4
    return n / t_copy / 1e9, n / t_sum / 1e9


def weight_bytes(model) -> int:
    """Bytes read per decoded token: every distinct parameter once, except an untied input
    embedding (only one row of it is read)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and emb.weight.data_ptr() != head.weight.data_ptr():
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def time_best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def agree_until_eos(ours: list[int], ref: list[int], eos: set[int]) -> bool:
    """Greedy equality up to the first end-of-turn: after it ``generate(min_new_tokens=...)``
    bans eos and picks the runner-up, while our engine (eos disabled) takes the eos."""
    k = next((i for i, t in enumerate(ours) if t in eos), len(ours))
    return ours[:k] == ref[:k]


def hf_generate(model, prompts: list[list[int]], n: int, pad: int) -> list[list[int]]:
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=pad)
    return out[:, L:].tolist()


def pick(decoder) -> str:
    """What the default engine chose on this machine: all C, C glue + PyTorch GEMM, or all PyTorch."""
    if not getattr(decoder, "_kernels_ok", False):
        return "torch"
    return "C" if decoder._matvec_c else "C glue + torch GEMM"


def default_dtypes() -> list[str]:
    """fp32 always (the reference), bf16 where this CPU computes it natively: half the bytes
    per token there; elsewhere an emulated path that no user should take."""
    return ["fp32", "bf16"] if fast_precision() == "bf16" else ["fp32"]


def main(argv=None) -> int:
    args = parse_args(argv)
    from chatforge.generate import kernels
    from chatforge.generate.engine import Engine, SamplingConfig
    from chatforge.generate.fast import FastLlamaDecoder
    from chatforge.models.load import load

    args.dtypes = args.dtypes or default_dtypes()
    print(machine_header(fast_precision(), label="fast precision") + f"; measuring {', '.join(args.dtypes)} weights",
          flush=True)
    copy_gbs, read_gbs = bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, C kernel: "
          f"{'compiled' if kernels.load() else 'unavailable (torch fallback)'}")
    print(f"memory: 1 GiB copy {copy_gbs:.1f} GB/s copied ({2 * copy_gbs:.1f} GB/s read+write traffic), "
          f"1 GiB sum {read_gbs:.1f} GB/s read\n")
    rows = []
    for dtype in args.dtypes:
        model, tok = load(args.model, dtype=dtype)
        model.eval()
        wb = weight_bytes(model)
        roof = copy_gbs * 1e9 / wb
        print(f"{args.model} {dtype}: {wb / 1e6:.0f} MB of weights per token -> roofline {roof:.1f} tok/s "
              f"(copy rate), {read_gbs * 1e9 / wb:.1f} tok/s (read rate)", flush=True)
        fast = Engine(model, tok, eos_token_ids=[-1])  # -1: never stop early
        generic = None if args.no_generic else Engine(model, tok, eos_token_ids=[-1], fast=False)
        forced = None
        if kernels.load() is not None:
            forced = Engine(model, tok, eos_token_ids=[-1])
            forced.decoder = FastLlamaDecoder(model, use_kernels=True)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        eos = Engine(model, tok).eos_token_ids
        chats = [fast.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
        cfg = SamplingConfig(temperature=0, max_new_tokens=args.tokens)
        fast.generate(chats[:1], cfg.replace(max_new_tokens=4))  # warm-up (kernel build, allocations)
        hf_generate(model, chats[:1], 4, pad)
        for b in args.batches:
            prompts = (chats * (b // len(chats) + 1))[:b]
            n = b * args.tokens
            t_hf, ref = time_best(lambda: hf_generate(model, prompts, args.tokens, pad), args.repeats)
            t_fast, out = time_best(lambda: fast.generate(prompts, cfg), args.repeats)
            same = sum(agree_until_eos(c.token_ids, r, set(eos)) for c, r in zip(out, ref))
            row = {"dtype": dtype, "batch": b, "hf": n / t_hf, "fast": n / t_fast, "same": same,
                   "roof": roof if b == 1 else None,
                   "pick": pick(fast.decoder)}
            if forced is not None:
                t_c, _ = time_best(lambda: forced.generate(prompts, cfg), args.repeats)
                row["ckern"] = n / t_c
            if generic is not None:
                t_gen, _ = time_best(lambda: generic.generate(prompts, cfg), args.repeats)
                row["generic"] = n / t_gen
            rows.append(row)
            print(f"  batch {b}: generate {row['hf']:.1f} tok/s, chatforge {row['fast']:.1f} tok/s ({row['pick']})"
                  + (f", generic decoder {row['generic']:.1f} tok/s" if "generic" in row else "")
                  + (f", C kernels forced {row['ckern']:.1f} tok/s" if "ckern" in row else "")
                  + f", greedy identical to generate: {same}/{b} sequences", flush=True)
        del model, fast, generic, forced

    base = {r["batch"]: r["hf"] for r in rows if r["dtype"] == "fp32"}
    print("\n| dtype | batch | generate tok/s | chatforge generic | C kernels forced | chatforge (auto: pick) "
          "| vs generate | vs generate fp32 | % roofline | greedy = generate (sequences) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs32 = f"{r['fast'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
        roof = f"{100 * r['fast'] / r['roof']:.0f}%" if r["roof"] else "-"
        gen = f"{r['generic']:.1f}" if "generic" in r else "-"
        ck = f"{r['ckern']:.1f}" if "ckern" in r else "-"
        print(f"| {r['dtype']} | {r['batch']} | {r['hf']:.1f} | {gen} | {ck} | {r['fast']:.1f}: {r['pick']} "
              f"| {r['fast'] / r['hf']:.2f}x "
              f"| {vs32} | {roof} | {r['same']}/{r['batch']} |")
    print(f"\nload average during the run: {os.getloadavg()[0]:.2f} (figures need an idle machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Our GGUF in llama.cpp: token agreement with chatforge's engine, decode tokens/s side by side.

One run: export ``--model`` (default the embedded SmolLM2-135M-Instruct; a run folder works
too: its LoRA is merged) with :func:`chatforge.models.gguf.write_gguf` once per ``--dtypes``,
then, each side in its own process:

* **tokenizer**: llama.cpp tokenises the chat-formatted held-out prompts (chatforge's demo
  held-out set, never trained on) from the text alone; they must equal our ids.
* **greedy tokens**: from the same prompt ids, ``--tokens`` greedy tokens per prompt, stopping
  at end of turn, in llama.cpp (each GGUF) and in our engine (fp32, and bf16 where this CPU has
  native bf16). f32 and f16 are compared with our fp32 (f16 weights differ from fp32 by one
  rounding), bf16 with our bf16, q8_0 with our fp32 (a quantised model: informational). A
  sequence that differs is explained by our fp32 model's top-1 / top-2 logit gap at the first
  differing position: a gap near zero is a near-tie that any rounding may flip.
* **chat mode**: llama.cpp's ``create_chat_completion`` (the GGUF's Jinja chat template, its
  EOS / EOT stop tokens) on a few prompts, greedy, vs our engine with the same template:
  the same reply, and it *stopped* (finish reason ``stop``, not ``length``) where ours did.
* **decode tokens/s** at batch 1, same thread count both sides (``--threads``): the rate of
  tokens 2..N (generation of N tokens minus generation of 1, so prefill is excluded), best of
  ``--repeats``, end-of-turn disabled so both sides decode exactly N tokens.

llama.cpp comes from ``llama-cpp-python``, an optional dependency never installed in CI; it
runs in its own interpreter (``--llama-python``, default ``/work/venvs/llamacpp/bin/python``):

    python3 -m venv /work/venvs/llamacpp && /work/venvs/llamacpp/bin/pip install llama-cpp-python   # ~9 min build
    .venv/bin/python bench/gguf.py                        # ~3 min on 2 cores
    .venv/bin/python bench/gguf.py --model runs/demo/sft --dtypes f32 q8_0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# this file is named gguf.py and Python puts its folder first on sys.path: move the folder last, so
# `import gguf` (inside chatforge) finds the gguf package and `_sides` is still found
_HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

from _sides import fast_precision, machine_header, print_columns, report_result, run_side  # noqa: E402

LLAMA_PYTHON = "/work/venvs/llamacpp/bin/python"
CHAT_PROMPTS = ["What is the capital of France?", "Give me two tips for sleeping better.",
                "Write one sentence about the sea."]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model or run folder to export")
    p.add_argument("--dtypes", nargs="+", default=["f32", "f16", "bf16", "q8_0"], choices=["f32", "f16", "bf16", "q8_0"])
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts for the greedy comparison")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt (greedy and speed)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads, both sides")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--llama-python", default=LLAMA_PYTHON, help="interpreter with llama-cpp-python")
    p.add_argument("--workdir", help="keep the GGUF files here (default: a temporary folder)")
    p.add_argument("--child", choices=["ours", "llama"], help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- the parent: export, prompts
def prepare(args, work: Path) -> dict:
    """Export every dtype, render the prompts; what both children read."""
    from chatforge.generate.engine import default_eos_ids
    from chatforge.models.gguf import write_gguf
    from chatforge.models.load import load_model, load_tokenizer
    from chatforge.pipeline import DEMO_DIR

    model = load_model(args.model, dtype="fp32", merge_adapter=True).eval()
    tok = load_tokenizer(args.model)
    sizes = {}
    for dt in args.dtypes:
        s = write_gguf(model, tok, work / f"model-{dt}.gguf", dtype=dt, meta={"name": f"bench {args.model}"})
        sizes[dt] = s.bytes
    texts = []
    for line in (DEMO_DIR / "heldout.jsonl").read_text(encoding="utf-8").splitlines()[: args.prompts]:
        msgs = [m for m in json.loads(line)["messages"] if m["role"] != "assistant"]
        texts.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    info = {"texts": texts, "ids": ids, "eos": default_eos_ids(model, tok), "sizes": sizes,
            "chat": [[{"role": "user", "content": c}] for c in CHAT_PROMPTS]}
    (work / "prompts.json").write_text(json.dumps(info), encoding="utf-8")
    return info


# ---------------------------------------------------------------- the children
def decode_rate(gen_n, n: int, repeats: int) -> float:
    """Tokens/s of tokens 2..n: ``gen_n(k)`` generates k tokens from the same prompt."""
    gen_n(2)  # warm-up
    best1 = best_n = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        gen_n(1)
        best1 = min(best1, time.perf_counter() - t)
        t = time.perf_counter()
        gen_n(n)
        best_n = min(best_n, time.perf_counter() - t)
    return (n - 1) / max(best_n - best1, 1e-9)


def child_ours(args, info: dict) -> dict:
    import torch

    from chatforge.generate.engine import Engine, SamplingConfig
    from chatforge.models.load import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    dtype = args.dtype
    model = load_model(args.model, dtype=dtype, merge_adapter=True).eval()
    tok = load_tokenizer(args.model)
    eng = Engine(model, tok, eos_token_ids=info["eos"])
    cfg = SamplingConfig(temperature=0, max_new_tokens=args.tokens)
    eos = set(info["eos"])
    # the end-of-turn token itself is not part of the reply (llama.cpp's side stops before it)
    greedy = [[t for t in c.token_ids if t not in eos] for c in (eng.generate([p], cfg)[0] for p in info["ids"])]
    gaps = []
    if dtype == "fp32":  # top-1 minus top-2 logit along our greedy path: how close each choice was
        with torch.no_grad():
            for p, g in zip(info["ids"], greedy):
                logits = model(torch.tensor([p + g])).logits[0, len(p) - 1: len(p) - 1 + len(g)].float()
                top = logits.topk(2, dim=-1).values
                gaps.append((top[:, 0] - top[:, 1]).tolist())
    chat = []
    for msgs in info["chat"]:
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
        c = eng.generate([list(ids)], SamplingConfig(temperature=0, max_new_tokens=48))[0]
        chat.append({"text": c.text, "finish": "stop" if c.finish_reason in ("eos", "stop") else c.finish_reason})
    never = Engine(model, tok, eos_token_ids=[-1])
    prompt = info["ids"][0]
    rate = decode_rate(lambda k: never.generate([prompt], cfg.replace(max_new_tokens=k)), args.tokens, args.repeats)
    return {"greedy": greedy, "gaps": gaps, "chat": chat, "tok_s": rate}


def child_llama(args, info: dict) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=512, verbose=False)
    toks = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in info["texts"]]
    eos = set(info["eos"]) | {llm.token_eos(), llm._model.token_eot()}  # what llama.cpp's chat stops on

    def gen(prompt: list[int], n: int, stop: bool) -> list[int]:
        llm.reset()
        out = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if stop and t in eos:
                break
            out.append(t)
            if len(out) >= n:
                break
        return out

    greedy = [gen(p, args.tokens, stop=True) for p in info["ids"]]
    chat = []
    for msgs in info["chat"]:
        r = llm.create_chat_completion(messages=msgs, temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=48)
        chat.append({"text": r["choices"][0]["message"]["content"], "finish": r["choices"][0]["finish_reason"]})
    prompt = info["ids"][0]
    rate = decode_rate(lambda k: gen(prompt, k, stop=False), args.tokens, args.repeats)
    return {"tokenize": toks, "greedy": greedy, "chat": chat, "tok_s": rate,
            "chat_format": getattr(llm, "chat_format", None), "version": __import__("llama_cpp").__version__}


# ---------------------------------------------------------------- comparison
def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(ours: list[list[int]], theirs: list[list[int]], gaps: list[list[float]]) -> tuple[int, list[str]]:
    same, notes = 0, []
    for k, (a, b) in enumerate(zip(ours, theirs)):
        i = first_divergence(a, b)
        if i is None:
            same += 1
            continue
        gap = gaps[k][i] if gaps and i < len(gaps[k]) else None
        why = f"our top-1/top-2 logit gap there {gap:.3f}" if gap is not None else "one side stopped"
        notes.append(f"prompt {k}: first differs at token {i} of {max(len(a), len(b))} ({why})")
    return same, notes


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        info = json.loads((Path(args.workdir) / "prompts.json").read_text(encoding="utf-8"))
        report_result(child_ours(args, info) if args.child == "ours" else child_llama(args, info))
        return 0
    native_bf16 = fast_precision() == "bf16"
    print(machine_header("bf16" if native_bf16 else "fp32", label="fastest chatforge precision (fp32 measured too)"), flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}; threads {args.threads} both sides", flush=True)
    if not Path(args.llama_python).exists():
        print(f"no llama-cpp-python interpreter at {args.llama_python}; nothing to compare "
              "(see the module doc for the one-line install)")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        info = prepare(args, work)
        base = [__file__, "--model", args.model, "--tokens", str(args.tokens), "--threads", str(args.threads),
                "--repeats", str(args.repeats), "--workdir", str(work)]
        ours = {d: run_side(base + ["--child", "ours", "--dtype", d], threads=args.threads)
                for d in (["fp32", "bf16"] if native_bf16 else ["fp32"])}
        theirs = {d: run_side(base + ["--child", "llama", "--gguf", str(work / f"model-{d}.gguf")],
                              threads=args.threads, python=args.llama_python) for d in args.dtypes}
        (work / "results.json").write_text(json.dumps({"ours": ours, "llama": theirs}), encoding="utf-8")
    report(args, info, ours, theirs)
    return 0


def report(args, info: dict, ours: dict, theirs: dict) -> None:
    ref = ours.get("fp32", {})
    n = len(info["ids"])
    print(f"\n{args.model}: {n} held-out prompts, greedy up to {args.tokens} tokens, batch 1, {args.threads} threads"
          + (f", llama-cpp-python {next((t['version'] for t in theirs.values() if 'version' in t), '?')}"))
    table, notes = {}, []
    for d, r in theirs.items():
        if "error" in r:
            table[f"gguf {d}"] = {"file (MiB)": f"{info['sizes'][d] / 2**20:.1f}", "tokenizer same": r["error"]}
            continue
        mine = ours.get("bf16" if d == "bf16" and "bf16" in ours else "fp32", {})
        tok_same = sum(a == b for a, b in zip(r["tokenize"], info["ids"]))
        same, why = compare(mine.get("greedy", []), r["greedy"], ref.get("gaps", []) if mine is ref else [])
        chat_same = sum(a["text"].strip() == b["text"].strip() and a["finish"] == b["finish"]
                        for a, b in zip(mine.get("chat", []), r["chat"]))
        stopped = sum(c["finish"] == "stop" for c in r["chat"])
        vs = "bf16" if mine is ours.get("bf16") and mine is not ref else "fp32"
        table[f"gguf {d}"] = {"file (MiB)": f"{info['sizes'][d] / 2**20:.1f}", "tokenizer same": f"{tok_same}/{n}",
                              f"greedy = ours": f"{same}/{n} ({vs})", "chat same reply": f"{chat_same}/{len(r['chat'])}",
                              "chat stopped (EOT)": f"{stopped}/{len(r['chat'])}",
                              "llama.cpp tok/s": f"{r['tok_s']:.1f}"}
        notes += [f"gguf {d} vs ours {vs}: {w}" for w in why]
    for d, r in ours.items():
        table[f"ours {d}"] = {"chatforge tok/s": f"{r['tok_s']:.1f}" if "tok_s" in r else r.get("error", "")}
    print_columns(table, width=22)
    for line in notes:
        print("  " + line)
    if theirs and ref.get("chat"):
        first = next(iter(theirs.values()))
        if "chat" in first:
            print("\nchat mode, first prompt:")
            print(f"  ours:      {ref['chat'][0]['text']!r} ({ref['chat'][0]['finish']})")
            print(f"  llama.cpp: {first['chat'][0]['text']!r} ({first['chat'][0]['finish']})")


if __name__ == "__main__":
    sys.exit(main())

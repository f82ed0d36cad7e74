"""What every side-by-side benchmark shares: run one side in its own interpreter (so its
peak RSS is its own), read back its result, and print the sides as columns.

A side prints one line ``RESULT {json}`` on stdout; anything else it prints is ignored.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any


def run_side(cmd: list[str], threads: int = 0, python: str | None = None,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``[python] + cmd`` (``env``: extra variables); its ``RESULT`` json, or
    ``{"error": ...}`` (stderr tail shown)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {}))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([python or sys.executable, *cmd], capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stderr[-4000:])
        return {"error": f"exit {out.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def report_result(result: dict[str, Any]) -> None:
    """The child's side of :func:`run_side`."""
    print("RESULT " + json.dumps(result), flush=True)


def steady_steps(times: list[float], skip: int = 1) -> tuple[float, float]:
    """(median, mean) step time without the first ``skip`` steps (allocator / autocast warm-up)."""
    t = times[skip:] if len(times) > skip else times
    return statistics.median(t), statistics.fmean(t)


def print_columns(table: dict[str, dict[str, str]], width: int = 28) -> None:
    """``table[side][row] = text`` as one column per side."""
    sides = list(table)
    print(f"{'':{width}}" + "".join(f"{s:>14}" for s in sides))
    for key in dict.fromkeys(k for s in sides for k in table[s]):
        print(f"{key:{width}}" + "".join(f"{table[s].get(key, ''):>14}" for s in sides))


def step_bench_main(args, name: str, title: str, prepare_data, run_chatforge, run_trl, child,
                    extra_rows=lambda r: {}, goal: str = "") -> int:
    """The parent/child driver of a step-time benchmark over hh-rlhf pairs (RM, DPO).

    Child: run one side and report. Parent: prepare the data once, run each side in its own
    process, print step times, pairs/s and peak RSS side by side, then the ratios."""
    import tempfile
    from pathlib import Path

    if args.child:
        fn = run_chatforge if args.child == "chatforge" else run_trl
        report_result(fn(args, Path(args.workdir)))
        return 0
    if not Path(args.data).exists():
        print(f"no data at {args.data}; nothing to benchmark")
        return 0
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        workdir = Path(tmp)
        info = prepare_data(args, workdir)
        sides = ["chatforge", "trl"] if args.side == "both" else [args.side]
        res = {s: child(s, args, workdir) for s in sides}
    mode = "LoRA r=16" if args.lora else "full fine-tuning"
    print(f"\n{title}, SmolLM2-135M, {mode}, bf16 autocast, grad ckpt {'on' if args.grad_ckpt else 'off'}, "
          f"{args.steps} steps x {args.batch} pairs, max_len {args.max_len}, "
          f"{info['pairs']} hh-rlhf pairs (mean {info['mean_seq_len']:.0f} tokens/sequence), {os.cpu_count()} CPU cores, "
          f"{getattr(args, 'threads', 0) or 'default'} threads")
    table = {}
    for s in sides:
        r = res[s]
        if "error" in r:
            table[s] = {"step median (s)": r["error"]}
            continue
        med, mean = steady_steps(r["step_times"])
        table[s] = {"step median (s)": f"{med:.3f}", "step mean (s)": f"{mean:.3f}",
                    "pairs / s": f"{args.batch / mean:.2f}", **extra_rows(r),
                    "total wall (s)": f"{r['total_s']:.1f}", "peak RSS (MiB)": f"{r['peak_rss_mb']:.0f}"}
    print_columns(table)
    if len(sides) == 2 and all("error" not in res[s] for s in sides):
        cf, trl = steady_steps(res["chatforge"]["step_times"])[1], steady_steps(res["trl"]["step_times"])[1]
        print(f"{'speed-up (step mean)':28}{trl / cf:>13.2f}x" + (f"  ({goal})" if goal else ""))
        print(f"{'RSS ratio (TRL / ours)':28}{res['trl']['peak_rss_mb'] / res['chatforge']['peak_rss_mb']:>13.2f}x")
    return 0

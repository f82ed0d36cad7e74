"""What every side-by-side benchmark shares: run one side in its own interpreter (so its
peak RSS is its own), read back its result, and print the sides as columns; and what every
bench says about the machine: the CPU (model and the flags that decide the fast precision),
the precision it measures in, and a time-bounded matmul peak in that precision.

A side prints one line ``RESULT {json}`` on stdout; anything else it prints is ignored.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# the CPU flags that decide which precision is fast: native bf16 matmul (AMX, AVX-512-BF16) or not
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")


# ---------------------------------------------------------------- the machine and its precision
def cpu_model() -> str:
    """lscpu's "Model name" (what DEVELOPERS.md asks to record with every figure)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    name = _cpuinfo_field("model name")
    return name or platform.processor() or "unknown CPU"


def _cpuinfo_field(key: str) -> str:
    """The first ``key : value`` of /proc/cpuinfo ("" where there is none, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.split(":", 1)[0].strip() == key), "")


def cpu_flags() -> dict[str, bool]:
    """Which of :data:`CPU_FLAGS` this CPU has (from /proc/cpuinfo)."""
    have = set(_cpuinfo_field("flags").split())
    return {f: f in have for f in CPU_FLAGS}


def fast_precision(requested: str = "auto") -> str:
    """The precision a bench measures in: ``requested`` if given, else bf16 where a bf16 matmul
    is timed faster than fp32 on this CPU (chatforge's own test, ``fast_bf16_cpu``), fp32
    elsewhere: on an AVX2-only CPU bf16 is emulated and several times slower than fp32, and
    some CPUs with a bf16 flag still run it slower."""
    if requested != "auto":
        return requested
    from chatforge.models.load import fast_bf16_cpu

    return "bf16" if fast_bf16_cpu() else "fp32"


def machine_info(precision: str | None = None) -> dict[str, Any]:
    """The CPU and precision, for a result file or the header line."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count()}
    if precision is not None:
        info["precision"] = precision
    return info


def precision_reason(precision: str) -> str:
    """Why this precision is (or is not) the fast one on this CPU, in a few words."""
    native = fast_precision() == "bf16"
    if precision == "bf16":
        return "bf16 matmul timed faster than fp32 here" if native else "asked for; bf16 is not faster than fp32 here"
    return "asked for; bf16 is faster here" if native else "bf16 matmul is not faster than fp32 here (timed)"


def machine_header(precision: str | None, label: str = "precision") -> str:
    """One header line: CPU model, its bf16-relevant flags, cores, and the bench's precision
    (``None``: the bench does no model compute)."""
    info = machine_info(precision)
    flags = " ".join(f"{f}={'yes' if v else 'no'}" for f, v in info["cpu_flags"].items())
    prec = "none (no matmul work)" if precision is None else f"{precision} ({precision_reason(precision)})"
    return f"CPU: {info['cpu']} ({flags}), {info['cores']} cores; {label}: {prec}"


def add_precision_arg(parser, what: str = "both sides") -> None:
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help=f"compute precision of {what} (auto: bf16 where this CPU has native bf16 matmul, "
                             "else fp32)")


def matmul_peak(precision: str, budget_s: float = 2.0, max_n: int = 4096) -> tuple[float, float, int]:
    """Best GFLOP/s of a square matmul in ``precision``, per wall second (all torch threads)
    and per CPU second; and the size used. Bounded by time, never by a fixed amount of work:
    a small matmul first measures the rate, the size is chosen so one product takes about a
    tenth of ``budget_s``, and products run until ``budget_s`` is spent (an emulated bf16 on
    an AVX2 CPU once kept a fixed 4096^3 probe busy for over 15 minutes)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]

    def rate(n: int) -> tuple[float, float, float]:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t, c = time.perf_counter(), time.process_time()
        a @ b
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        return 2 * n ** 3 / 1e9 / max(wall, 1e-9), 2 * n ** 3 / 1e9 / max(cpu, 1e-9), wall

    rate(256)  # warm-up: thread pool, kernel selection
    gflops = rate(512)[0]
    n = int((gflops * 1e9 * budget_s / 10 / 2) ** (1 / 3)) // 128 * 128
    n = max(256, min(max_n, n))
    best_wall = best_cpu = 0.0
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end:
        w, c, _ = rate(n)
        best_wall, best_cpu = max(best_wall, w), max(best_cpu, c)
    return best_wall, best_cpu, n


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

    if args.child:
        fn = run_chatforge if args.child == "chatforge" else run_trl
        report_result(fn(args, Path(args.workdir)))
        return 0
    args.precision = fast_precision(args.precision)  # the children get the resolved one
    print(machine_header(args.precision), flush=True)
    if not Path(args.data).exists():
        print(f"no data at {args.data}; nothing to benchmark")
        return 0
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        workdir = Path(tmp)
        info = prepare_data(args, workdir)
        sides = ["chatforge", "trl"] if args.side == "both" else [args.side]
        res = {s: child(s, args, workdir) for s in sides}
    mode = "LoRA r=16" if args.lora else "full fine-tuning"
    prec = "bf16 autocast" if args.precision == "bf16" else args.precision
    print(f"\n{title}, SmolLM2-135M, {mode}, {prec}, grad ckpt {'on' if args.grad_ckpt else 'off'}, "
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

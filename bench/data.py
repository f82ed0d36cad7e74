"""Data pipeline speed and memory: read -> clean -> tokenise -> pack on a synthetic alpaca corpus.

Generates ``--records`` (default 1M) short alpaca records of our own (varied instructions,
optional inputs, answers of 5-60 words, plus the usual dirt: duplicates, N/A and empty
outputs, ``<noinput>`` markers, requests for pictures), then times the chatforge data
path on them with the SmolLM2 tokenizer and its own template. Stages are cumulative and
each runs in its own subprocess, so each peak RSS is that stage's own:

  read      ``readers.iter_file`` (sniff, JSON Lines parse, alpaca adapter -> Conversation)
  clean     + ``clean.Cleaner.check`` (every rule on, duplicate hashes)
  tokenise  + ``tokenize.iter_examples`` (template -> ids + assistant labels, truncation)
  pack      + ``tokenize.pack_examples`` (best-fit rows of ``--max-len``): end to end, streaming
  read-parquet, pack-parquet
            the read and pack stages on a Parquet copy of the same records (written once with
            pyarrow, row groups of 64k; the Hugging Face hub's format), read by ``data/tabular.py``
  trl       the peer, side by side: read + clean (ours) -> the way TRL 1.16's SFTTrainer prepares
            the same data (``Dataset.from_generator``; its prompt-completion tokenize function,
            replicated: two ``apply_chat_template`` calls and a common-prefix completion mask,
            ``datasets.map(num_proc)``; ``trl.pack_dataset(strategy="bfd")``). TRL cannot mask
            assistant turns of SmolLM2's template itself (no ``{% generation %}`` patch for it).

records/s is input records over the stage's wall time (tokenizer loading excluded, shown
apart); cpu us/rec is CPU time (all threads, worker processes included) per input record,
the figure to compare on a shared machine. Peak RSS is the stage process's, "children" the
largest worker's. The header records the CPU model and flags (no matmul here: no precision to
pick). Goal: >= 20k records/s end to end and peak RSS < 2 GiB. The trl stage
needs TRL (``pip install -e ".[bench]"``) and is skipped without it. ``--workers 2`` tokenises
in two forked worker processes (``chatforge.data.token_pool``) beside the one that reads,
cleans and packs: the same rows, in the same order.

    .venv/bin/python bench/data.py                      # 1M records, every stage
    .venv/bin/python bench/data.py --records 20000      # smoke run
    .venv/bin/python bench/data.py --stages pack,trl --out /tmp/alpaca1m.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _sides import machine_header

STAGES = ["read", "clean", "tokenise", "pack", "read-parquet", "pack-parquet", "trl"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000, help="records to generate (default 1M)")
    p.add_argument("--out", help="write (or reuse) the corpus here instead of a temp dir")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {','.join(STAGES)}")
    p.add_argument("--tokenizer", default="smollm2")
    p.add_argument("--template", default="auto")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--num-proc", type=int, default=2, help="datasets.map workers in the trl stage")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenising worker processes in the tokenise/pack stages (iter_examples num_proc; 1: in-process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- corpus (parent)
_COMMON = """the a an of to and in is it that for on with as was be by this are or from at have not
but can will your you we they their there which one all more when what if about so some would
into time people water food light energy heat sound city river country world story day year
make use help find keep give take show write read learn work play grow build plan test check
good new first small large simple clear quick slow long short strong safe healthy useful
because while after before during between often always usually never also only very much many""".split()
_TOPICS = """staying healthy saving money learning a language time management public speaking
recycling at home writing a cover letter training a puppy growing tomatoes reducing stress
studying for exams planning a trip keeping bees baking bread running a meeting fixing a bike
choosing a laptop starting a garden reading more books sleeping better cooking rice""".split("\n")
_CONCEPTS = ["photosynthesis", "inflation", "gravity", "machine learning", "the water cycle", "supply and demand",
             "compound interest", "climate", "vaccines", "blockchain", "plate tectonics", "democracy",
             "the immune system", "electric circuits", "evolution", "recursion", "encryption", "tides"]
_LANGS = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Swedish", "Polish"]
_THINGS = ["the sea", "autumn", "a lighthouse", "the city at night", "an old tree", "friendship", "rain", "the moon"]
_SYL = ["ka", "lo", "mi", "ren", "tas", "vo", "pli", "dor", "sen", "qua", "bel", "tor", "nim", "exa", "ru", "fi"]


def _pseudo_words(rnd: random.Random, n: int) -> list[str]:
    """A larger vocabulary than the common list, so the tokenizer sees many distinct words."""
    return ["".join(rnd.choice(_SYL) for _ in range(rnd.randint(2, 4))) for _ in range(n)]


class Corpus:
    def __init__(self, seed: int):
        self.rnd = random.Random(seed)
        self.rare = _pseudo_words(self.rnd, 5000)

    def sentence(self, lo: int, hi: int) -> str:
        r = self.rnd
        words = [r.choice(self.rare) if r.random() < 0.15 else r.choice(_COMMON) for _ in range(r.randint(lo, hi))]
        if r.random() < 0.1:
            words.insert(r.randrange(len(words) + 1), str(r.randint(0, 9999)))
        return " ".join(words).capitalize() + r.choice([".", ".", ".", "!", "?"])

    def text(self, lo_words: int, hi_words: int) -> str:
        n, out = self.rnd.randint(lo_words, hi_words), []
        while n > 0:
            k = min(n, self.rnd.randint(5, 14))
            out.append(self.sentence(k, k))
            n -= k
        return " ".join(out)

    def record(self) -> dict:
        r = self.rnd
        kind = r.randrange(8)
        inp = ""
        if kind == 0:
            ins = f"Give {r.choice(['three', 'four', 'five'])} tips for {r.choice(_TOPICS).strip()}."
            out = "\n".join(f"{i + 1}. {self.sentence(4, 10)}" for i in range(r.randint(3, 5)))
        elif kind == 1:
            ins = f"Explain {r.choice(_CONCEPTS)} in simple words."
            out = self.text(15, 60)
        elif kind == 2:
            ins = f"Translate the following sentence into {r.choice(_LANGS)}."
            inp, out = self.sentence(5, 12), self.sentence(5, 12)
        elif kind == 3:
            ins = "Summarise the text below in one sentence."
            inp, out = self.text(20, 45), self.sentence(8, 16)
        elif kind == 4:
            ins = f"Write a short poem about {r.choice(_THINGS)}."
            out = "\n".join(self.sentence(4, 7) for _ in range(4))
        elif kind == 5:
            a, b = r.randint(0, 999), r.randint(0, 999)
            ins, out = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        elif kind == 6:
            ins = "Classify the sentiment of this review as positive or negative."
            inp, out = self.sentence(6, 18), r.choice(["Positive.", "Negative."])
        else:
            ins = f"{self.sentence(5, 12)[:-1]}?"
            out = self.text(5, 40)
        dirt = r.random()
        if dirt < 0.005:
            out = r.choice(["N/A", "<nooutput>", ""])
        elif dirt < 0.01:
            inp = "<noinput>"
        elif dirt < 0.013:
            ins = f"Draw a picture of {r.choice(_THINGS)}."
        return {"instruction": ins, "input": inp, "output": out}


def generate(path: Path, n: int, seed: int) -> float:
    t0 = time.time()
    corpus, recent = Corpus(seed), []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if recent and corpus.rnd.random() < 0.01:  # ~1% exact duplicates of a recent record
                rec = corpus.rnd.choice(recent)
            else:
                rec = corpus.record()
                if i % 97 == 0:
                    recent = (recent + [rec])[-200:]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return time.time() - t0


def write_parquet(jsonl: Path, out: Path) -> float:
    """The same records as a Parquet file (string columns instruction/input/output)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.time()
    schema = pa.schema([(k, pa.string()) for k in ("instruction", "input", "output")])
    with pq.ParquetWriter(out, schema) as w, open(jsonl, encoding="utf-8") as f:
        batch = []
        for line in f:
            batch.append(json.loads(line))
            if len(batch) == 65536:
                w.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            w.write_table(pa.Table.from_pylist(batch, schema=schema))
    return time.time() - t0


# ---------------------------------------------------------------- stages (child)
def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_stage(args) -> dict:
    from chatforge.data.clean import Cleaner
    from chatforge.data.io import ReadError
    from chatforge.data.readers import iter_file

    out: dict = {"stage": args.child}
    stage = args.child.removesuffix("-parquet")
    t_load = time.time()
    tok = None
    if stage in ("tokenise", "pack", "trl"):
        from chatforge.data import tokenize as T
        from chatforge.models.load import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        T.get_encoder(tok, args.template)  # template probes, memo: start-up cost, not per record
    out["load_s"] = time.time() - t_load

    counts = {"records": 0, "read_errors": 0, "kept": 0}
    cleaner = Cleaner() if stage != "read" else None

    def records():
        for x in iter_file(args.file):
            if isinstance(x, ReadError):
                counts["read_errors"] += 1
                continue
            counts["records"] += 1
            if cleaner is not None and cleaner.check(x) is not None:
                continue
            counts["kept"] += 1
            yield x

    t0, cpu0 = time.time(), _cpu_seconds()
    if stage in ("read", "clean"):
        for _ in records():
            pass
    elif stage in ("tokenise", "pack"):
        stats = T.TokenizeStats()
        examples = T.iter_examples(records(), tok, args.max_len, args.template, stats=stats, num_proc=args.workers)
        n = 0
        with T.fewer_gc_passes():  # as build_sft_examples, the training path, runs it
            for _ in (T.pack_examples(examples, args.max_len, stats=stats) if stage == "pack" else examples):
                n += 1
        out["tokenize"] = stats.summary()
    else:
        out["rows"] = run_trl(counts, tok, args)
    wall, cpu = time.time() - t0, _cpu_seconds() - cpu0
    out.update(counts, wall_s=wall, cpu_s=cpu, records_per_s=counts["records"] / wall if wall else 0.0,
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               peak_rss_children_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    if cleaner is not None:
        rep = cleaner.report()
        out["clean"] = {"kept": rep["kept"], "rejected": {k: v["rejected"] for k, v in rep["rules"].items()
                                                          if v.get("rejected")}}
    return out


def _trl_tokenize(example: dict, tok) -> dict:
    """TRL 1.16 SFTTrainer's tokenize_fn, prompt-completion conversational branch."""
    prompt_ids = tok.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    ids = tok.apply_chat_template(example["prompt"] + example["completion"], tokenize=True, return_dict=True)["input_ids"]
    n = 0
    while n < min(len(prompt_ids), len(ids)) and prompt_ids[n] == ids[n]:
        n += 1
    return {"input_ids": ids, "completion_mask": [0] * n + [1] * (len(ids) - n)}


def _trl_rows(path: str, counts: dict):
    """Read + clean (ours, as in the other stages) -> TRL's prompt-completion rows."""
    from chatforge.data.clean import Cleaner
    from chatforge.data.io import ReadError
    from chatforge.data.readers import iter_file

    cleaner = Cleaner()
    for rec in iter_file(path):
        if isinstance(rec, ReadError):
            counts["read_errors"] += 1
            continue
        counts["records"] += 1
        if cleaner.check(rec) is not None:
            continue
        counts["kept"] += 1
        last = max(i for i, m in enumerate(rec.messages) if m["role"] == "assistant")
        yield {"prompt": rec.messages[:last], "completion": [rec.messages[last]]}


def run_trl(counts: dict, tok, args) -> int:
    from datasets import Dataset
    from trl import pack_dataset

    # gen_kwargs, not a closure: datasets pickles the generator function to fingerprint it
    ds = Dataset.from_generator(_trl_rows, gen_kwargs={"path": args.file, "counts": counts}, cache_dir=args.workdir)
    ds = ds.map(_trl_tokenize, fn_kwargs={"tok": tok}, num_proc=args.num_proc, remove_columns=ds.column_names)
    ds = pack_dataset(ds, args.max_len, strategy="bfd", map_kwargs={"num_proc": args.num_proc})
    return len(ds)


# ---------------------------------------------------------------- parent
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_stage(args)))
        return
    print(machine_header(None), flush=True)  # tokenisation only: no precision to choose
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        sys.exit(f"unknown stage(s) {', '.join(bad)}; stages: {', '.join(STAGES)}")
    if "trl" in stages and importlib.util.find_spec("trl") is None:
        print("trl is not installed: skipping the peer stage (pip install -e '.[bench]')")
        stages.remove("trl")
    with tempfile.TemporaryDirectory(prefix="chatforge-bench-data-") as tmp:
        path = Path(args.out) if args.out else Path(tmp) / "alpaca.jsonl"
        if path.exists() and sum(1 for _ in open(path, "rb")) == args.records:
            print(f"corpus: reusing {path} ({args.records} records)")
        else:
            dt = generate(path, args.records, args.seed)
            print(f"corpus: {args.records} alpaca records, {path.stat().st_size / 2**20:.0f} MiB, generated in {dt:.1f} s")
        parquet = path.with_suffix(".parquet")
        if any(s.endswith("-parquet") for s in stages):
            dt = write_parquet(path, parquet)
            print(f"corpus: the same records as Parquet, {parquet.stat().st_size / 2**20:.0f} MiB, written in {dt:.1f} s")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start "
              "(a busy machine makes every figure pessimistic)")
        results = []
        for stage in stages:
            data = parquet if stage.endswith("-parquet") else path
            cmd = [sys.executable, __file__, "--child", stage, "--file", str(data), "--tokenizer", args.tokenizer,
                   "--template", args.template, "--max-len", str(args.max_len), "--num-proc", str(args.num_proc),
                   "--workers", str(args.workers),
                   "--workdir", str(Path(tmp) / f"cache-{stage}")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                sys.exit(f"stage {stage} failed (exit {proc.returncode})")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            print(f"  {stage:<9} done in {res['wall_s']:.1f} s", flush=True)
        report(results)


def report(results: list[dict]) -> None:
    print()
    print(f"{'stage':<10}{'wall s':>8}{'records/s':>11}{'cpu s':>8}{'cpu us/rec':>11}{'+stage':>8}"
          f"{'peak RSS MiB':>14}{'children MiB':>14}{'load s':>8}")
    prev = 0.0
    for r in results:
        if r["stage"] == "read-parquet":  # a second chain of stages: its +stage starts from zero
            prev = 0.0
        per = r["cpu_s"] / max(r["records"], 1) * 1e6
        extra = f"{per - prev:>8.1f}" if r["stage"] not in ("trl",) else f"{'':>8}"
        print(f"{r['stage']:<10}{r['wall_s']:>8.1f}{r['records_per_s']:>11.0f}{r['cpu_s']:>8.1f}{per:>11.1f}{extra}"
              f"{r['peak_rss_mib']:>14.0f}{r['peak_rss_children_mib']:>14.0f}{r['load_s']:>8.1f}")
        if r["stage"] not in ("trl",):
            prev = per
    print("(cpu us/rec: CPU time per input record, all threads and worker processes; +stage: what the stage adds."
          " On an idle 2-core machine records/s is at best 2e6 / cpu us/rec for the parallel parts.)")
    last = results[-1]
    print(f"\nread: {last['records']} records, {last['read_errors']} read errors")
    for r in results:
        if "clean" in r:
            print(f"clean: kept {r['clean']['kept']}, rejected {r['clean']['rejected']}")
            break
    for r in results:
        if "tokenize" in r:
            print(f"{r['stage']}: {r['tokenize']}")
    e2e = [r for r in results if r["stage"] in ("pack", "pack-parquet", "trl")]
    for r in e2e:
        peak = r["peak_rss_mib"] + r["peak_rss_children_mib"]
        ok = "meets" if r["records_per_s"] >= 20000 and peak < 2048 else "misses"
        print(f"end to end ({r['stage']}): {r['records_per_s']:.0f} records/s, peak RSS {peak:.0f} MiB "
              f"(self + largest child) -> {ok} the goal (>= 20000 records/s, < 2048 MiB)")


if __name__ == "__main__":
    main()

"""``chatforge data``: look at, convert and clean data files of any supported format.

    chatforge data inspect FILE... [--json] [--format F] [--tokenizer NAME] [--max-errors N]
    chatforge data convert FILE... -o OUT.jsonl|OUT.parquet [--to jsonl|parquet] [--format F] [--on-error fail|skip]
    chatforge data clean   FILE... -o OUT.jsonl [--rejected REJ.jsonl] [--report REPORT.json]
                           [--no-RULE ...] [--min-chars N] [--max-chars N] [--max-repeat X]
    chatforge data formats
    chatforge data arith   --tier add2|mul|two_step -n N --split train|heldout [--seed S] -o OUT.jsonl

Inputs: JSON, JSON Lines, text, CSV / TSV, Parquet, Arrow (a ``.arrow`` file or a
``datasets.save_to_disk`` folder), gzip/bz2/xz. Formats are detected from the content
(``--format`` forces one; ``chatforge data formats`` lists them). ``convert --to parquet``
writes the canonical records as a Parquet table (:mod:`chatforge.data.export`) that
``datasets.load_dataset("parquet", ...)`` and chatforge read back. Records that cannot be read are reported as ``file:line: reason`` on stderr
(count + first ones) and skipped, or stop the command with ``--on-error fail``. Exit code
2 for an unknown format, an empty/unreadable/binary file, or (with ``--on-error fail``)
a bad record.

``data arith`` writes arithmetic problems with checkable answers as prompt records
(:mod:`chatforge.data.arith`: tiers, prompt template, answer in ``meta``). The held-out split
is the same fixed set for every seed; the train split never contains a held-out problem.
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from pathlib import Path
from typing import Any

SHOW_ERRORS = 10  # errors printed per file on stderr
SAMPLE_CHARS = 300  # long strings in the printed sample are cut here


def add_parser(subparsers) -> None:
    from chatforge.commands.data_ai import add_subcommands as add_ai_subcommands
    from chatforge.data.arith import TIERS as ARITH_TIERS
    from chatforge.data.clean import RULES

    p = subparsers.add_parser("data", help="inspect, convert and clean data files",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    i = sub.add_parser("inspect", help="detected format, counts, errors, length statistics, a sample")
    i.add_argument("files", nargs="+", metavar="FILE")
    i.add_argument("--json", action="store_true", help="print one machine-readable object per file (a JSON list)")
    i.add_argument("--format", help="force a format (see `chatforge data formats`)")
    i.add_argument("--tokenizer", metavar="NAME", help="also count tokens (smollm2, tiny, a model dir, ...)")
    i.add_argument("--max-errors", type=int, metavar="N",
                   help=f"errors listed per file (default: all with --json, {SHOW_ERRORS} otherwise)")
    i.set_defaults(func=run_inspect)

    c = sub.add_parser("convert", help="write canonical chatforge JSONL or Parquet")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("-o", "--out", required=True, metavar="OUT.jsonl")
    c.add_argument("--to", choices=["jsonl", "parquet"],
                   help="output format (default: parquet for an OUT ending in .parquet, else jsonl)")
    _read_options(c)
    c.set_defaults(func=run_convert)

    k = sub.add_parser("clean", help="apply the cleaning rules; kept, rejected and a per-rule report",
                       description="Rules: " + ", ".join(RULES) + ". See chatforge.data.clean for what each does.")
    k.add_argument("files", nargs="+", metavar="FILE")
    k.add_argument("-o", "--out", required=True, metavar="OUT.jsonl", help="kept records (canonical JSONL)")
    k.add_argument("--rejected", metavar="REJ.jsonl", help="rejected records, each with meta.rejected_by = rule")
    k.add_argument("--report", metavar="REPORT.json", help="per-rule counts as JSON")
    k.add_argument("--min-chars", type=int, default=2, help="length rule: fewest characters in a record (2)")
    k.add_argument("--max-chars", type=int, default=16000, help="length rule: most characters in a record (16000)")
    k.add_argument("--max-repeat", type=float, default=0.9, help="repetition rule: max share of repeated n-grams (0.9)")
    for r in RULES:
        k.add_argument(f"--no-{r.replace('_', '-')}", f"--no-{r}", dest=f"no_{r}", action="store_true",
                       help=f"switch off the {r} rule")
    _read_options(k)
    k.set_defaults(func=run_clean)

    f = sub.add_parser("formats", help="list the supported formats")
    f.set_defaults(func=run_formats)

    a = sub.add_parser("arith", help="write arithmetic problems with checkable answers (the RL yardstick)",
                       description="Prompts 'What is EXPR? Answer with the number only.' with meta.answer. "
                                   "--split heldout is a fixed set (the first N of a reserved pool, any --seed); "
                                   "--split train is seeded and never holds a held-out problem.")
    a.add_argument("--tier", required=True, choices=ARITH_TIERS,
                   help="add2: two-digit + and -; mul: one-digit x one-or-two-digit; two_step: e.g. a + b * c")
    a.add_argument("-n", type=int, required=True, metavar="N", help="number of problems")
    a.add_argument("--split", required=True, choices=["train", "heldout"])
    a.add_argument("--seed", type=int, default=0, help="train split only (default 0)")
    a.add_argument("-o", "--out", required=True, metavar="OUT.jsonl")
    a.set_defaults(func=run_arith)
    add_ai_subcommands(sub)  # synth / judge / rank: chatforge.commands.data_ai


def _read_options(p) -> None:
    p.add_argument("--format", help="force a format (see `chatforge data formats`)")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="bad records: skip and report (default) or stop at the first one")


# -- inspect -----------------------------------------------------------------------------


def _stats(values: array) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(values)
    n = len(v)
    return {"min": v[0], "median": v[n // 2], "mean": round(sum(v) / n, 1), "p95": v[min(n - 1, int(n * 0.95))],
            "max": v[-1]}


def _short(x: Any) -> Any:
    if isinstance(x, str):
        return x if len(x) <= SAMPLE_CHARS else x[:SAMPLE_CHARS] + f"… [{len(x)} chars]"
    if isinstance(x, list):
        return [_short(v) for v in x]
    if isinstance(x, dict):
        return {k: _short(v) for k, v in x.items()}
    return x


def inspect_file(path: str, format: str | None = None, tokenizer: Any = None,
                 max_errors: int | None = None) -> dict[str, Any]:
    """Everything ``data inspect`` reports about one file, as a JSON-ready dict.

    File-level failures (unknown format, empty, binary ...) come back as ``"fatal"``
    with ``format``/``kind`` None instead of raising, so a directory scan never stops.
    """
    from chatforge.data.clean import all_messages, message_text, responses
    from chatforge.data.io import ReadError
    from chatforge.data.readers import FileStream
    from chatforge.data.records import to_dict
    from chatforge.errors import DataError

    out: dict[str, Any] = {"file": path, "format": None, "kind": None, "items": 0, "records": 0,
                           "n_errors": 0, "errors": []}
    try:
        stream = FileStream(path, format)
    except DataError as e:
        out["fatal"] = str(e)
        return out
    turns, prompt_chars, resp_chars = array("I"), array("I"), array("I")
    texts_p: list[str] = []
    texts_r: list[str] = []
    sample = None
    try:
        for x in stream:
            if isinstance(x, ReadError):
                if max_errors is None or len(out["errors"]) < max_errors:
                    out["errors"].append(x.to_dict())
                continue
            if sample is None:
                sample = to_dict(x)
            msgs = all_messages(x)
            resp = responses(x)
            turns.append(len(msgs))
            rids = {id(m) for m in resp}
            prompt_text = "\n".join(message_text(m) for m in msgs if id(m) not in rids)
            prompt_chars.append(len(prompt_text))
            for m in resp:
                resp_chars.append(len(message_text(m)))
            if tokenizer is not None:
                texts_p.append(prompt_text)
                texts_r.extend(message_text(m) for m in resp)
    except DataError as e:  # a file-level failure found while reading: report it like the others
        out["fatal"] = str(e)
        return out
    out.update(format=stream.format.name, kind=stream.kind, items=stream.n_items, records=stream.n_records,
               n_errors=stream.n_errors, layout=stream.sniffed.layout, compression=stream.sniffed.compression)
    out["turns"] = _stats(turns)
    out["chars"] = {"prompt": _stats(prompt_chars), "response": _stats(resp_chars)}
    if tokenizer is not None:
        out["tokens"] = {"prompt": _stats(_count_tokens(tokenizer, texts_p)),
                         "response": _stats(_count_tokens(tokenizer, texts_r))}
    out["sample"] = _short(sample)
    return out


def _count_tokens(tokenizer: Any, texts: list[str]) -> array:
    n = array("I")
    for i in range(0, len(texts), 1000):
        for ids in tokenizer(texts[i : i + 1000], add_special_tokens=False)["input_ids"]:
            n.append(len(ids))
    return n


def _print_errors(path: str, n_errors: int, errors: list, out=None) -> None:
    if not n_errors:
        return
    out = out or sys.stderr
    print(f"{path}: {n_errors} record(s) could not be read; first {min(len(errors), SHOW_ERRORS)}:", file=out)
    for e in errors[:SHOW_ERRORS]:
        if isinstance(e, dict):
            where = f"{path} row {e['row']}" if e.get("row") is not None else \
                f"{path}:{e['line']}" if e.get("line") is not None else path
        else:
            where = e.where()
        reason = e["reason"] if isinstance(e, dict) else e.reason
        idx = f" [item {e['index']}]" if isinstance(e, dict) and e.get("index") is not None else ""
        print(f"  {where}{idx}: {reason}", file=out)


def _fmt_stats(s: dict | None) -> str:
    if not s:
        return "-"
    return f"min {s['min']}, median {s['median']}, mean {s['mean']}, p95 {s['p95']}, max {s['max']}"


def run_inspect(args) -> int:
    tok = None
    if args.tokenizer:
        from chatforge.models.load import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    max_errors = args.max_errors if args.max_errors is not None else (None if args.json else SHOW_ERRORS)
    results = []
    for path in args.files:
        r = inspect_file(path, args.format, tok, max_errors)
        results.append(r)
        if "fatal" in r:
            print(f"chatforge data inspect: error: {r['fatal']}", file=sys.stderr)
            continue
        _print_errors(path, r["n_errors"], r["errors"])
        if not args.json:
            _print_report(r)
    if args.json:
        json.dump(results, sys.stdout, ensure_ascii=False, indent=1)
        print()
    return 2 if any("fatal" in r for r in results) else 0


def _print_report(r: dict) -> None:
    comp = f", {r['compression']}" if r.get("compression") else ""
    print(f"{r['file']}")
    print(f"  format   {r['format']} ({r['layout']}{comp}) -> {r['kind']}")
    print(f"  records  {r['records']} from {r['items']} items; {r['n_errors']} error(s)")
    print(f"  messages {_fmt_stats(r['turns'])}")
    print(f"  chars    prompt: {_fmt_stats(r['chars']['prompt'])}")
    print(f"           response: {_fmt_stats(r['chars']['response'])}")
    if "tokens" in r:
        print(f"  tokens   prompt: {_fmt_stats(r['tokens']['prompt'])}")
        print(f"           response: {_fmt_stats(r['tokens']['response'])}")
    if r["sample"] is not None:
        sample = json.dumps(r["sample"], ensure_ascii=False, indent=2).replace("\n", "\n    ")
        print(f"  sample   {sample}")
    print()


# -- convert / clean ---------------------------------------------------------------------


class _Writer:
    """JSONL written to ``path.tmp`` and renamed at the end, so a failed run leaves no half file."""

    def __init__(self, path: str | None):
        self.path, self.n, self.f = path, 0, None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.tmp = f"{path}.tmp"
            self.f = open(self.tmp, "w", encoding="utf-8")

    def write(self, rec) -> None:
        from chatforge.data.records import to_dict

        if self.f is not None:
            self.f.write(json.dumps(to_dict(rec), ensure_ascii=False) + "\n")
            self.n += 1

    def close(self, ok: bool) -> None:
        if self.f is None:
            return
        self.f.close()
        if ok:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


def _streams(args):
    """Open every input first, so an unknown format or empty file fails before any work."""
    from chatforge.data.readers import FileStream

    return [FileStream(p, args.format, args.on_error) for p in args.files]


def run_convert(args) -> int:
    from chatforge.data.io import ReadError

    to = args.to or ("parquet" if args.out.lower().endswith(".parquet") else "jsonl")
    streams = _streams(args)
    if to == "parquet":
        from chatforge.data.export import ParquetWriter

        out = ParquetWriter(args.out)
    else:
        out = _Writer(args.out)
    ok = False
    try:
        for s in streams:
            errors = []
            for x in s:
                if isinstance(x, ReadError):
                    errors.append(x)
                else:
                    out.write(x)
            _print_errors(s.path, len(errors), errors)
            print(f"{s.path}: {s.format.name} -> {s.n_records} {s.kind} record(s), {s.n_errors} error(s)")
        ok = True
    finally:
        out.close(ok)
    print(f"wrote {out.n} record(s) to {args.out}")
    return 0


def run_clean(args) -> int:
    from chatforge.data.clean import RULES, Cleaner, tag_rejected
    from chatforge.data.io import ReadError

    disable = [r for r in RULES if getattr(args, f"no_{r}")]
    cleaner = Cleaner(disable=disable, min_chars=args.min_chars, max_chars=args.max_chars, max_repeat=args.max_repeat)
    streams = _streams(args)
    kept, rej = _Writer(args.out), _Writer(args.rejected)
    files, ok = [], False
    try:
        for s in streams:
            errors = []
            for x in s:
                if isinstance(x, ReadError):
                    errors.append(x)
                    continue
                rule = cleaner.check(x)
                if rule is None:
                    kept.write(x)
                else:
                    rej.write(tag_rejected(x, rule))
            _print_errors(s.path, len(errors), errors)
            files.append({"file": s.path, "format": s.format.name, "records": s.n_records, "read_errors": s.n_errors,
                          "first_errors": [str(e) for e in errors[:SHOW_ERRORS]]})
        ok = True
    finally:
        kept.close(ok)
        rej.close(ok)
    report = cleaner.report()
    report["files"] = files
    report["read_errors"] = sum(f["read_errors"] for f in files)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{report['records_in']} record(s) in, {report['kept']} kept -> {args.out}, {report['rejected']} rejected"
          + (f" -> {args.rejected}" if args.rejected else "") + f", {report['read_errors']} unreadable")
    for r, v in report["rules"].items():
        n = v.get("rejected", v.get("fixed", 0))
        what = "fixed" if "fixed" in v else "rejected"
        state = "" if v["enabled"] else " (off)"
        print(f"  {r:15s} {what:8s} {n}{state}")
    return 0


def run_formats(args) -> int:
    from chatforge.data.formats import FORMATS

    for f in FORMATS:
        note = f"  [recognised, not readable: {f.unsupported}]" if f.unsupported else ""
        print(f"{f.name:22s} {f.kind:12s} {f.doc}{note}")
    return 0


def run_arith(args) -> int:
    from chatforge.data.arith import records

    recs = records(args.tier, args.split, args.n, args.seed)
    out = _Writer(args.out)
    ok = False
    try:
        for r in recs:
            out.write(r)
        ok = True
    finally:
        out.close(ok)
    seed = f", seed {args.seed}" if args.split == "train" else " (fixed set)"
    print(f"wrote {out.n} {args.tier} {args.split} problem(s){seed} to {args.out}")
    return 0

"""``chatforge data synth / judge / rank``: data from any OpenAI-compatible model.

    chatforge data synth --seed-tasks FILE --url URL --model NAME -n N -o OUT.jsonl
                         [--to alpaca|canonical] [--rejected REJ.jsonl] [--report REP.json] [--seed S]
                         [--endpoint completions|chat] [--lang en|ms] [--prompt-file F] [--blocklist F] ...
    chatforge data judge FILE... --url URL --model NAME -o OUT.jsonl [--min-score 3]
                         [--rejected REJ.jsonl] [--report REP.json] [--no-RULE ...]
    chatforge data rank  PROMPTS... (--candidates FILE... | --model RUN) --url URL --model-name NAME
                         [-k K] -o OUT.jsonl [--mode pairwise|listwise] [--disagreement tie|drop]

The endpoint is a hosted API, a local llama.cpp / vLLM server or ``chatforge serve``. Every
command shares the client options (:mod:`chatforge.data.openai_client`): ``--api-key``
(default ``$OPENAI_API_KEY``), ``--concurrency``, ``--timeout``, ``--retries``, a reply cache
(``--cache``, default ``OUT.cache.jsonl``: run the same command again after an interruption
and finished requests are not paid twice) and ``--dry-run`` (print the first request, send
nothing). The algorithms are :mod:`chatforge.data.synth`, :mod:`chatforge.data.judge`
(the ``judge`` cleaning rule of :mod:`chatforge.data.clean`) and :mod:`chatforge.data.ai_rank`.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

SHOW = 5  # examples / errors printed


def add_subcommands(sub) -> None:
    """Add ``synth``, ``judge`` and ``rank`` to ``chatforge data``'s subparsers."""
    _add_synth(sub)
    _add_judge(sub)
    _add_rank(sub)


def _client_options(p, model_flag: str = "--model") -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument("--url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument(model_flag, dest="api_model", required=True, metavar="NAME", help="model name sent to the endpoint")
    g.add_argument("--api-key", default=None, help="bearer key (default: $CHATFORGE_API_KEY / $OPENAI_API_KEY)")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (4)")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for a reply (600: a loaded CPU server may take minutes)")
    g.add_argument("--retries", type=int, default=4, help="retries on 429 / 5xx / timeouts / malformed replies (4)")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry's wait in seconds, doubled each time (1)")
    g.add_argument("--cache", metavar="CACHE.jsonl", help="reply cache (default: OUT.cache.jsonl)")
    g.add_argument("--no-cache", action="store_true", help="keep no reply cache (an interrupted run starts over)")
    g.add_argument("--dry-run", action="store_true", help="print the first request that would be sent; send nothing")


def _client(args):
    from chatforge.data.openai_client import ApiClient, api_key_from_env

    cache = None if args.no_cache else (args.cache or f"{args.out}.cache.jsonl")
    return ApiClient(args.url, args.api_key or api_key_from_env(), concurrency=args.concurrency, timeout=args.timeout,
                     retries=args.retries, backoff=args.backoff, cache=cache)


def _dry_run(url: str, path: str, body: dict, n: int | str) -> int:
    from chatforge.data.openai_client import normalise_url

    print(f"dry run: would send {n} request(s); the first, POST {normalise_url(url)}{path}:")
    print(json.dumps({k: v for k, v in body.items() if k not in ("messages", "prompt")}, ensure_ascii=False))
    for m in body.get("messages", []):
        print(f"\n--- {m['role']} ---\n{m['content']}")
    if "prompt" in body:
        print(f"\n--- prompt ---\n{body['prompt']}")
    return 0


def _write_jsonl(path: str | None, rows) -> int:
    """Rows (dicts) to ``path`` via a temporary file and a rename: never a half file."""
    if not path:
        return 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp, n = f"{path}.tmp", 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def _write_json(path: str | None, obj: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _print_cost(client) -> None:
    s = client.stats
    print(f"requests: {s.sent} sent ({s.ok} answered, {s.retries} retries, {s.failed} failed), {s.cached} from the "
          f"cache; tokens used: {s.prompt_tokens} prompt + {s.completion_tokens} completion")
    for reason, n in s.failures.items():
        print(f"  failed: {n} x {reason}")


def _short(s: str, n: int = 160) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n] + "…"


# ------------------------------------------------------------------------------ synth


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="self-instruct: many new instruction/input/output tasks from seed tasks",
                       description="The self-instruct loop as Stanford Alpaca ran it (chatforge.data.synth): "
                                   "few-shot prompts from seed and generated tasks, ROUGE-L similarity filter, "
                                   "blocklist, length bounds. Prompts in English or Malay (--lang).")
    p.add_argument("--seed-tasks", required=True, metavar="FILE", help="seed_tasks.jsonl-shaped or alpaca file")
    p.add_argument("-n", type=int, required=True, metavar="N", help="tasks to keep")
    p.add_argument("-o", "--out", required=True, metavar="OUT.jsonl")
    p.add_argument("--to", choices=["alpaca", "canonical"], default="alpaca",
                   help="alpaca: instruction/input/output/id/meta lines (default); canonical: chatforge conversations")
    p.add_argument("--rejected", metavar="REJ.jsonl", help="every filtered task or block with its reason")
    p.add_argument("--report", metavar="REPORT.json", help="counts per reason, requests, tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the loop and of the requests (0)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="completions: /v1/completions continues the numbered list, as Alpaca did (default); "
                        "chat: /v1/chat/completions for chat-only APIs")
    p.add_argument("--lang", help="prompt language: en or ms (default: guessed from the seeds)")
    p.add_argument("--prompt-file", metavar="FILE", help="your own prompt header ({n} = list size) for any language")
    p.add_argument("--blocklist", metavar="FILE", help="more blocked words, one a line (added to the language's list)")
    p.add_argument("--batch", type=int, help="requests per round (default: --concurrency)")
    p.add_argument("--max-requests", type=int, help="stop after this many requests (default: max(8, n))")
    p.add_argument("--seed-examples", type=int, default=2, help="seed tasks shown per prompt (2)")
    p.add_argument("--generated-examples", type=int, default=1, help="generated tasks shown per prompt, once kept (1)")
    p.add_argument("--list-size", type=int, default=20, help="tasks the prompt asks for in all (20)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=1024, help="reply length per request (1024)")
    p.add_argument("--similarity", type=float, default=0.7, help="ROUGE-L F1 above which a task is a near copy (0.7)")
    p.add_argument("--min-words", type=int, default=4, help="fewest words in an instruction (4)")
    p.add_argument("--max-words", type=int, default=150, help="most words in an instruction (150)")
    _client_options(p)
    p.set_defaults(func=run_synth)


def _read_words(path: str) -> tuple[str, ...]:
    from chatforge.errors import DataError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the blocklist ({e})") from None
    return tuple(w.strip() for w in text.splitlines() if w.strip() and not w.lstrip().startswith("#"))


def run_synth(args) -> int:
    from chatforge.data.openai_client import progress, utc_now
    from chatforge.data.synth import (BLOCKLIST, SynthConfig, TaskFilter, first_request, guess_language, read_seed_tasks,
                                      synthesize, to_alpaca, to_conversation)
    from chatforge.data.records import to_dict
    from chatforge.errors import ConfigError, DataError

    seeds = read_seed_tasks(args.seed_tasks)
    header = None
    if args.prompt_file:
        try:
            header = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{args.prompt_file}: cannot read the prompt ({e})") from None
        if "{n}" not in header:
            raise ConfigError(f"--prompt-file {args.prompt_file}: the header must contain {{n}} (the list size)")
    cfg = SynthConfig(n=args.n, model=args.api_model, seed=args.seed, endpoint=args.endpoint,
                      batch=args.batch or args.concurrency, max_requests=args.max_requests,
                      seed_examples=args.seed_examples, generated_examples=args.generated_examples,
                      list_size=args.list_size, temperature=args.temperature, top_p=args.top_p,
                      max_tokens=args.max_tokens, lang=args.lang, header=header)
    lang = cfg.lang or guess_language(seeds)
    words = BLOCKLIST.get(lang, BLOCKLIST["en"]) + (_read_words(args.blocklist) if args.blocklist else ())
    flt = TaskFilter(min_words=args.min_words, max_words=args.max_words, similarity=args.similarity, blocklist=words)
    print(f"{len(seeds)} seed task(s) from {args.seed_tasks}; language {lang}"
          + ("" if cfg.lang else " (guessed)") + f"; asking {args.url} ({cfg.model}) for {cfg.n} task(s)")
    if args.dry_run:
        path, body = first_request(seeds, cfg, lang)
        return _dry_run(args.url, path, body, f"up to {cfg.max_requests or max(8, cfg.n)}")
    with _client(args) as client:
        bar = progress(cfg.n, "synth", "task")
        client.bar = bar
        try:
            result = synthesize(seeds, cfg, flt, client.map, on_kept=lambda t: bar.update(1), stamp=utc_now)
        finally:
            bar.close()
    rows = [to_alpaca(t) if args.to == "alpaca" else to_dict(to_conversation(t)) for t in result.kept]
    _write_jsonl(args.out, rows)
    _write_jsonl(args.rejected, result.rejected)
    counts = result.counts()
    blocks = len(result.kept) + sum(counts.values()) - counts.get("request_failed", 0)
    report = {"kept": len(result.kept), "requests": result.requests, "blocks_read": blocks, "rejected": counts,
              "stopped": result.stopped, "lang": result.lang, "settings": vars(cfg) | {"header": None},
              "filter": {"min_words": flt.min_words, "max_words": flt.max_words, "similarity": flt.similarity,
                         "blocklist": list(flt.blocklist)}, "client": client.stats.to_dict()}
    _write_json(args.report, report)
    print(f"kept {len(result.kept)} of {blocks} generated task(s) -> {args.out} ({result.stopped})")
    for reason, n in counts.items():
        print(f"  {reason:15s} {n}")
    _print_cost(client)
    for t in result.kept[:SHOW]:
        print(f"  e.g. {_short(t.instruction)}" + (f" | input: {_short(t.input, 60)}" if t.input else "")
              + f" -> {_short(t.output, 80)}")
    if not result.kept and result.failed_requests:
        raise DataError(f"no task kept; every request failed, first: {result.failed_requests[0]}")
    return 0


# ------------------------------------------------------------------------------ judge


def _add_judge(sub) -> None:
    from chatforge.data.clean import RULES

    p = sub.add_parser("judge", help="ask a judge model whether each output answers its instruction (clean rule)",
                       description="The cleaning rules of `data clean`, plus the judge rule: a judge model grades "
                                   "each surviving record 1-5 on a rubric (chatforge.data.judge); below --min-score "
                                   "is rejected with the judge's reason. Records without a verdict are kept.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-o", "--out", required=True, metavar="OUT.jsonl", help="kept records (canonical JSONL)")
    p.add_argument("--rejected", metavar="REJ.jsonl", help="rejected records, each with meta.rejected_by (+ meta.judge)")
    p.add_argument("--report", metavar="REPORT.json", help="the clean report, the judge rule included")
    p.add_argument("--min-score", type=int, default=3, choices=range(1, 6), metavar="1-5",
                   help="lowest passing score (3: partly correct)")
    p.add_argument("--max-tokens", type=int, default=160, help="judge reply length (160)")
    p.add_argument("--min-chars", type=int, default=2)
    p.add_argument("--max-chars", type=int, default=16000)
    p.add_argument("--max-repeat", type=float, default=0.9)
    for r in RULES:
        p.add_argument(f"--no-{r.replace('_', '-')}", dest=f"no_{r}", action="store_true", help=f"switch off {r}")
    p.add_argument("--format", help="force a format (see `chatforge data formats`)")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip")
    _client_options(p)
    p.set_defaults(func=run_judge)


def _read_all(paths: list[str], format: str | None, on_error: str) -> tuple[list, list]:
    """Every record and read error of the files (inputs opened first: a bad file fails before any work)."""
    from chatforge.data.io import ReadError
    from chatforge.data.readers import FileStream

    streams = [FileStream(p, format, on_error) for p in paths]
    records, errors = [], []
    for s in streams:
        for x in s:
            (errors if isinstance(x, ReadError) else records).append(x)
    for e in errors[:SHOW]:
        print(f"  {e.where()}: {e.reason}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} record(s) could not be read (skipped)", file=sys.stderr)
    return records, errors


def run_judge(args) -> int:
    from chatforge.data import judge as J
    from chatforge.data.clean import RULES, Cleaner, tag_rejected
    from chatforge.data.openai_client import progress
    from chatforge.data.records import to_dict

    disable = [r for r in RULES if getattr(args, f"no_{r}")]
    opts = dict(disable=disable, min_chars=args.min_chars, max_chars=args.max_chars, max_repeat=args.max_repeat)
    records, errors = _read_all(args.files, args.format, args.on_error)
    # Pass 1, on copies: the cheap rules (fixes included) decide which records reach the judge,
    # so no money goes on duplicates, and the judge sees the text that will be kept.
    first = Cleaner(**opts)
    targets: dict[int, tuple] = {}
    survivors = 0
    for i, r in enumerate(copy.deepcopy(records)):
        if first.check(r) is None:
            survivors += 1
            t = J.target(r)
            if t is not None:
                targets[i] = t
    order = sorted(targets)
    bodies = [J.request_body(args.api_model, *targets[i], max_tokens=args.max_tokens) for i in order]
    print(f"{len(records)} record(s); {survivors} pass the other rules; {len(bodies)} to judge "
          f"(min score {args.min_score})")
    if args.dry_run:
        if not bodies:
            print("dry run: nothing to judge")
            return 0
        return _dry_run(args.url, "/chat/completions", bodies[0], len(bodies))
    verdicts: dict[int, J.Verdict] = {}
    with _client(args) as client:
        bar = progress(len(bodies), "judge", "rec")
        client.bar = bar
        try:
            replies = client.map("/chat/completions", bodies, on_done=lambda i, r: bar.update(1))
        finally:
            bar.close()
    for i, rep in zip(order, replies):
        if hasattr(rep, "text"):
            verdicts[id(records[i])] = J.verdict_from(rep.text, args.api_model, args.min_score)
        else:
            verdicts[id(records[i])] = J.Verdict(None, "", None, args.api_model, error=f"request failed: {rep.reason}")
    # Pass 2 (the records themselves): every rule, the judge's verdicts as the last one.
    cleaner = Cleaner(**opts, judge=lambda r: verdicts.get(id(r)))
    kept, rejected = [], []
    for r in records:
        rule = cleaner.check(r)
        if rule is None:
            kept.append(to_dict(r))
        else:
            rejected.append(to_dict(tag_rejected(r, rule)))
    _write_jsonl(args.out, kept)
    _write_jsonl(args.rejected, rejected)
    report = cleaner.report()
    report["read_errors"] = len(errors)
    report["rules"]["judge"].update(min_score=args.min_score, model=args.api_model, prompt_version=J.PROMPT_VERSION)
    report["client"] = client.stats.to_dict()
    _write_json(args.report, report)
    print(f"{report['records_in']} record(s) in, {report['kept']} kept -> {args.out}, {report['rejected']} rejected"
          + (f" -> {args.rejected}" if args.rejected else ""))
    for r, v in report["rules"].items():
        if v.get("rejected") or v.get("fixed") or r == "judge":
            what = "fixed" if "fixed" in v else "rejected"
            print(f"  {r:15s} {what:8s} {v.get('rejected', v.get('fixed', 0))}")
    j = report["rules"]["judge"]
    print(f"  judge scores {j['scores']}; {j['unjudged']} kept without a verdict {j['unjudged_reasons'] or ''}")
    _print_cost(client)
    for r in [x for x in rejected if x["meta"].get("rejected_by") == "judge"][:SHOW]:
        print(f"  e.g. rejected, score {r['meta']['judge']['score']}: {_short(r['meta']['judge']['reason'], 120)}")
    return 0


# ------------------------------------------------------------------------------ rank


def _add_rank(sub) -> None:
    from chatforge.data.ai_rank import MODES, POLICIES

    p = sub.add_parser("rank", help="AI-feedback rankings: a judge model orders K candidates per prompt",
                       description="RLAIF rankings (chatforge.data.ai_rank): position bias controlled by asking "
                                   "every pair in both orders (pairwise) or a shuffled list repeated (listwise); "
                                   "output = Ranking records (meta.source 'ai'), for `chatforge rm` / DPO.")
    p.add_argument("prompts", nargs="+", metavar="PROMPTS", help="files whose records' prompts are ranked")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--candidates", nargs="+", metavar="FILE",
                     help="files of responses to the same prompts (conversations, preferences, rankings)")
    src.add_argument("--model", dest="policy", metavar="RUN", help="sample the candidates from this model "
                     "(smollm2, tiny, a run folder, an HF dir ...)")
    p.add_argument("-k", type=int, default=4, help="candidates per prompt (4)")
    p.add_argument("-o", "--out", required=True, metavar="OUT.jsonl", help="Ranking records (canonical JSONL)")
    p.add_argument("--rejected", metavar="REJ.jsonl", help="prompts not ranked, with the reason and the verdicts")
    p.add_argument("--report", metavar="REPORT.json")
    p.add_argument("--mode", choices=MODES, default="pairwise",
                   help="pairwise: each pair in both orders (default); listwise: the list, shuffled, --repeats times")
    p.add_argument("--repeats", type=int, help="listwise: orders shown per prompt (default K: every rotation; "
                   "2: shuffled and reversed, which misses a bias for the middle)")
    p.add_argument("--disagreement", choices=POLICIES, default="tie",
                   help="pairs whose verdicts disagree (or are unreadable): tie (default) or drop the prompt")
    p.add_argument("--seed", type=int, default=0, help="shuffles and candidate sampling (0)")
    p.add_argument("--max-tokens", type=int, default=16, help="judge reply length (16)")
    g = p.add_argument_group("sampling candidates (--model)")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--max-new-tokens", type=int, default=128)
    _client_options(p, model_flag="--model-name")
    p.set_defaults(func=run_rank)


def _candidates_from_files(paths: list[str], format: str | None = None) -> dict[str, list[tuple[str, dict]]]:
    """item id -> [(response text, provenance)] from files holding responses to the prompts."""
    from chatforge.data.ai_rank import item_id
    from chatforge.data.records import Conversation, Preference, Ranking

    out: dict[str, list[tuple[str, dict]]] = {}
    records, _ = _read_all(paths, format, "skip")
    for r in records:
        if isinstance(r, Conversation):
            last = max((i for i, m in enumerate(r.messages) if m["role"] == "assistant"), default=None)
            if last is None or not r.messages[:last]:
                continue
            prompt, resps = r.messages[:last], [r.messages[last]]
        elif isinstance(r, Preference):
            prompt, resps = r.prompt, [r.chosen, r.rejected]
        elif isinstance(r, Ranking):
            prompt, resps = r.prompt, r.responses
        else:
            continue
        base = {k: r.meta[k] for k in ("source", "line", "row", "id", "model") if k in r.meta}
        for j, m in enumerate(resps):
            out.setdefault(item_id(prompt), []).append((m.get("content") or "", dict(base, response=j)))
    return out


def _sample_candidates(args, prompts: list, limit: int | None = None) -> list[list[tuple[str, dict]]]:
    """K sampled replies per prompt from ``--model`` (seeded per prompt, so a rerun makes the same ones)."""
    from chatforge.chat.session import load_engine
    from chatforge.data.openai_client import progress
    from chatforge.generate.sampling import SamplingConfig

    engine = load_engine(args.policy, "auto")
    out = []
    todo = prompts if limit is None else prompts[:limit]
    bar = progress(len(todo), "candidates", "prompt")
    for n, prompt in enumerate(todo):
        cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed * 1_000_003 + n)
        comps = engine.chat([prompt] * args.k, cfg)
        prov = {"model": str(args.policy), "temperature": args.temperature, "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens, "seed": cfg.seed}
        out.append([(c.text.strip(), dict(prov, sample=j, finish_reason=c.finish_reason)) for j, c in enumerate(comps)])
        bar.update(1)
    bar.close()
    return out


def run_rank(args) -> int:
    from chatforge.data import ai_rank as R
    from chatforge.data.openai_client import progress, utc_now
    from chatforge.data.records import prompt_of, to_dict
    from chatforge.errors import ConfigError

    if args.k < 2:
        raise ConfigError(f"-k must be >= 2, got {args.k}")
    if args.mode == "listwise" and args.repeats is not None and args.repeats < 2:
        raise ConfigError("--repeats must be >= 2: one listwise order cannot control position bias")
    records, _ = _read_all(args.prompts, None, "skip")
    items, seen = [], set()
    for r in records:
        p = prompt_of(r)
        iid = R.item_id(p)
        if iid not in seen:
            seen.add(iid)
            items.append((iid, p, {k: r.meta[k] for k in ("source", "line", "row", "id") if k in r.meta}))
    if args.candidates:
        pool = _candidates_from_files(args.candidates)
        cands = [pool.get(iid, []) for iid, _, _ in items]
    else:
        cands = _sample_candidates(args, [p for _, p, _ in items], limit=1 if args.dry_run else None)
    dropped: list[dict] = []
    work = []  # (item, prompt, prompt meta, texts, provenance, views)
    for (iid, prompt, pmeta), cs in zip(items, cands):
        texts, prov, dupes = [], [], 0
        for text, pv in cs:
            if not text.strip() or text in texts:
                dupes += 1
                continue
            if len(texts) < args.k:
                texts.append(text)
                prov.append(pv)
        if len(texts) < 2:
            dropped.append({"item": iid, "prompt": prompt, "reason": f"fewer than 2 distinct non-empty candidates "
                            f"({len(texts)}; {dupes} empty or duplicate)"})
            continue
        views = R.plan(len(texts), args.mode, args.repeats or len(texts), iid, args.seed)
        work.append((iid, prompt, pmeta, texts, prov, views))
        if args.dry_run:
            break
    bodies = [v.body(args.api_model, w[1], w[3], args.max_tokens) for w in work for v in w[5]]
    print(f"{len(items)} prompt(s); {len(work)} with >= 2 candidates; {len(bodies)} judge request(s) ({args.mode})")
    if args.dry_run:
        if not bodies:
            print("dry run: nothing to rank")
            return 0
        return _dry_run(args.url, "/chat/completions", bodies[0], f"{len(bodies)} per prompt like this one,")
    with _client(args) as client:
        bar = progress(len(bodies), "rank", "req")
        client.bar = bar
        try:
            replies = client.map("/chat/completions", bodies, on_done=lambda i, r: bar.update(1))
        finally:
            bar.close()
    rankings, at, first, decisive, agreement = [], 0, 0, 0, []
    stamp = utc_now()
    for iid, prompt, pmeta, texts, prov, views in work:
        mine = replies[at:at + len(views)]
        at += len(views)
        failed = [r for r in mine if not hasattr(r, "text")]
        if failed:  # not a judgement: a tie made of a failed request would be data that was never said
            dropped.append({"item": iid, "prompt": prompt, "reason": f"request failed ({len(failed)} of {len(mine)}): "
                            f"{failed[0]}; run again: finished requests come from the cache"})
            continue
        texts_in = [r.text for r in mine]
        votes, parsed = R.votes_from(views, texts_in, len(texts))
        f, d = R.first_position_rate(views, parsed)
        first, decisive = first + f, decisive + d
        agg = R.aggregate(len(texts), votes, args.disagreement)
        agreement.append(agg.agreement)
        if agg.dropped:
            dropped.append({"item": iid, "prompt": prompt, "reason": agg.dropped, "pairs": agg.pairs,
                            "replies": [(t or "")[:200] for t in texts_in]})
            continue
        rankings.append(R.make_ranking(prompt, texts, prov, agg, item=iid, judge_model=args.api_model, mode=args.mode,
                                       policy=args.disagreement, views=views, replies=texts_in, parsed=parsed,
                                       time=stamp, prompt_meta=pmeta))
    _write_jsonl(args.out, [to_dict(r) for r in rankings])
    _write_jsonl(args.rejected, dropped)
    reasons = Counter(d["reason"].split(" (")[0].split(":")[0] for d in dropped)
    tied = sum(1 for r in rankings if r.tiers is not None)
    report = {"prompts": len(items), "rankings": len(rankings), "with_ties": tied, "dropped": dict(reasons),
              "mean_agreement": round(sum(agreement) / len(agreement), 4) if agreement else None,
              "first_position_rate": round(first / decisive, 4) if decisive else None,
              "mode": args.mode, "disagreement": args.disagreement, "judge": args.api_model,
              "client": client.stats.to_dict()}
    _write_json(args.report, report)
    print(f"{len(rankings)} ranking(s) -> {args.out} ({tied} with ties); {len(dropped)} prompt(s) dropped"
          + (f" -> {args.rejected}" if args.rejected else ""))
    for reason, n in reasons.items():
        print(f"  {n} x {reason}")
    if agreement:
        print(f"  pairs whose verdicts agreed across orders: {report['mean_agreement']:.0%} (mean per prompt)")
    if decisive:
        print(f"  pairwise verdicts for the answer shown first: {first}/{decisive} = {first / decisive:.0%} "
              "(no position bias: 50%)")
    _print_cost(client)
    return 0

"""``chatforge score``: score texts with a trained reward model.

    chatforge score --rm RUN --data FILE... [-o OUT.jsonl]
    chatforge score --rm RUN --prompt TEXT --response TEXT

Any canonical record kind: a conversation's last assistant reply gets ``score`` (a reply that
calls a tool is scored as the ``<tool_call>`` text the model writes for it); a
preference gets ``chosen_score`` / ``rejected_score`` / ``correct``; a ranking ``scores``
(best -> worst) with ``correct_pairs`` and Kendall ``tau``. ``-o`` writes each record with its
scores as JSON Lines; the summary (and pairwise accuracy on preference / ranking data) is
printed either way.
"""

from __future__ import annotations

import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("score", help="score responses with a reward model",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--rm", required=True, help="reward-model run folder (chatforge rm) or saved directory")
    p.add_argument("--data", nargs="+", metavar="FILE", help="records to score (any supported format)")
    p.add_argument("-o", "--output", metavar="OUT.jsonl", help="write records + scores here")
    p.add_argument("--prompt", help="one-off: the user message")
    p.add_argument("--response", help="one-off: the assistant response to score")
    p.add_argument("--format", help="force a reader format (default: auto-detect)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--max-len", type=int, default=None, help="tokens kept per sequence (default: as trained)")
    p.set_defaults(func=run)


def _items(rec) -> tuple[list, list[str]] | None:
    """(prompt, responses) to score for one record; None for records without a response."""
    from chatforge.data.records import Conversation, Preference, Ranking
    from chatforge.data.templates import message_as_text

    if isinstance(rec, Conversation):  # a reply that calls a tool is scored as its <tool_call> text
        return rec.prompt, [message_as_text(rec.messages[len(rec.prompt)])]
    if isinstance(rec, Preference):
        return rec.prompt, [rec.chosen["content"], rec.rejected["content"]]
    if isinstance(rec, Ranking):
        return rec.prompt, [r["content"] for r in rec.responses]
    return None


def _annotate(rec, scores: list[float]) -> dict:
    from chatforge.data.records import Conversation, Preference, to_dict
    from chatforge.train.rm import group_metrics

    d = to_dict(rec)
    if isinstance(rec, Conversation):
        d["score"] = scores[0]
    elif isinstance(rec, Preference):
        d.update(chosen_score=scores[0], rejected_score=scores[1], correct=scores[0] > scores[1])
    else:
        m = group_metrics([scores])
        d.update(scores=scores, correct_pairs=m["acc"])
        if "tau" in m:
            d["tau"] = m["tau"]
    return d


def run(args) -> int:
    from chatforge.errors import ConfigError
    from chatforge.models.heads import load_scorer
    from chatforge.train.rm import group_metrics

    one_off = args.prompt is not None or args.response is not None
    if one_off and (args.prompt is None or args.response is None):
        raise ConfigError("--prompt and --response go together")
    if one_off == bool(args.data):
        raise ConfigError("give either --data FILE... or --prompt TEXT --response TEXT")
    scorer = load_scorer(args.rm, batch_size=args.batch_size, max_len=args.max_len)
    if one_off:
        s = scorer.score([[{"role": "user", "content": args.prompt}]], [args.response])[0]
        print(f"{s:.4f}")
        return 0

    from chatforge.data.readers import read_file

    records, skipped, n_err = [], 0, 0
    for path in args.data:
        res = read_file(path, format=args.format, on_error="skip")
        n_err += len(res.errors)
        for e in res.errors[:3]:
            print(f"  unreadable: {e}", file=sys.stderr)
        records += res.records
    prompts, responses, spans, kept = [], [], [], []
    for rec in records:
        it = _items(rec)
        if it is None:
            skipped += 1
            continue
        spans.append((len(responses), len(it[1])))
        kept.append(rec)
        prompts += [it[0]] * len(it[1])
        responses += it[1]
    scores = scorer.score(prompts, responses) if responses else []
    groups = [scores[a:a + n] for a, n in spans]
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        for rec, g in zip(kept, groups):
            if out:
                out.write(json.dumps(_annotate(rec, g), ensure_ascii=False) + "\n")
    finally:
        if out:
            out.close()
    ranked = [g for g, rec in zip(groups, kept) if len(g) >= 2]
    line = f"scored {len(responses)} responses of {len(kept)} records"
    if skipped or n_err:
        line += f" ({skipped} without a response skipped, {n_err} unreadable)"
    if scores:
        mean = sum(scores) / len(scores)
        line += f"; mean score {mean:.4f}"
    print(line)
    if ranked:
        m = group_metrics(ranked)
        extra = f", Kendall tau {m['tau']:.4f}, top-1 {m['top1']:.4f}" if "tau" in m else ""
        print(f"pairwise accuracy {m['acc']:.4f} over {int(m['pairs'])} pairs, mean margin {m['margin']:.4f}{extra}")
    if args.output:
        print(f"wrote {args.output}")
    return 0

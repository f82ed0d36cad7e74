"""``chatforge label``: a local web app where people rank a model's answers; the output is
``Ranking`` data that ``chatforge rm`` / ``chatforge dpo`` train on directly.

    chatforge label PROMPTS --model smollm2 --k 4 --out rankings.jsonl     # then open http://127.0.0.1:8008/
    chatforge label PROMPTS --model http://host:8000/v1 --out rankings.jsonl
    chatforge label --candidates answers.jsonl --out rankings.jsonl --overlap 0.2 --api-key KEY

Candidates come from the engine (``--model``: smollm2, tiny, a run folder, an HF dir, ...; K
samples per prompt at ``--temperature``), from an OpenAI-compatible server (``--model
http(s)://...``), or from a candidates file (``--candidates``: JSON Lines of ``{"id", "prompt",
"candidates": [...]}``, e.g. the answers of several checkpoints, compared blind). Generated
candidates are saved to ``OUT.candidates.jsonl`` and reused on restart.

Several annotators share one server (each gives a name in the page); ``--overlap`` is the share
of items two people rank (agreement on the progress page). Every judgement is appended to OUT
(rankings), ``OUT.demos.jsonl`` (better answers written by the annotator: SFT data) or
``OUT.skips.jsonl`` and fsynced at once; restarting continues where everyone stopped. Keys in
the page: 1..K pick the order, arrows select / Shift+arrows move, t tie, u unacceptable,
s skip, Enter submit.
"""

from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("label", help="rank a model's answers in the browser -> reward-model data",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("prompts", nargs="?", metavar="PROMPTS",
                   help="prompts file (any format with prompts; not with --candidates)")
    src = p.add_argument_group("candidates")
    src.add_argument("--model", metavar="RUN_OR_URL",
                     help="model to sample from (smollm2, tiny, run folder, HF dir, ...) or an OpenAI-compatible "
                          "http(s)://HOST:PORT/v1")
    src.add_argument("--candidates", metavar="FILE", help="read the candidates instead of generating them")
    src.add_argument("--k", type=int, help="candidates per prompt when generating (default 4; 2..9)")
    src.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (default 0.9; > 0)")
    src.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    src.add_argument("--max-tokens", type=int, default=192, help="longest answer in tokens (default 192)")
    src.add_argument("--seed", type=int, default=0, help="sampling seed, shuffles and the overlap draw (default 0)")
    src.add_argument("--served-model", metavar="NAME", help="with a URL: the model to ask (default: the first listed)")
    src.add_argument("--model-key", metavar="KEY",
                     help="with a URL: its API key (default: $OPENAI_API_KEY)")
    src.add_argument("--template", help="chat template for a local model (default: the run's, else the tokenizer's)")
    src.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="local model weights dtype")
    p.add_argument("--limit", type=int, metavar="N", help="label only the first N prompts (default: all)")
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help="rankings file (appended to; resumed)")
    p.add_argument("--overlap", type=float, default=0.0,
                   help="share of items ranked by two annotators, for agreement (default 0)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8008, help="port (default 8008; 0 = any free port)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (the page asks for it; "
                                     "default: $CHATFORGE_API_KEY; none = open)")
    p.set_defaults(func=run)


def check_args(args) -> None:
    """Every option, before any model loads or port opens."""
    from chatforge.chat.label import MAX_K, MIN_K
    from chatforge.errors import ConfigError

    if args.candidates:
        if args.model or args.prompts:
            raise ConfigError("--candidates brings its own prompts and answers: give no PROMPTS and no --model")
        if args.k is not None:
            raise ConfigError("--k applies to generated candidates; a candidates file has its own")
    else:
        if not args.prompts or not args.model:
            raise ConfigError("give PROMPTS and --model RUN_OR_URL (or --candidates FILE)")
    k = 4 if args.k is None else args.k
    checks = [
        (MIN_K <= k <= MAX_K, f"--k {k}: a ranking needs {MIN_K} to {MAX_K} candidates per prompt"),
        (args.temperature > 0, f"--temperature {args.temperature}: must be > 0 (the K answers must differ)"),
        (0 < args.top_p <= 1, f"--top-p {args.top_p}: must be in (0, 1]"),
        (args.max_tokens >= 1, f"--max-tokens {args.max_tokens}: must be >= 1"),
        (0 <= args.overlap <= 1, f"--overlap {args.overlap}: must be in [0, 1]"),
        (0 <= args.port <= 65535, f"--port {args.port}: must be 0..65535"),
        (args.limit is None or args.limit >= 1, f"--limit {args.limit}: must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    args.k = k


def load_items(args, log=print):
    """The items: a candidates file, the saved candidates of an earlier start, or new ones."""
    from pathlib import Path

    from chatforge.chat import label
    from chatforge.errors import ConfigError

    if args.candidates:
        return label.read_candidates(args.candidates)[:args.limit]
    prompts = label.read_prompts(args.prompts)[:args.limit]
    saved = label.sibling(Path(args.out), "candidates")
    if saved.exists():
        items = label.read_candidates(str(saved))
        if [it.id for it in items] != [iid for iid, _, _ in prompts]:
            raise ConfigError(f"{saved} holds candidates for other prompts than {args.prompts}; "
                              "use another --out (or move that file to generate new ones)")
        log(f"using the candidates saved in {saved}")
        return items
    from chatforge.generate.sampling import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed)
    if args.model.startswith(("http://", "https://")):
        items = _remote(args, prompts, cfg)
    else:
        from chatforge.chat.session import load_engine
        from chatforge.models.load import check_model_exists

        check_model_exists(args.model)
        try:
            engine = load_engine(args.model, args.dtype, args.template)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # a folder that is not a loadable model
            raise ConfigError(f"--model {args.model}: cannot load ({type(e).__name__}: {str(e)[:200]})") from None
        log(f"sampling {args.k} answers for each of {len(prompts)} prompts from {args.model} ...")
        items = label.engine_candidates(engine, prompts, args.k, cfg, str(args.model))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    label.write_candidates(items, saved)
    log(f"candidates saved to {saved}")
    return items


def _remote(args, prompts, cfg):
    import os

    from chatforge.chat import label
    from chatforge.chat.remote import Client
    from chatforge.errors import ChatforgeError

    client = Client(args.model, args.model_key or os.environ.get("OPENAI_API_KEY"))
    model = args.served_model
    if model is None:
        cards = client.models()
        if not cards:
            raise ChatforgeError(f"{client.url}/models lists no model: give one with --served-model NAME")
        model = str(cards[0]["id"])
    return label.remote_candidates(client, model, prompts, args.k, cfg)


def run(args) -> int:
    import os

    from chatforge.errors import ConfigError

    check_args(args)
    key = args.api_key if args.api_key is not None else os.environ.get("CHATFORGE_API_KEY") or None
    if key is not None and (not key.strip() or key != key.strip() or not key.isprintable()):
        raise ConfigError("--api-key: must be non-empty, printable, without surrounding spaces")
    from chatforge.chat import label, server

    try:
        sock = server.bind(args.host, args.port)  # before the work: a busy port fails at once
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    try:
        items = load_items(args)
        store = label.LabelStore(items, args.out, overlap=args.overlap, seed=args.seed)
    except BaseException:
        sock.close()
        raise
    p = store.progress()
    done = sum(a["ranked"] + a["skipped"] for a in p["annotators"])
    print(f"{label.describe(items)}; {done} judgement(s) already in {args.out}, {p['todo']} item(s) to do", flush=True)
    if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can label",
              file=sys.stderr, flush=True)
    print(f"labelling at {server.base_url(sock)}/ (Ctrl-C to stop)", flush=True)
    try:
        label.serve_label(label.make_label_app(store, key), sock)
    finally:
        store.close()
    print("stopped", flush=True)
    return 0

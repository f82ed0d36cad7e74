"""``chatforge serve``: an OpenAI-compatible HTTP API and a web chat page for a model.

    chatforge serve smollm2 --port 8000            # then open http://127.0.0.1:8000/
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi!"}], "stream": true}'

Point any OpenAI client at ``http://HOST:PORT/v1``. With ``--api-key`` (or ``CHATFORGE_API_KEY``)
every request but the page (``/``, ``/static/*``) and ``/health`` needs ``Authorization: Bearer KEY``.
Concurrent requests share one continuously batched decode (``--max-batch`` rows, ``--max-queue``
waiting; beyond that 503 + Retry-After). SIGTERM / Ctrl-C: stop accepting, finish the requests in
flight, exit 0.
"""

from __future__ import annotations

import argparse
import os
import sys

SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API and a web chat page",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="smollm2",
                   help="smollm2 (default), tiny, a run folder, an HF model dir, an adapter dir or a .gguf")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--max-tokens", type=int, default=512, help="reply length when a request gives none (default 512)")
    p.add_argument("--name", help="model id reported by /v1/models (default: the model argument)")
    p.add_argument("--template", help="chat template: auto, tokenizer, chatml, alpaca, human-bot, hugchat or Jinja "
                                      "(default: the run's, else the tokenizer's own)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="weights dtype (auto: bf16 on CPUs with native bf16, else fp32)")
    p.add_argument("--log", action="store_true", help="log every request to stderr")
    g = p.add_argument_group("access")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*, /metrics, /openapi.json "
                                     "(default: $CHATFORGE_API_KEY; none = open)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. http://localhost:3000) to call the API; repeatable "
                        "(default: none, CORS off)")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="sequences waiting for a batch slot; beyond, 503 + Retry-After (default 64)")
    g.add_argument("--max-kv-tokens", type=int, help="KV-cache token slots (default: max-batch x the context)")
    g.add_argument("--max-body", default="1M", help="largest request body, bytes or 512K / 4M (default 1M)")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take; then it is cancelled and answered 504 (default 600)")
    g.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (default 5)")
    p.set_defaults(func=run)


def parse_size(text: str, option: str) -> int:
    """``"1M"`` -> 1048576; a clear error for anything else."""
    from chatforge.errors import ConfigError

    t = str(text).strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1] if t and t[-1] in SIZE_UNITS else ""
    number = t[:-1] if unit else t
    try:
        value = int(float(number) * SIZE_UNITS[unit])
    except ValueError:
        raise ConfigError(f"{option} {text}: expected bytes, e.g. 1048576, 512K or 4M") from None
    if value < 1024:
        raise ConfigError(f"{option} {text}: must be at least 1K")
    return value


def check_args(args: argparse.Namespace) -> dict:
    """Every option's range, before the model loads; returns the server settings they make."""
    from chatforge.errors import ConfigError

    checks = [
        (0 <= args.port <= 65535, f"--port {args.port}: must be 0..65535"),
        (args.max_tokens >= 1, f"--max-tokens {args.max_tokens}: must be >= 1"),
        (args.max_batch >= 1, f"--max-batch {args.max_batch}: must be >= 1"),
        (args.max_queue >= 1, f"--max-queue {args.max_queue}: must be >= 1"),
        (args.max_kv_tokens is None or args.max_kv_tokens >= 2, f"--max-kv-tokens {args.max_kv_tokens}: must be >= 2"),
        (args.request_timeout > 0, f"--request-timeout {args.request_timeout}: must be > 0 seconds"),
        (args.timeout_keep_alive > 0, f"--timeout-keep-alive {args.timeout_keep_alive}: must be > 0 seconds"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    key = args.api_key if args.api_key is not None else os.environ.get("CHATFORGE_API_KEY") or None
    if key is not None and (not key.strip() or key != key.strip() or not key.isprintable()):
        raise ConfigError("--api-key: must be non-empty, printable, without surrounding spaces")
    for origin in args.cors_origin:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(f"--cors-origin {origin}: expected http(s)://HOST[:PORT] or *")
    return {"api_key": key, "cors_origins": [o.rstrip("/") for o in args.cors_origin],
            "max_body": parse_size(args.max_body, "--max-body"), "request_timeout": args.request_timeout,
            "timeout_keep_alive": args.timeout_keep_alive}


def run(args) -> int:
    from chatforge.errors import ConfigError

    settings = check_args(args)
    from chatforge.chat.server import ServerSettings, base_url, bind, serve
    from chatforge.chat.session import load_engine, run_sampling_defaults
    from chatforge.generate.sampling import SamplingConfig
    from chatforge.generate.scheduler import Scheduler
    from chatforge.models.load import check_model_exists

    check_model_exists(args.model)
    measured = run_sampling_defaults(str(args.model))  # published by /v1/config; a bad file fails here
    chat_defaults = {k: v for k, v in measured.items() if k != "source"} if measured else None  # no server paths
    try:
        sock = bind(args.host, args.port)  # before loading: a busy port fails in a second, not after the model
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    try:
        engine = load_engine(args.model, args.dtype, args.template)
        scheduler = Scheduler(engine, max_batch=args.max_batch, max_queue=args.max_queue,
                              max_kv_tokens=args.max_kv_tokens)
    except BaseException:
        sock.close()
        raise
    if args.log:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    name = args.name or str(args.model)
    server_settings = ServerSettings(name, SamplingConfig(max_new_tokens=args.max_tokens),
                                     chat_defaults=chat_defaults, **settings)
    url = base_url(sock)
    if settings["api_key"] is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr, flush=True)
    print(f"serving {name} at {url}/v1 (web chat: {url}/; Ctrl-C to stop)", flush=True)
    serve(scheduler, engine, server_settings, sock, access_log=args.log)
    print("stopped", flush=True)
    return 0

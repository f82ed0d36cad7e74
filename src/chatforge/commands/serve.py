"""``chatforge serve``: an OpenAI-compatible HTTP server for a model.

    chatforge serve smollm2 --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi!"}], "stream": true}'

Point any OpenAI client at ``http://HOST:PORT/v1`` (the API key is not checked).
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
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
    p.set_defaults(func=run)


def run(args) -> int:
    from chatforge.chat.server import make_server
    from chatforge.chat.session import load_engine
    from chatforge.errors import ConfigError
    from chatforge.models.load import check_model_exists

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be 0..65535")
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens {args.max_tokens}: must be >= 1")
    check_model_exists(args.model)
    engine = load_engine(args.model, args.dtype, args.template)
    try:
        server = make_server(engine, args.name or str(args.model), args.host, args.port, args.max_tokens,
                             quiet=not args.log)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    print(f"serving {args.name or args.model} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

"""``chatforge chat``: talk to a model in the terminal (or from a script).

    chatforge chat smollm2
    chatforge chat runs/ppo --persona pirate.yaml --temperature 0.8
    echo "What is 2 + 2?" | chatforge chat runs/sft --temperature 0
    chatforge chat tiny --message "Hi" --message "And then?"
    chatforge chat --url http://127.0.0.1:8000/v1 --api-key KEY    # any OpenAI-compatible server
"""

from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal (streams, /help for commands)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?",
                   help="smollm2 (default), tiny, a run folder, an HF model dir, an adapter dir or a .gguf")
    p.add_argument("--url", help="talk to an OpenAI-compatible server instead (chatforge serve, llama.cpp, a "
                                 "hosted API), e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", metavar="KEY", help="with --url: the server's API key "
                                                    "(default: $CHATFORGE_API_KEY, else $OPENAI_API_KEY)")
    p.add_argument("--model", dest="remote_model", metavar="NAME",
                   help="with --url: the model to ask for (default: the first one /v1/models lists)")
    p.add_argument("--system", metavar="TEXT", help="system prompt (the assistant's context / persona)")
    p.add_argument("--persona", metavar="FILE", help="persona file: plain text, or YAML with name/description")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the run's measured chat defaults, "
                                                     "chat_defaults.json, else 0.7)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: the run's, else 0.9)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off (default)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (default: the run's, else 1)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--stop", action="append", default=[], metavar="WORD", help="stop a reply at WORD (repeatable)")
    p.add_argument("--seed", type=int, help="sampling seed (reproducible replies)")
    p.add_argument("--beams", type=int, default=1, help="beam search with N beams (no streaming)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: > 1 favours longer replies")
    p.add_argument("--message", action="append", metavar="TEXT",
                   help="send TEXT and print the reply, non-interactively (repeatable: one conversation)")
    p.add_argument("--template", help="chat template: auto, tokenizer, chatml, alpaca, human-bot, hugchat or Jinja "
                                      "(default: the run's, else the tokenizer's own)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="weights dtype (auto: bf16 on CPUs with native bf16, else fp32)")
    p.set_defaults(func=run)


def build_session(args):
    """Validate the options (before loading anything), then load the model (or connect to ``--url``)."""
    from chatforge.chat.session import ChatSession, load_engine, persona_prompt, run_sampling_defaults
    from chatforge.errors import ConfigError
    from chatforge.generate.sampling import SamplingConfig

    measured = None if args.url else run_sampling_defaults(args.model or "smollm2")
    chosen = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.0}
    for k in chosen:  # an explicit flag wins, then the run's measured settings, then the chat's own defaults
        flag = getattr(args, k)
        chosen[k] = flag if flag is not None else measured[k] if measured and k in measured else chosen[k]
    if measured and any(getattr(args, k) is None for k in chosen if k in measured):
        print(f"sampling: temperature {chosen['temperature']:g}, top_p {chosen['top_p']:g}, repetition_penalty "
              f"{chosen['repetition_penalty']:g} (measured for this model: {measured['source']})", file=sys.stderr)
    cfg = SamplingConfig(temperature=chosen["temperature"], top_p=chosen["top_p"], top_k=args.top_k, min_p=args.min_p,
                         repetition_penalty=chosen["repetition_penalty"], max_new_tokens=args.max_tokens,
                         stop=list(args.stop), seed=args.seed, num_beams=args.beams,
                         length_penalty=args.length_penalty)
    parts = [persona_prompt(args.persona)] if args.persona else []
    if args.system:
        parts.append(args.system)
    system = "\n\n".join(parts) or None
    if args.url:
        from chatforge.chat.remote import RemoteSession, api_key_from_env

        if args.model:
            raise ConfigError(f"--url: name the server's model with --model {args.model} (MODEL is for local chat)")
        for flag, value in (("--template", args.template), ("--dtype", None if args.dtype == "auto" else args.dtype)):
            if value:
                raise ConfigError(f"{flag}: the server decides this; not available with --url")
        return RemoteSession(args.url, args.api_key or api_key_from_env(), args.remote_model, system=system, cfg=cfg)
    for flag, value in (("--api-key", args.api_key), ("--model", args.remote_model)):
        if value:
            raise ConfigError(f"{flag} goes with --url (a local model is the positional MODEL)")
    from chatforge.models.load import check_model_exists

    model = args.model or "smollm2"
    check_model_exists(model)
    return ChatSession(load_engine(model, args.dtype, args.template), system=system, cfg=cfg)


def run(args) -> int:
    from chatforge.chat.repl import run as run_repl

    session = build_session(args)
    run_repl(session, messages=args.message)
    return 0

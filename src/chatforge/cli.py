"""The ``chatforge`` command.

Each subcommand is a small module in ``chatforge/commands/`` that exposes
``add_parser(subparsers)`` (cheap: no torch/transformers import at module level, so
``chatforge --help`` answers instantly) and whose parser sets ``func`` to the handler.
Errors meant for the user are raised as :class:`chatforge.errors.ChatforgeError`
subclasses and printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# One module per command under chatforge/commands/, in the order `--help` lists them.
COMMANDS = ["data", "sft", "rm", "score", "dpo", "ppo", "export", "chat", "serve", "label", "eval", "pipeline"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatforge", description="Build a small ChatGPT-like assistant end to end.")
    p.add_argument("--version", action="version", version=f"chatforge {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = f"chatforge.commands.{name}"
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # stage not built yet
                continue
            raise
        m.add_parser(sub)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chatforge")
    except PackageNotFoundError:
        return "dev"


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is shown as a one-line error (no traceback)."""
    from chatforge.data.records import RecordError
    from chatforge.errors import ChatforgeError

    return (ChatforgeError, RecordError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_error_types() as e:
        print(f"chatforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

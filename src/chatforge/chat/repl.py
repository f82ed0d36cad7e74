"""The terminal chat: ``chatforge chat MODEL`` (or ``--url URL``: any OpenAI-compatible server).

Interactive (stdin is a terminal): a ``>>>`` prompt with line editing, replies streamed as
they are generated, slash commands (``/help``), Ctrl-C stops the current reply (the
session goes on), Ctrl-D quits. Non-interactive (stdin is a pipe or file, or ``--message``):
each line (each ``--message``) is one user message and each reply is printed on its own,
so scripts can drive it; slash commands work there too. The session is a local
:class:`~chatforge.chat.session.ChatSession` or a :class:`~chatforge.chat.remote.RemoteSession`.
"""

from __future__ import annotations

import sys
from typing import TextIO

from chatforge.chat.session import ChatSession, parse_settings
from chatforge.errors import ChatforgeError

HELP = """\
commands:
  /help                 this help
  /reset                forget the conversation (the system prompt stays)
  /system TEXT          set the system prompt (/system alone removes it) and reset
  /set key=value ...    temperature, top_p, top_k, min_p, max_tokens, repetition_penalty,
                        no_repeat_ngram_size, seed, beams, length_penalty (/set alone shows them)
  /stop WORD            also stop a reply at WORD (/stop alone clears the stop words)
  /save FILE            write the transcript as OpenAI messages JSON
  /quit                 leave (Ctrl-D too); Ctrl-C stops the reply being written"""


class Repl:
    def __init__(self, session: ChatSession, out: TextIO | None = None, interactive: bool = True,
                 info: TextIO | None = None):
        self.session = session
        self.out = out or sys.stdout  # replies (looked up now, not at import: redirect_stdout works)
        self.info = info or (self.out if interactive else sys.stderr)  # everything else: scripts get replies only
        self.interactive = interactive

    def say(self, text: str, stream: TextIO | None = None) -> None:
        stream = stream or self.info
        stream.write(text + "\n")
        stream.flush()

    # ---------------------------------------------------------------- commands
    def command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("quit", "exit", "q"):
            return False
        if name in ("help", "h", "?"):
            self.say(HELP)
        elif name == "reset":
            s.reset()
            self.say("(conversation reset)")
        elif name == "system":
            s.system = arg or None
            s.reset()
            self.say(f"(system prompt {'set' if arg else 'removed'}; conversation reset)")
        elif name == "set":
            if not arg:
                self.say(self.settings())
            else:
                try:
                    s.cfg = parse_settings(arg, s.cfg)
                    self.say("(" + self.settings() + ")")
                except ChatforgeError as e:
                    self.say(f"error: {e}")
        elif name == "stop":
            s.cfg = s.cfg.replace(stop=[*s.cfg.stop, arg] if arg else [])
            self.say(f"(stop words: {', '.join(map(repr, s.cfg.stop)) or 'none'})")
        elif name == "save":
            if not arg:
                self.say("error: /save FILE")
            else:
                try:
                    self.say(f"(saved {len(s.messages())} messages to {s.save(arg)})")
                except ChatforgeError as e:
                    self.say(f"error: {e}")
        else:
            self.say(f"unknown command /{name} (try /help)")
        return True

    def settings(self) -> str:
        c = self.session.cfg
        parts = [f"temperature={c.temperature}", f"top_p={c.top_p}", f"top_k={c.top_k}", f"min_p={c.min_p}",
                 f"max_tokens={c.max_new_tokens}", f"repetition_penalty={c.repetition_penalty}",
                 f"no_repeat_ngram_size={c.no_repeat_ngram_size}", f"seed={c.seed}", f"beams={c.num_beams}",
                 f"length_penalty={c.length_penalty}"]
        skip = getattr(self.session, "unsupported_settings", ())  # what a remote server cannot do
        return " ".join(p for p in parts if p.split("=")[0] not in skip)

    # ---------------------------------------------------------------- one reply
    def reply(self, text: str) -> None:
        """Stream the reply to ``text``; Ctrl-C stops it and keeps what was written."""
        dropped = self.session.dropped
        stream, shown = None, []
        try:
            stream = self.session.stream(text)
            for delta in stream:
                shown.append(delta)
                self.out.write(delta)
                self.out.flush()
        except ChatforgeError as e:
            if shown:
                self.say("", self.out)  # end the partial reply's line
            self.say(f"error: {e}")
            return
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()
                self.session.commit(stream.completion, "".join(shown))
            self.say("", self.out)
            self.say("[interrupted]")
            return
        self.session.commit(stream.completion)
        self.say("", self.out)
        if self.interactive and self.session.dropped > dropped:
            self.say(f"(the oldest {self.session.dropped} turn(s) no longer fit the context window and were dropped)")

    # ---------------------------------------------------------------- loops
    def handle(self, line: str) -> bool:
        line = line.rstrip("\n")
        if not line.strip():
            return True
        if line.startswith("/"):
            return self.command(line.strip())
        self.reply(line)
        return True

    def run_interactive(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self.say("chatforge chat -- /help for commands, Ctrl-C stops a reply, Ctrl-D quits")
        if getattr(self.session, "banner", None):
            self.say(self.session.banner)
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                self.say("")
                continue
            if not self.handle(line):
                return

    def run_lines(self, lines) -> None:
        for line in lines:
            if not self.handle(line):
                return


def interruptible() -> None:
    """Make Ctrl-C raise KeyboardInterrupt even in a process started with SIGINT ignored (a
    background job of a script, ``nohup``): in a terminal, Ctrl-C is how a user stops a reply."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run(session: ChatSession, messages: list[str] | None = None, stdin: TextIO = sys.stdin) -> None:
    """``--message`` list, else a terminal session, else one message per stdin line."""
    if messages:
        Repl(session, interactive=False).run_lines(messages)
    elif stdin.isatty():
        interruptible()
        Repl(session, interactive=True).run_interactive()
    else:
        Repl(session, interactive=False).run_lines(stdin)

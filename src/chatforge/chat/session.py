"""A conversation with a model: system prompt, history within the context window, settings.

Shared by the terminal chat (:mod:`chatforge.chat.repl`) and usable from Python::

    session = ChatSession(load_engine("smollm2"), system="You are a pirate.")
    reply = session.send("Hello!", on_text=print)

History is kept as OpenAI-style ``messages``. Before each reply the prompt is fitted into
``context - max_new_tokens`` tokens: the oldest turns are dropped first, the system prompt
is always kept (nanoChatGPT-style ``--context`` persona).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.generate.engine import Completion, Engine, SamplingConfig

# /set names -> SamplingConfig fields (OpenAI-style aliases where they differ)
SETTINGS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "max_tokens": "max_new_tokens",
    "max_new_tokens": "max_new_tokens",
    "repetition_penalty": "repetition_penalty",
    "no_repeat_ngram_size": "no_repeat_ngram_size",
    "seed": "seed",
    "beams": "num_beams",
    "num_beams": "num_beams",
    "length_penalty": "length_penalty",
}


def run_template(model: str) -> str:
    """The chat template a chatforge run was trained with (its ``config.yaml``), else "auto"
    (the tokenizer's own template, ChatML when it has none)."""
    p = Path(model).expanduser()
    if not p.is_dir():
        return "auto"
    for d in (p, p.parent, p.parent.parent):  # run/, run/model/, run/checkpoints/step-N/
        cfg = d / "config.yaml"
        if cfg.is_file():
            import yaml

            try:
                data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                return "auto"
            t = data.get("template") if isinstance(data, dict) else None
            return t if isinstance(t, str) and t else "auto"
    return "auto"


def run_sampling_defaults(model: str) -> dict | None:
    """The sampling settings measured for a run's model (``chat_defaults.json`` in the run
    folder, written by the pipeline's evaluation: :mod:`chatforge.eval.chat_defaults`), as
    ``{"temperature", "top_p", "repetition_penalty", "max_tokens", "source"}``; None when the
    model has none (then the chat's own defaults apply). Checkpoint and ``model/`` folders
    look in their run folder too."""
    from chatforge.runs import CHAT_DEFAULTS_FILE

    p = Path(model).expanduser()
    if not p.is_dir():
        return None
    for d in (p, p.parent, p.parent.parent):
        f = d / CHAT_DEFAULTS_FILE
        if f.is_file():
            try:
                rec = json.loads(f.read_text(encoding="utf-8"))
                s = rec["settings"]
                out = {k: s[k] for k in ("temperature", "top_p", "repetition_penalty", "max_tokens") if k in s}
                SamplingConfig(**{SETTINGS.get(k, k): v for k, v in out.items()})  # must be valid settings
            except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
                raise ConfigError(f"{f}: not a chat defaults file ({e}); delete it to use the chat's defaults") from None
            return {**out, "source": str(f)}
        if (d / "config.yaml").is_file():  # the run folder itself, without a file
            return None
    return None


def load_engine(model: str, dtype: str = "auto", template: str | None = None) -> Engine:
    """Load a model by name (smollm2, tiny, run folder, HF dir, adapter, .gguf) for chatting.

    ``dtype="auto"``: bf16 weights on CPUs with native bf16 (half the bytes to read per
    token, and decoding is bound by memory bandwidth), else the loader's default.
    ``template=None``: the run's template (see :func:`run_template`).
    """
    from chatforge.data.templates import get_template
    from chatforge.models.load import fast_bf16_cpu, load

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar is noise in a chat (and in its piped output)
    if dtype == "auto":
        import torch

        dtype = "bf16" if not torch.cuda.is_available() and fast_bf16_cpu() else "auto"
    m, tok = load(model, dtype=dtype)
    template = template or run_template(model)
    get_template(tok, template)  # an unknown name fails here, with the list of valid ones
    return Engine(m, tok, template=template)


def persona_prompt(path: str | Path) -> str:
    """A persona file -> system prompt. Plain text is used as is; a YAML mapping may give
    ``system`` (used as is) or ``name`` / ``description`` / ``style`` / ``rules``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--persona {p}: cannot read ({e.strerror})") from None
    data = None
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f":{line + 1}" if line is not None else ""
            raise ConfigError(f"--persona {p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--persona {p}: expected a mapping with name/description (or system)")
    if data is None:
        if not text.strip():
            raise ConfigError(f"--persona {p}: the file is empty")
        return text.strip()
    unknown = set(data) - {"system", "name", "description", "style", "rules"}
    if unknown:
        raise ConfigError(f"--persona {p}: unknown keys {', '.join(sorted(unknown))} "
                          "(system, name, description, style, rules)")
    if data.get("system"):
        return str(data["system"]).strip()
    if not data.get("name") and not data.get("description"):
        raise ConfigError(f"--persona {p}: give 'system', or 'name' and/or 'description'")
    parts = []
    if data.get("name"):
        parts.append(f"You are {data['name']}.")
    if data.get("description"):
        parts.append(str(data["description"]).strip())
    if data.get("style"):
        parts.append(f"Style: {str(data['style']).strip()}")
    rules = data.get("rules")
    if rules:
        rules = rules if isinstance(rules, list) else [rules]
        parts.append("Rules:\n" + "\n".join(f"- {r}" for r in rules))
    return "\n".join(parts)


def parse_settings(text: str, current: SamplingConfig) -> SamplingConfig:
    """``"temperature=0.7 top_p=0.9"`` -> a new, validated config (the current one is untouched
    when anything is wrong: :class:`ConfigError` names the bad key or value)."""
    changes: dict = {}
    items = text.split()
    if not items:
        raise ConfigError("nothing to set: /set key=value ... (keys: " + ", ".join(_setting_names()) + ")")
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise ConfigError(f"{item!r}: expected key=value")
        field = SETTINGS.get(key)
        if field is None:
            raise ConfigError(f"unknown setting {key!r} (known: {', '.join(_setting_names())})")
        changes[field] = _parse_value(key, field, raw)
    cfg = dataclasses.replace(current, **changes)  # __post_init__ validates
    return cfg


def _setting_names() -> list[str]:
    return ["temperature", "top_p", "top_k", "min_p", "max_tokens", "repetition_penalty",
            "no_repeat_ngram_size", "seed", "beams", "length_penalty"]


def _parse_value(key: str, field: str, raw: str):
    kind = {f.name: f.type for f in dataclasses.fields(SamplingConfig)}[field]
    if field == "seed" and raw.lower() in ("none", "random", "off"):
        return None
    try:
        if "int" in str(kind):
            return int(raw)
        return float(raw)
    except ValueError:
        what = "an integer" if "int" in str(kind) else "a number"
        raise ConfigError(f"{key}={raw}: must be {what}") from None


def fit_history(system: list[dict], history: list[dict], budget: int,
                count: Callable[[list[dict]], int]) -> list[dict]:
    """The longest suffix of ``history`` that starts at a user turn and fits ``budget``
    tokens together with ``system`` (``count`` = prompt tokens of a message list)."""
    starts = [i for i, m in enumerate(history) if m["role"] == "user"] or [0]
    for s in starts:  # oldest first: keep as much as possible
        if count(system + history[s:]) <= budget:
            return history[s:]
    last = history[starts[-1]:]
    raise ChatforgeError(f"the message is too long: {count(system + last)} tokens with the system prompt, "
                         f"the budget is {budget} (context minus max_tokens)")


class ChatSession:
    """System prompt + history + sampling settings, around one :class:`Engine`."""

    def __init__(self, engine: Engine, system: str | None = None, cfg: SamplingConfig | None = None):
        self.engine = engine
        self.system = system or None
        self.cfg = cfg or SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=256)
        self.history: list[dict] = []
        self.dropped = 0  # turns forgotten so far to stay within the context window
        self._pending_user = ""

    def system_messages(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def messages(self) -> list[dict]:
        """The transcript (OpenAI ``messages``), system prompt first."""
        return self.system_messages() + self.history

    def reset(self) -> None:
        self.history = []
        self.dropped = 0

    def budget(self) -> int:
        return self.engine.max_context - self.cfg.max_new_tokens

    def prompt_for(self, user_text: str) -> list[int]:
        """Token ids for the next reply; trims the oldest turns to fit the budget."""
        pending = self.history + [{"role": "user", "content": user_text}]
        budget = self.budget()
        if budget < 1:
            raise ConfigError(f"max_tokens={self.cfg.max_new_tokens} leaves no room in the "
                              f"{self.engine.max_context}-token context")
        kept = fit_history(self.system_messages(), pending, budget,
                           lambda msgs: len(self.engine.encode_chat(msgs)))
        forgotten = pending[:len(pending) - len(kept)]
        self.dropped += sum(1 for m in forgotten if m["role"] == "user")
        self.history = kept[:-1]
        self._pending_user = user_text  # joins the history with its reply in commit()
        return self.engine.encode_chat(self.system_messages() + kept)

    def stream(self, user_text: str):
        """Start a reply: a :class:`TextStream`; call :meth:`commit` with its completion."""
        ids = self.prompt_for(user_text)
        return self.engine.stream(ids, self.engine.chat_config(self.cfg))

    def commit(self, completion: Completion | None, text: str | None = None) -> None:
        """Record the user turn and the (possibly interrupted) reply in the history."""
        reply = text if text is not None else (completion.text if completion else "")
        self.history += [{"role": "user", "content": self._pending_user}, {"role": "assistant", "content": reply}]

    def send(self, user_text: str, on_text: Callable[[str], None] | None = None) -> Completion:
        """One full exchange (the programmatic API)."""
        s = self.stream(user_text)
        for delta in s:
            if on_text is not None:
                on_text(delta)
        self.commit(s.completion)
        return s.completion

    def save(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(self.messages(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise ChatforgeError(f"cannot write {p}: {e.strerror}") from None
        return p

"""Chat templates: the built-in ones, which one to use, and where a template's pieces are.

A chat template (Jinja, as in ``tokenizer.chat_template``) turns ``messages`` into the one
string the model reads. We use the tokenizer's own template when it has one (SmolLM2's
ChatML, which also injects a default system prompt when a conversation has none -- we
keep that, so training renders exactly what chat and evaluation will render) and ship
four for models without one:

* ``chatml``    -- ``<|im_start|>role\\n...<|im_end|>\\n``; end of turn ``<|im_end|>``.
* ``alpaca``    -- ``### Instruction:`` / ``### Input:`` / ``### Response:`` sections under
                   the Alpaca preamble (or the system message); end of turn = the eos token.
                   Readers put instruction and input into one user message; a user message
                   that directly follows another one becomes the ``### Input:`` section.
* ``human-bot`` -- nanoChatGPT: ``<human>...<endOfText>\\n<bot>...<endOfText>\\n``.
* ``hugchat``   -- HugNLP/HugChat: ``Human: ... \\n HugChat: ...`` + eos.

:class:`ChatFormat` decomposes a template into constant pieces (text before the first
message, between two messages by role pair, after the last, generation prompt) by
rendering probe conversations with sentinel contents, then checks the decomposition
against Jinja on other probes. Rendering from pieces is a string join (~1 us) instead of
a Jinja render (~50 us), and it says exactly where each assistant message sits in the
text, which is what the label mask needs. Templates that do not decompose (content
rewritten, position-dependent output) fall back to Jinja, message by message.
"""

from __future__ import annotations

import itertools
import json
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from chatforge.errors import ConfigError, DataError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% else %}{{ '" + ALPACA_PREAMBLE + "\n\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.previtem is defined and loop.previtem['role'] == 'user' %}"
    "{{ '### Input:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% elif not loop.first %}{{ message['content'] + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

HUMAN_BOT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<human>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<bot>' }}"
    "{% else %}{{ '<system>' }}{% endif %}"
    "{{ message['content'] + '<endOfText>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<bot>' }}{% endif %}"
)

HUGCHAT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + ' \n ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'HugChat: ' + message['content'] + eos_token + '\n\n' }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'HugChat:' }}{% endif %}"
)

BUILTIN: dict[str, str] = {"chatml": CHATML, "alpaca": ALPACA, "human-bot": HUMAN_BOT, "hugchat": HUGCHAT}
ROLES = ("system", "user", "assistant")


def get_template(tokenizer: Any, name: str = "auto") -> str:
    """The Jinja template to use.

    ``auto``: the tokenizer's own template, else ``chatml``; ``tokenizer``: its own (an
    error if it has none); a built-in name; or a Jinja string (anything with ``{{``/``{%``).
    To make a saved model carry the template it was trained with, set
    ``tokenizer.chat_template = get_template(tokenizer, name)``.
    """
    name = name or "auto"
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one renders chats
        own = own.get("default")
    if name == "auto":
        return own or CHATML
    if name == "tokenizer":
        if not own:
            raise ConfigError("template=tokenizer: this tokenizer has no chat template (use auto, " + _names() + ")")
        return own
    if name in BUILTIN:
        return BUILTIN[name]
    if "{{" in name or "{%" in name:
        return name
    raise ConfigError(f"unknown chat template {name!r} (auto, tokenizer, {_names()}, or a Jinja string)")


def _names() -> str:
    return ", ".join(BUILTIN)


def template_name(template: str) -> str:
    """A short name for messages and reports (``chatml``, ..., or ``custom``)."""
    for k, v in BUILTIN.items():
        if v == template:
            return k
    return "custom"


def render_jinja(tokenizer: Any, template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render with Jinja exactly as ``apply_chat_template`` does (special tokens available)."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


@dataclass
class Rendered:
    """A rendered conversation: the text and the character span of each assistant turn.

    A span covers what the model must learn to write: the assistant content (plus any
    template text between the generation prompt and the content) and the end-of-turn
    string after it. ``spans[i]`` is the i-th assistant message's span.
    """

    text: str
    spans: list[tuple[int, int]]


@dataclass
class ChatFormat:
    """A template taken apart into constant pieces, keyed by role (see the module doc).

    ``fast`` says the pieces reproduced every probe exactly (text and spans); otherwise
    :meth:`render` always goes through Jinja.
    """

    template: str
    eot: str  # end-of-turn string after assistant content ('' if the template writes none)
    start: dict[str, str]  # first role -> text before the first content
    sep: dict[tuple[str, str], str]  # (role, next role) -> text between the two contents
    end: dict[str, str]  # last role -> text after the last content
    gen: dict[str, str]  # last role -> generation prompt, after end[last role]
    lead: dict[str | None, int]  # role before an assistant message (None: first) -> chars of piece after the gen prompt
    fast: bool
    _jinja: Callable[[list[dict], bool], str]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        """Text + assistant spans; from pieces when possible, else from Jinja."""
        if self.fast:
            r = self._render_pieces(messages, add_generation_prompt)
            if r is not None:
                return r
        return self._render_by_prefixes(messages, add_generation_prompt)

    def _render_pieces(self, messages: list[dict], gen: bool) -> Rendered | None:
        out: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        prev = None
        neot = len(self.eot)
        try:
            for m in messages:
                role, content = m["role"], m["content"]
                piece = self.start[role] if prev is None else self.sep[(prev, role)]
                out.append(piece)
                pos += len(piece)
                if role == "assistant":
                    spans.append((pos - self.lead[prev], pos + len(content) + neot))
                out.append(content)
                pos += len(content)
                prev = role
            if prev is None:
                return None
            out.append(self.end[prev])
            if gen:
                out.append(self.gen[prev])
        except KeyError:  # a role sequence the probes did not cover: let Jinja decide
            return None
        return Rendered("".join(out), spans)

    def _render_by_prefixes(self, messages: list[dict], gen: bool) -> Rendered:
        """Jinja, once for the whole conversation and twice per assistant message.

        An assistant span starts where the generation prompt for the messages before it
        ends and stops after the end-of-turn string. This needs a prefix-stable template
        (rendering more messages never rewrites earlier text); anything else is refused
        rather than guessed.
        """
        text = self._jinja(messages, gen)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            upto = self._jinja(messages[: i + 1], False)
            if i == 0:
                begin = upto.find(m["content"]) if m["content"] else len(upto.rstrip()) - len(self.eot)
            else:
                prompt = self._jinja(messages[:i], True)
                begin = len(prompt) if upto.startswith(prompt) else -1
            if begin < 0 or not text.startswith(upto):
                raise DataError(
                    "the chat template is not prefix-stable (rendering later turns rewrites earlier ones), so "
                    "assistant turns cannot be located; use a built-in template (chatml, alpaca, human-bot, hugchat)"
                )
            stop = len(upto.rstrip()) if self.eot else len(upto) - len(self.end.get("assistant", ""))
            spans.append((begin, stop))
        return Rendered(text, spans)


# -- building a ChatFormat from probes ----------------------------------------------------

_FORMATS: "weakref.WeakKeyDictionary[Any, dict[str, ChatFormat]]" = weakref.WeakKeyDictionary()


def chat_format(tokenizer: Any, template: str = "auto") -> ChatFormat:
    """The (cached) :class:`ChatFormat` of ``template`` for ``tokenizer``."""
    template = get_template(tokenizer, template)
    per_tok = _FORMATS.setdefault(tokenizer, {})
    if template not in per_tok:
        per_tok[template] = _build_format(tokenizer, template)
    return per_tok[template]


def _sentinel(k: int) -> str:
    # whitespace around the marker: a template that trims or rewrites content fails to
    # reproduce it, and is then rendered through Jinja (correct, just slower)
    return f" \n⟦cf{k}⟧ \n"


def _probe_sequences() -> list[tuple[str, ...]]:
    seqs: list[tuple[str, ...]] = []
    for n in (1, 2, 3):
        seqs.extend(itertools.product(ROLES, repeat=n))
    return seqs


def _verification_chats() -> list[list[dict]]:
    """Realistic conversations the pieces must reproduce exactly (text and spans)."""
    u, a, s = "user", "assistant", "system"
    contents = ["Hi!", "  spaces around  ", "line one\nline two\n", "", "unicode: é 日本 {{ x }} {% raw %}", "\n\nlead"]
    shapes = [(u, a), (s, u, a), (u, a, u, a), (s, u, a, u, a, u, a), (u, u, a), (u, a, a), (s, u, a, u)]
    chats = []
    for i, shape in enumerate(shapes):
        chats.append([{"role": r, "content": contents[(i + j) % len(contents)]} for j, r in enumerate(shape)])
    return chats


def _build_format(tokenizer: Any, template: str) -> ChatFormat:
    tok_ref = weakref.ref(tokenizer)  # the format is cached per tokenizer: don't keep it alive

    def jinja(messages: list[dict], gen: bool) -> str:
        return render_jinja(tok_ref(), template, messages, gen)

    start: dict[str, str] = {}
    sep: dict[tuple[str, str], str] = {}
    end: dict[str, str] = {}
    gen: dict[str, str] = {}
    consistent = True

    def put(table: dict, key: Any, value: str) -> None:
        nonlocal consistent
        if table.setdefault(key, value) != value:
            consistent = False

    for roles in _probe_sequences():
        msgs = [{"role": r, "content": _sentinel(k)} for k, r in enumerate(roles)]
        try:
            plain, with_gen = jinja(msgs, False), jinja(msgs, True)
        except Exception:  # the template refuses this role sequence (e.g. no system-only chats)
            continue
        pieces = _split_on_sentinels(plain, len(msgs))
        if pieces is None or not with_gen.startswith(plain):
            consistent = False
            continue
        put(start, roles[0], pieces[0])
        for k in range(1, len(roles)):
            put(sep, (roles[k - 1], roles[k]), pieces[k])
        put(end, roles[-1], pieces[-1])
        put(gen, roles[-1], with_gen[len(plain):])

    eot = _end_of_turn(end, sep, jinja, tokenizer)
    lead: dict[str | None, int] = {None: 0}
    for (prev, nxt), piece in sep.items():
        if prev == "assistant" and not piece.startswith(eot):
            consistent = False
        if nxt == "assistant" and prev in end and prev in gen:
            head = end[prev] + gen[prev]
            lead[prev] = len(piece) - len(head) if piece.startswith(head) else 0

    fmt = ChatFormat(template, eot, start, sep, end, gen, lead, fast=False, _jinja=jinja)
    if consistent and start:
        fmt.fast = _pieces_match_jinja(fmt)
    return fmt


def _split_on_sentinels(text: str, n: int) -> list[str] | None:
    pieces, pos = [], 0
    for k in range(n):
        s = _sentinel(k)
        i = text.find(s, pos)
        if i < 0 or text.find(s, i + 1) >= 0:
            return None
        pieces.append(text[pos:i])
        pos = i + len(s)
    pieces.append(text[pos:])
    return pieces


def _end_of_turn(end: dict[str, str], sep: dict, jinja: Callable, tokenizer: Any) -> str:
    """What the template writes right after assistant content (whitespace trimmed)."""
    if "assistant" in end:
        return end["assistant"].rstrip()
    try:  # the probes could not isolate it; ask Jinja directly
        msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]
        text = jinja(msgs, False)
        return text[text.rindex("Yes.") + 4:].rstrip()
    except Exception:
        return getattr(tokenizer, "eos_token", None) or ""


def _pieces_match_jinja(fmt: ChatFormat) -> bool:
    for chat in _verification_chats():
        for gen in (False, True):
            try:
                want = fmt._render_by_prefixes(chat, gen)
            except Exception:
                continue  # Jinja refuses this shape: the pieces will never be asked for it either
            got = fmt._render_pieces(chat, gen)
            if got is not None and (got.text != want.text or got.spans != want.spans):
                return False
    return True


# -- tool calls ------------------------------------------------------------------------------

_TOOL_PROBE = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_cf0", "type": "function", "function": {"name": "cf_probe_fn", "arguments": {"cf_arg": "cf_val"}}}]},
    {"role": "tool", "tool_call_id": "call_cf0", "name": "cf_probe_fn", "content": "cf_probe_result"},
    {"role": "assistant", "content": "Done."},
]


def supports_tools(tokenizer: Any, template: str) -> bool:
    """Does ``template`` render tool calls and results? (A probe conversation must show the
    call's name, its argument and the result; templates that drop or refuse them do not.)"""
    try:
        text = render_jinja(tokenizer, template, _TOOL_PROBE)
    except Exception:
        return False
    return all(x in text for x in ("cf_probe_fn", "cf_val", "cf_probe_result"))


def tool_calls_as_text(messages: list[dict]) -> list[dict]:
    """Messages with tool calls -> plain system/user/assistant messages (Hermes / Qwen2.5 text)."""
    out: list[dict] = []
    for m in messages:
        role = m["role"]
        if role == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
            continue
        content = m.get("content") or ""
        calls = m.get("tool_calls")
        if calls:
            text = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                             "arguments": c["function"].get("arguments", {})},
                                                            ensure_ascii=False) + "\n</tool_call>" for c in calls)
            content = f"{content}\n{text}" if content else text
        out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool", None)
    return out


def message_as_text(m: dict) -> str:
    """A message's text as a model writes it: the content, and any tool calls as the Hermes
    ``<tool_call>`` text of :func:`tool_calls_as_text` (what the encoder renders for templates
    without tool support: SmolLM2's, the built-ins). For scoring and reports, where a tool
    call's ``content`` is None."""
    if not m.get("tool_calls"):
        return m.get("content") or ""
    return tool_calls_as_text([m])[0]["content"]


# -- end of turn / stopping -----------------------------------------------------------------

def end_of_turn(tokenizer: Any, template: str = "auto") -> str:
    """The string a template writes after assistant content (``<|im_end|>``, eos, ``<endOfText>``)."""
    return chat_format(tokenizer, template).eot or (tokenizer.eos_token or "")


def end_of_turn_ids(tokenizer: Any, template: str = "auto") -> list[int]:
    """Token ids that end an assistant turn: the end-of-turn token if it is one token, and eos.

    A multi-token end of turn (``<endOfText>`` on most tokenizers) cannot be an id; the
    engine stops on :func:`stop_strings` instead.
    """
    ids: list[int] = []
    eot = end_of_turn(tokenizer, template)
    if eot:
        enc = tokenizer(eot, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids.append(enc[0])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def stop_strings(tokenizer: Any, template: str = "auto") -> list[str]:
    """Strings that end generation: the end of turn, eos, and the next user turn's header
    (so a model that forgets to stop is cut before it writes the user's part)."""
    fmt = chat_format(tokenizer, template)
    out = [fmt.eot, tokenizer.eos_token or ""]
    nxt = fmt.sep.get(("assistant", "user"))
    if nxt is not None and fmt.fast:
        header = nxt[len(fmt.eot):].strip()
        if header:
            out.append(header)
    seen: list[str] = []
    for s in out:
        if s and s not in seen:
            seen.append(s)
    return seen

"""An Ollama ``Modelfile`` for an exported GGUF: template, stop tokens, default parameters.

Ollama renders prompts with a Go ``text/template``, not the Jinja template the GGUF carries.
We do not translate Jinja; we translate what the template *does*. :mod:`chatforge.data.templates`
already takes a chat template apart into constant pieces (the text before the first message
by its role, between two messages by their role pair, after the last one, the generation
prompt) and checks the pieces reproduce Jinja exactly. Those pieces become one Go template that
picks a piece by the previous and the current role; so Ollama's prompt is the string our
engine and llama.cpp's chat mode build, including a default system prompt the template injects
(SmolLM2's). Every piece is a quoted Go string literal, so no template text is ever parsed
as Go template syntax. A template that does not decompose is an error here, not a guess.
"""

from __future__ import annotations

import json
from typing import Any

from chatforge.errors import ChatforgeError

ROLES = ("system", "user", "assistant")
# chatforge's sampling names -> Ollama's PARAMETER names
PARAMETERS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
              "repetition_penalty": "repeat_penalty"}


def go_string(s: str) -> str:
    """A Go interpreted string literal for ``s`` (JSON's escapes are Go's, for these characters)."""
    return json.dumps(s, ensure_ascii=False)


def go_template(tokenizer: Any, template: str = "auto") -> str:
    """The Go template that renders ``.Messages`` as ``template`` does, ending with the generation prompt."""
    from chatforge.data.templates import chat_format

    fmt = chat_format(tokenizer, template)
    if not fmt.fast:
        raise ChatforgeError("this chat template does not split into constant pieces, so no Ollama template "
                             "can be written for it (the GGUF still carries it for llama.cpp)")

    def pick(var: str, table: dict[str, str], after: str = "") -> list[str]:
        """``if eq $var "role"`` chain over the roles ``table`` has."""
        out = []
        for i, role in enumerate(r for r in ROLES if r in table):
            out.append(f'{{{{- {"if" if i == 0 else "else if"} eq {var} "{role}" }}}}'
                       f'{{{{ {go_string(table[role] + after)} }}}}')
        return out + ["{{- end }}"] if out else []

    lines = ['{{- $prev := "" }}', "{{- range .Messages }}", '{{- if eq $prev "" }}']
    lines += ["  " + x for x in pick(".Role", fmt.start)]
    for prev in ROLES:
        nxt = {role: fmt.sep[(prev, role)] for role in ROLES if (prev, role) in fmt.sep}
        if nxt:
            lines.append(f'{{{{- else if eq $prev "{prev}" }}}}')
            lines += ["  " + x for x in pick(".Role", nxt)]
    lines += ["{{- end }}", "{{- .Content }}", "{{- $prev = .Role }}", "{{- end }}"]
    ends = {role: fmt.end[role] + fmt.gen[role] for role in ROLES if role in fmt.end and role in fmt.gen}
    lines += pick("$prev", ends)
    return "\n".join(lines)


def modelfile(gguf_name: str, tokenizer: Any, stop_tokens: list[str], context_length: int,
              sampling: dict[str, Any] | None = None, system: str | None = None) -> str:
    """The Modelfile text: ``FROM ./NAME.gguf``, ``TEMPLATE``, a ``stop`` per end-of-turn token,
    ``num_ctx`` and the sampling defaults (a run's measured ones where it has them)."""
    tmpl = go_template(tokenizer)
    if '"""' in tmpl:
        raise ChatforgeError('the chat template contains """, which a Modelfile cannot quote')
    lines = [f"# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}", "",
             f'TEMPLATE """{tmpl}"""', ""]
    for s in stop_tokens:
        lines.append(f"PARAMETER stop {go_string(s)}")
    lines.append(f"PARAMETER num_ctx {min(context_length, 8192)}")
    for key, value in (sampling or {}).items():
        if key in PARAMETERS and value is not None:
            lines.append(f"PARAMETER {PARAMETERS[key]} {value}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"

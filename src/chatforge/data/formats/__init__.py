"""One adapter per data format (see :mod:`chatforge.data.formats.base` for the contract).

``FORMATS`` is the detection order: on equal scores the earlier format wins, so the
specific formats come before the generic ones.
"""

from chatforge.data.formats import alpaca, alpaca_eval, chat, fastchat, hh, prompt_completion, text
from chatforge.data.formats.base import Bad, Format

FORMATS: list[Format] = [
    *chat.FORMATS,
    *hh.FORMATS,
    *alpaca_eval.FORMATS,
    *fastchat.FORMATS,
    *alpaca.FORMATS,
    *prompt_completion.FORMATS,
    *text.FORMATS,
]
BY_NAME: dict[str, Format] = {f.name: f for f in FORMATS}

__all__ = ["FORMATS", "BY_NAME", "Format", "Bad"]

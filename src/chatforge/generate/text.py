"""Token ids -> text, one token at a time: UTF-8-safe deltas and stop strings.

A byte-level BPE token can end in the middle of a multi-byte character (an emoji is often
3-4 tokens), so decoding the newest token alone prints garbage. The detokenizer decodes a
short window of recent tokens and only releases text once it no longer ends in U+FFFD
(the replacement character a partial UTF-8 sequence decodes to). The window keeps enough
left context for SentencePiece-style tokenizers, whose decoding of a token depends on the
previous one (the leading-space marker).

Stop strings are matched on the text, so a stop string may span token boundaries. Text that
could still turn into a stop string (a suffix that is a prefix of one) is held back from the
stream until it is decided.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Incremental decoding of a growing list of token ids (vLLM/TGI's offset scheme)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far that is known to be complete
        self._prefix = 0  # window start: context tokens already turned into text
        self._read = 0  # tokens before this index are already in self.text
        self._prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token: int) -> str:
        """Append a token; return the newly completed text ("" while a character is partial)."""
        self.ids.append(token)
        window = self._decode(self.ids[self._prefix:])
        if len(window) <= len(self._prefix_text) or window.endswith(REPLACEMENT):
            return ""
        delta = window[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix:self._read])
        self.text += delta
        return delta

    def finish(self) -> str:
        """Release whatever is held back (a genuinely broken byte sequence decodes to U+FFFD)."""
        full = self._decode(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        self._prefix = self._read = len(self.ids)
        self._prefix_text = ""
        return delta


def find_stop(text: str, stops: list[str], start: int = 0) -> int:
    """Index of the earliest occurrence of any stop string in ``text[start:]``, or -1."""
    best = -1
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string:
    that much text must be held back, it may still become a stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


class TextTracker:
    """One sequence's text: detokenizes, applies stop strings and yields what may be shown."""

    def __init__(self, tokenizer, stops: list[str]):
        self.detok = Detokenizer(tokenizer)
        self.stops = stops
        self.max_stop = max((len(s) for s in stops), default=0)
        self.text = ""  # final text so far: cut at a stop string once one is found
        self.emitted = 0  # characters of self.text already handed to the stream
        self.stopped = False

    def add(self, token: int) -> str:
        """Feed one generated token; return the text that became safe to show."""
        return "" if self.stopped else self._extend(self.detok.add(token))

    def finish(self) -> str:
        """End of generation: flush held-back text (unless a stop string already ended it)."""
        return "" if self.stopped else self._extend(self.detok.finish(), final=True)

    def _extend(self, delta: str, final: bool = False) -> str:
        if not delta and not final:
            return ""
        before = len(self.text)
        self.text += delta
        if self.stops:
            i = find_stop(self.text, self.stops, max(0, before - self.max_stop + 1))
            if i != -1:
                self.text = self.text[:i]
                self.stopped = True
                final = True
        end = len(self.text) if final else len(self.text) - partial_stop_len(self.text, self.stops)
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

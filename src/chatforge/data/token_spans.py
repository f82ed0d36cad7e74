"""Character positions of a rendered text -> token indices of its encoding.

The label mask is defined on characters (:class:`chatforge.data.templates.Rendered` spans:
where the assistant text is) and applied to tokens. These work on any encoding with
``ids``, ``char_to_token(c)`` and ``token_to_chars(t)``: the Rust tokenizer's ``Encoding``
and :class:`chatforge.data.pretoken_cache.PyEncoding`.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any


def token_at(enc: Any, c: int, first: bool) -> int:
    """The token holding character ``c``: for the ``first`` token of a span, else for its last.

    A character no token claims (trimmed offsets) takes the nearest token inward; a
    multi-byte character split over several tokens ends a span at the last of them.
    """
    t = enc.char_to_token(c)
    if t is None:
        return _nearest_token(enc, c, first)
    if not first:
        n = len(enc.ids)
        while t + 1 < n and enc.token_to_chars(t + 1)[0] <= c:
            t += 1
    return t


def _nearest_token(enc: Any, c: int, forward: bool) -> int:
    step, stop = (1, c + 256) if forward else (-1, max(c - 256, -1))
    for i in range(c, stop, step):
        t = enc.char_to_token(i)
        if t is not None:
            return t
    return len(enc.ids) if forward else 0


class Locator:
    """Maps a character span of a text cut into fragments to the tokens that overlap it.

    Fragment k starts at character ``char_starts[k]`` and token ``tok_starts[k]``; its
    encoding is ``table[k]``, None for a special token (one token, no characters inside).
    """

    def __init__(self, char_starts: list[int], tok_starts: list[int], table: list[Any]):
        self.cs, self.ts, self.table = char_starts, tok_starts, table

    def span(self, s: int, e: int) -> tuple[int, int]:
        """[first, last + 1) token indices of the tokens overlapping characters [s, e)."""
        if e <= s:
            t = self._token(s, first=True)
            return t, t
        return self._token(s, first=True), self._token(e - 1, first=False) + 1

    def _token(self, c: int, first: bool) -> int:
        k = bisect_right(self.cs, c) - 1
        enc = self.table[k]
        if enc is None:  # a special token
            return self.ts[k]
        return self.ts[k] + token_at(enc, c - self.cs[k], first)

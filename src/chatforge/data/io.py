"""Robust low-level reading: bytes on disk -> JSON items or text lines, each with its line.

Real data files lie about themselves: ``.jsonl`` files holding one JSON array, ``.json``
files holding JSON Lines, a byte-order mark, CRLF endings, gzip without ``.gz``, a
trailing comma before ``]``, two objects glued on one line. So the layout is decided by
the *content* (:func:`sniff`), never by the extension, and every problem becomes a
:class:`ReadError` naming the file and the 1-based line -- the caller decides whether to
skip it or stop. Only file-level problems (missing, empty, binary, not UTF-8, nothing
parseable) raise :class:`chatforge.errors.DataError`.

Items come out of :func:`iter_items` as ``(line, index, value)`` tuples:

* JSON Lines: ``value`` is the parsed JSON value, ``line`` its line, ``index`` None.
* JSON document (an array, or a single object): ``line`` is where the item *starts*,
  ``index`` its position in the array.
* text: ``value`` is the line's text (without its newline), ``index`` None.

JSON Lines and text are streamed line by line (constant memory); a JSON document is
decoded from memory item by item (``raw_decode``), which is what lets a broken array
still yield every object before the break.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Union

from chatforge.errors import DataError

Item = tuple[int, Union[int, None], Any]  # (line, array index or None, value)

SNIFF_BYTES = 1 << 16
_WS = re.compile(r"[ \t\r\n]*")
_NUL = b"\x00"


@dataclass
class ReadError:
    """One record (or one spot of a file) that could not be read; never fatal by itself."""

    file: str
    line: int | None
    reason: str
    index: int | None = None  # array index, for JSON documents
    item: bool = True  # False: a spot in the file's structure (a trailing comma), not a lost item

    def where(self) -> str:
        at = f"{self.file}:{self.line}" if self.line is not None else self.file
        return at + (f" [item {self.index}]" if self.index is not None else "")

    def __str__(self) -> str:
        return f"{self.where()}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"line": self.line, "reason": self.reason}
        if self.index is not None:
            d["index"] = self.index
        return d


@dataclass
class Sniffed:
    """What the first bytes of a file say about it."""

    path: str
    compression: str | None  # "gzip" | "bz2" | "xz" | None
    encoding: str  # "utf-8" (BOM stripped) or "utf-16"
    layout: str  # "jsonl" | "json" | "text"
    bom: bool = False


# -- opening ----------------------------------------------------------------------------

_MAGIC = [(b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz")]
_UNSUPPORTED_MAGIC = [
    (b"PK\x03\x04", "a zip archive: unzip it first"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it first (zstd -d)"),
    (b"PAR1", "a Parquet file: convert it to JSON Lines first"),
    (b"ARROW1", "an Arrow file: convert it to JSON Lines first"),
    (b"SQLite format 3", "an SQLite database"),
]


def open_binary(path: str | Path) -> tuple[IO[bytes], str | None]:
    """Open ``path`` for reading bytes, transparently decompressing by magic bytes."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    for magic, what in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            raise DataError(f"{path}: is {what}")
    for magic, comp in _MAGIC:
        if head.startswith(magic):
            opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[comp]
            return opener(p, "rb"), comp
    return open(p, "rb"), None


def _read_head(path: str | Path) -> tuple[bytes, str | None, bool]:
    """First SNIFF_BYTES decompressed bytes, the compression, and whether that was all."""
    f, comp = open_binary(path)
    try:
        with f:
            head = f.read(SNIFF_BYTES)
            complete = not f.read(1)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise DataError(f"{path}: corrupt {comp} stream: {e}") from None
    return head, comp, complete


def sniff(path: str | Path) -> Sniffed:
    """Decide compression, encoding and layout (``jsonl`` / ``json`` / ``text``) by content."""
    head, comp, complete = _read_head(path)
    encoding, bom = "utf-8", False
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding, bom = "utf-16", True
        text = head.decode("utf-16", errors="ignore")
    else:
        if head.startswith(b"\xef\xbb\xbf"):
            head, bom = head[3:], True
        if _NUL in head[:8192]:
            raise DataError(f"{path}: binary file (NUL bytes in the first 8 KiB); expected JSON, JSON Lines or text")
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:
            if complete or e.start < len(head) - 4:  # not just a character cut at the chunk end
                line = head[: e.start].count(b"\n") + 1
                raise DataError(
                    f"{path}:{line}: not UTF-8 text (invalid byte 0x{head[e.start]:02x} at offset {e.start}); "
                    "convert it to UTF-8 first (e.g. iconv)"
                ) from None
            text = head[: e.start].decode("utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: empty file" + (" (only whitespace)" if text else ""))
    return Sniffed(str(path), comp, encoding, _layout(stripped, complete, path), bom)


def _layout(text: str, complete: bool, path: str | Path) -> str:
    c = text[0]
    if c == "[":
        return "json"
    if c != "{":
        return "text"
    first = text.split("\n", 1)[0].strip()
    try:
        json.loads(first)
        return "jsonl"
    except json.JSONDecodeError:
        pass
    # The first line is not a whole object: a pretty-printed single document, or JSON
    # Lines whose first line is broken. Only a full parse can tell.
    if not complete:
        whole = read_text(path)
    else:
        whole = text
    try:
        json.loads(whole)
        return "json"
    except json.JSONDecodeError:
        return "jsonl"


def read_text(path: str | Path) -> str:
    """The whole file as text (decompressed, BOM stripped); DataError if not UTF-8."""
    f, comp = open_binary(path)
    try:
        with f:
            data = f.read()
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise DataError(f"{path}: corrupt or truncated {comp or 'file'}: {e}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (invalid byte at offset {e.start})") from None


# -- items ------------------------------------------------------------------------------


def iter_lines(path: str | Path, sniffed: Sniffed | None = None) -> Iterator[tuple[int, str | ReadError]]:
    """``(line_number, text)`` for every line (blank ones included), streamed.

    Only ``\\n`` ends a line (a stray ``\\r`` inside a line stays); a trailing ``\\r`` is
    dropped. A line that is not valid UTF-8 comes out as a ReadError instead of text.
    """
    s = sniffed or sniff(path)
    if s.encoding == "utf-16":  # rare: decode whole, then split
        for n, line in enumerate(read_text(path).split("\n"), 1):
            yield n, line[:-1] if line.endswith("\r") else line
        return
    f, comp = open_binary(path)
    with f:
        n = 0
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # truncated / corrupt stream
                yield n + 1, ReadError(str(path), n + 1, f"corrupt or truncated {comp or 'file'} after line {n} "
                                       f"({e}); the rest of the file could not be read", item=False)
                return
            n += 1
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            elif raw.endswith(b"\r"):
                raw = raw[:-1]
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, ReadError(str(path), n, f"not UTF-8 (invalid byte at column {e.start + 1})")


def iter_jsonl(path: str | Path, sniffed: Sniffed | None = None) -> Iterator[Item | ReadError]:
    """JSON Lines: one item per non-blank line; a bad line becomes a ReadError."""
    src = str(path)
    loads = json.loads
    for n, line in iter_lines(path, sniffed):
        if isinstance(line, ReadError):
            yield line
            continue
        try:
            yield n, None, loads(line)
        except json.JSONDecodeError as e:
            if not line.strip():
                continue  # blank line: not an item
            yield ReadError(src, n, _jsonl_reason(line, e))


def _jsonl_reason(line: str, e: json.JSONDecodeError) -> str:
    """Say what is wrong with a JSON Lines line in terms a user can act on."""
    if e.msg == "Extra data":
        rest = line[e.pos :].lstrip()
        try:
            json.JSONDecoder().raw_decode(rest)
            glued = True
        except json.JSONDecodeError:
            glued = False
        if glued:
            return (
                f"two JSON values on one line (the second starts at column {e.pos + 1}: a missing newline); "
                "neither was read"
            )
        return f"invalid JSON: extra data after the value at column {e.pos + 1}"
    return f"invalid JSON: {e.msg} (column {e.colno})"


def iter_json_document(path: str | Path, text: str | None = None) -> Iterator[Item | ReadError]:
    """Items of a JSON document: the elements of a top-level array (or one object).

    Elements are decoded one at a time, so a broken array still yields every element
    before the break, and a trailing comma before ``]`` is reported at its exact line
    (with every element read). Arrays concatenated one after another are all read (and
    reported).
    """
    src = str(path)
    if text is None:
        text = read_text(path)
    decoder = json.JSONDecoder()
    ws = _WS.match
    at = _LineCounter(text)
    pos = ws(text, 0).end()
    if pos >= len(text):
        raise DataError(f"{src}: empty file")
    if text[pos] != "[":  # a single JSON document that is not an array: one item
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield ReadError(src, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})")
            return
        yield at(pos), 0, value
        tail = ws(text, end).end()
        if tail < len(text):
            yield ReadError(src, at(tail), "extra data after the JSON document (not read)", item=False)
        return

    index = 0
    first_array = True
    while True:  # one iteration per top-level array (more than one = concatenated arrays)
        if not first_array:
            yield ReadError(
                src, at(pos), "a second JSON array starts here (arrays concatenated); its items are read too", item=False
            )
        first_array = False
        pos = ws(text, pos + 1).end()  # past "["
        if pos < len(text) and text[pos] == "]":
            pos += 1
        else:
            while True:
                try:
                    value, end = decoder.raw_decode(text, pos)
                except json.JSONDecodeError as e:
                    if pos >= len(text):
                        yield ReadError(src, at(pos), "unexpected end of file inside the array", index)
                    else:
                        yield ReadError(
                            src, e.lineno,
                            f"array item {index}: invalid JSON: {e.msg} (column {e.colno}); "
                            "the rest of the file was not read",
                            index,
                        )
                    return
                yield at(pos), index, value
                index += 1
                pos = ws(text, end).end()
                if pos >= len(text):
                    yield ReadError(src, at(pos), "unexpected end of file: the array is not closed with ']'", item=False)
                    return
                c = text[pos]
                if c == "]":
                    pos += 1
                    break
                if c != ",":
                    yield ReadError(
                        src, at(pos),
                        f"invalid JSON: expected ',' or ']' after array item {index - 1}; the rest of the file was not read",
                        item=False,
                    )
                    return
                comma_line = at(pos)
                pos = ws(text, pos + 1).end()
                if pos < len(text) and text[pos] == "]":
                    close_line = at(pos)
                    on = f"line {comma_line}" if comma_line != close_line else "the same line"
                    yield ReadError(
                        src, close_line,
                        f"trailing comma before ']' (the comma is on {on}); all {index} items before it were read",
                        item=False,
                    )
                    pos += 1
                    break
        pos = ws(text, pos).end()
        if pos >= len(text):
            return
        if text[pos] != "[":
            yield ReadError(src, at(pos), "extra data after the closing ']' (not read)", item=False)
            return


class _LineCounter:
    """1-based line of a character offset; offsets must not decrease (O(file) in total)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, pos: int) -> int:
        if pos < self.pos:  # rare (error paths): count from the start
            return 1 + self.text.count("\n", 0, pos)
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def iter_items(path: str | Path, sniffed: Sniffed | None = None) -> Iterator[Item | ReadError]:
    """Items of any JSON layout (see module docstring); for text layouts use iter_lines."""
    s = sniffed or sniff(path)
    if s.layout == "jsonl":
        return iter_jsonl(path, s)
    if s.layout == "json":
        return iter_json_document(path)
    raise DataError(f"{path}: is plain text, not JSON")

"""Robust low-level reading: bytes on disk -> JSON items or text lines, each with its line.

Real data files lie about themselves: ``.jsonl`` files holding one JSON array, ``.json``
files holding JSON Lines, a byte-order mark, CRLF endings, gzip without ``.gz``, a
trailing comma before ``]``, two objects glued on one line. So the layout is decided by
the *content* (:func:`sniff`), never by the extension, and every problem becomes a
:class:`ReadError` naming the file and the 1-based line -- the caller decides whether to
skip it or stop. Only file-level problems (missing, empty, binary, not UTF-8, nothing
parseable) raise :class:`chatforge.errors.DataError`.

Items come out of :func:`iter_items` as ``(line, index, value)`` tuples:

* tables (CSV / TSV, Parquet, Arrow; :mod:`chatforge.data.tabular`): ``value`` is the row
  as a dict, ``line`` its row number, ``index`` None.
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
import csv
import io
import json
import lzma
import os
import re
import stat
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
    row: int | None = None  # tables (CSV, Parquet, Arrow): the row, as chatforge.data.tabular numbers them

    def where(self) -> str:
        if self.row is not None:
            return f"{self.file} row {self.row}"
        at = f"{self.file}:{self.line}" if self.line is not None else self.file
        return at + (f" [item {self.index}]" if self.index is not None else "")

    def __str__(self) -> str:
        return f"{self.where()}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"line": self.line, "reason": self.reason}
        if self.index is not None:
            d["index"] = self.index
        if self.row is not None:
            d["row"] = self.row
        return d


@dataclass
class Sniffed:
    """What the first bytes of a file say about it."""

    path: str
    compression: str | None  # "gzip" | "bz2" | "xz" | None
    encoding: str  # "utf-8" (BOM stripped) or "utf-16"
    layout: str  # "jsonl" | "json" | "text" | "csv" | "parquet" | "arrow" (see chatforge.data.tabular)
    bom: bool = False
    delimiter: str = ""  # csv layout: the field separator
    stamp: tuple = ()  # (size, mtime_ns, inode) when sniffed: a file that changes while read is reported

    @property
    def table(self) -> bool:
        """Rows of a table (CSV, Parquet, Arrow) rather than lines of text or JSON."""
        return self.layout in TABLE_LAYOUTS


TABLE_LAYOUTS = ("csv", "parquet", "arrow")
MAX_LINE_BYTES = 256 << 20  # a longer line is reported and skipped, never held in memory whole
_CHUNK = 1 << 16  # compressed bytes read at a time
_STEP = 1 << 12  # compressed bytes given to the decompressor at a time
_OUT_CHUNK = 1 << 20  # most decompressed bytes made at a time (a zip bomb cannot fill the memory)


# -- opening ----------------------------------------------------------------------------

_MAGIC = [(b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz")]
_UNSUPPORTED_MAGIC = [
    (b"PK\x03\x04", "a zip archive: unzip it first"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it first (zstd -d)"),
    (b"SQLite format 3", "an SQLite database"),
]
_TABLE_MAGIC = [(b"PAR1", "parquet"), (b"ARROW1", "arrow"), (b"\xff\xff\xff\xff", "arrow")]  # file / IPC stream


def check_file(path: str | Path) -> os.stat_result:
    """``stat`` of a regular file, or DataError saying what ``path`` is instead.

    A FIFO or a device is refused before it is opened: opening a FIFO blocks until a writer
    comes, and a stream cannot be read twice (once to detect its format, once to read it).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path}: is a directory, not a data file (nor a datasets.save_to_disk folder)")
    if not stat.S_ISREG(st.st_mode):
        what = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device")
        raise DataError(f"{path}: is {what}, not a regular file; write the data to a file first")
    return st


def stamp(st: os.stat_result) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def changed_error(path: str | Path, sniffed: "Sniffed", at_line: int | None = None) -> "ReadError | None":
    """A ReadError if the file is not the one that was sniffed (appended to, rewritten, replaced)."""
    if not sniffed.stamp:
        return None
    try:
        now = stamp(os.stat(path))
    except OSError:
        now = ()
    if now == sniffed.stamp:
        return None
    was = sniffed.stamp[0]
    size = f"{was} -> {now[0]} bytes" if now else "it is gone"
    return ReadError(str(path), at_line, f"the file changed while it was read ({size}): records may be missing, "
                     "cut or read twice; read a copy that nothing writes to", item=False)


class _Decompressed(io.RawIOBase):
    """A gzip / bz2 / xz file as a byte stream that keeps every byte before a cut or a corrupt spot.

    The stdlib's file objects raise at a truncated end and lose what they decompressed in
    that read; this one ends the stream there instead and says why in ``problem`` (the line
    readers report it). Concatenated members (``cat a.gz b.gz``) are read one after another.
    """

    def __init__(self, f: IO[bytes], comp: str):
        super().__init__()
        self.f, self.comp = f, comp
        self.d = self._new()
        self.problem: str | None = None
        self.buf, self.off = b"", 0
        self.done = False
        self.pushback = b""

    def _new(self) -> Any:
        if self.comp == "gzip":
            return zlib.decompressobj(wbits=31)
        return bz2.BZ2Decompressor() if self.comp == "bz2" else lzma.LZMADecompressor()

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.f.close()
        super().close()

    def readinto(self, b: Any) -> int:
        while self.off >= len(self.buf) and not self.done:
            self.buf, self.off = self._fill(), 0
        n = min(len(b), len(self.buf) - self.off)
        b[:n] = self.buf[self.off : self.off + n]
        self.off += n
        return n

    def _input(self) -> bytes:
        """The next few KiB of compressed input: small steps, so a corrupt spot (which the
        decompressor reports with no output for that step) loses at most one step's text."""
        if not self.pushback:
            self.pushback = self.f.read(_CHUNK)
        data, self.pushback = self.pushback[:_STEP], self.pushback[_STEP:]
        return data

    def _fill(self) -> bytes:
        d = self.d
        if self.comp == "gzip":
            src = d.unconsumed_tail or self._input()
        else:
            src = self._input() if d.needs_input else b""
        if not src and (self.comp == "gzip" or d.needs_input):
            self.done = True
            if not getattr(d, "eof", False):
                self.problem = f"truncated {self.comp} stream: the file ends before the compressed data does"
            return b""
        try:
            out = d.decompress(src, _OUT_CHUNK)
        except (zlib.error, OSError, EOFError, lzma.LZMAError) as e:
            self.done, self.problem = True, f"corrupt {self.comp} stream ({e})"
            return b""
        if d.eof:
            rest = d.unused_data or self._input()
            if rest and rest.strip(b"\x00"):
                if self.comp == "gzip" and not rest.startswith(b"\x1f\x8b") or \
                        self.comp == "bz2" and not rest.startswith(b"BZh") or \
                        self.comp == "xz" and not rest.startswith(b"\xfd7zXZ"):
                    self.done, self.problem = True, f"data after the end of the {self.comp} stream (not read)"
                else:
                    self.d, self.pushback = self._new(), rest
            else:
                self.done = True
        return out


def stream_problem(f: IO[bytes]) -> str | None:
    """Why a stream from :func:`open_binary` ended early (truncated / corrupt), or None."""
    return getattr(getattr(f, "raw", None), "problem", None)


def open_binary(path: str | Path) -> tuple[IO[bytes], str | None]:
    """Open ``path`` for reading bytes, transparently decompressing by magic bytes."""
    check_file(path)
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    for magic, what in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            raise DataError(f"{path}: is {what}")
    for magic, comp in _MAGIC:
        if head.startswith(magic):
            return io.BufferedReader(_Decompressed(open(p, "rb"), comp), _CHUNK), comp
    return open(p, "rb"), None


def _read_head(path: str | Path) -> tuple[bytes, str | None, bool]:
    """First SNIFF_BYTES decompressed bytes, the compression, and whether that was all."""
    f, comp = open_binary(path)
    with f:
        head = f.read(SNIFF_BYTES)
        complete = not f.read(1)
        problem = stream_problem(f)
    if problem and not head:
        block = " (bz2 decompresses whole blocks of up to 900 kB: a cut block gives nothing)" if comp == "bz2" else ""
        raise DataError(f"{path}: {problem}; nothing could be read{block}")
    return head, comp, complete


def _table_layout(path: str | Path) -> str | None:
    """``parquet`` / ``arrow`` by magic bytes (uncompressed files only: both compress inside)."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, layout in _TABLE_MAGIC:
        if head.startswith(magic):
            return layout
    return None


# -- which files are tables (read by chatforge.data.tabular) ------------------------------

_DELIMITERS = (",", "\t", ";", "|")
_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_COMPRESSED = (".gz", ".gzip", ".bz2", ".xz")
_COLUMN_NAME = re.compile(r"^[A-Za-z_][\w .\-]{0,63}$")
SNIFF_ROWS = 20


def _suffix(path: str | Path) -> str:
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def sniff_delimiter(path: str | Path, head: str) -> str:
    """The field separator if ``head`` (the first decoded bytes of a non-JSON file) is a table, else ''.

    By name: ``.csv`` is comma-separated unless its header says ``;`` / tab / ``|``, ``.tsv``
    and ``.tab`` are tab-separated. By content: the first lines must parse (quotes honoured) into
    rows of one and the same width >= 2 under a header whose cells all look like column names
    (``instruction``, ``output 1``; no sentences), with at least one data row.
    """
    by_name = _SUFFIXES.get(_suffix(path))
    if by_name == "\t":
        return by_name
    found = _table_delimiter(head)
    if by_name:
        return found or by_name
    return found


def _table_delimiter(head: str) -> str:
    complete = head[: head.rfind("\n") + 1] if "\n" in head else ""
    best, width = "", 1
    for d in _DELIMITERS:
        if d not in complete.split("\n", 1)[0]:
            continue
        try:
            rows = [r for r in csv.reader(io.StringIO(complete), delimiter=d) if r][:SNIFF_ROWS]
        except csv.Error:
            continue
        if len(rows) < 2:
            continue
        header = [c.strip().lstrip("\ufeff") for c in rows[0]]
        if len(header) <= width or not all(_COLUMN_NAME.match(c) for c in header):
            continue
        if all(len(r) == len(header) for r in rows):
            best, width = d, len(header)
    return best


def dataset_dir_layout(path: str | Path) -> str:
    """``arrow`` for a ``datasets.save_to_disk`` folder; DataError for any other folder."""
    p = Path(path)
    if (p / "dataset_dict.json").is_file():
        try:
            splits = json.loads((p / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        except (OSError, ValueError, AttributeError):
            splits = []
        where = ", ".join(str(p / s) for s in splits) or "one of its split folders"
        raise DataError(f"{path}: is a datasets DatasetDict folder (splits: {', '.join(splits) or '?'}); "
                        f"pass one split: {where}")
    if (p / "state.json").is_file() or sorted(p.glob("*.arrow")):
        return "arrow"
    raise DataError(f"{path}: is a directory, not a data file (nor a datasets.save_to_disk folder)")


def sniff(path: str | Path) -> Sniffed:
    """Decide compression, encoding and layout by content (tables: see chatforge.data.tabular)."""
    if Path(path).is_dir():
        return Sniffed(str(path), None, "utf-8", dataset_dir_layout(path))
    st = stamp(check_file(path))
    table = _table_layout(path)
    if table:
        return Sniffed(str(path), None, "utf-8", table, stamp=st)
    head, comp, complete = _read_head(path)
    encoding, bom = "utf-8", False
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding, bom = "utf-16", True
        text = head.decode("utf-16", errors="ignore")
    else:
        if head.startswith(b"\xef\xbb\xbf"):
            head, bom = head[3:], True
        if _NUL in head[:8192]:
            raise DataError(f"{path}: binary file (NUL bytes in the first 8 KiB); expected JSON, JSON Lines, CSV or text")
        text = _decode_head(path, head, complete)
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: empty file" + (" (only whitespace)" if text else ""))
    layout = _layout(stripped, complete, path)
    delimiter = ""
    if layout == "text":
        delimiter = sniff_delimiter(path, text)
        if delimiter:
            layout = "csv"
    return Sniffed(str(path), comp, encoding, layout, bom, delimiter, st)


def _decode_head(path: str | Path, head: bytes, complete: bool) -> str:
    """The sniffed head as text. A few lines in another encoding (a mixed file) are let
    through -- the line readers report each of them -- but a file whose first line or at
    least half of whose lines are not UTF-8 is refused as a whole."""
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as e:
        if not complete and e.start >= len(head) - 4:  # just a character cut at the chunk end
            return head[: e.start].decode("utf-8")
        first = e
    lines = head.split(b"\n")
    if not complete:
        lines = lines[:-1] or lines
    lines = [raw for raw in lines if raw.strip()]
    bad = 0
    for raw in lines:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
    line = head[: first.start].count(b"\n") + 1
    if line == 1 or bad * 2 >= len(lines):
        raise DataError(
            f"{path}:{line}: not UTF-8 text (invalid byte 0x{head[first.start]:02x} at offset {first.start}); "
            "convert it to UTF-8 first (e.g. iconv)"
        ) from None
    return head.decode("utf-8", errors="replace")


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
    except (json.JSONDecodeError, RecursionError):
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
    except (json.JSONDecodeError, RecursionError):
        return "jsonl"


def read_text(path: str | Path) -> str:
    """The whole file as text (decompressed, BOM stripped); DataError if not UTF-8.

    A truncated or corrupt compressed stream gives the text before the cut (see
    :func:`read_text_checked` for the reason)."""
    return read_text_checked(path)[0]


def read_text_checked(path: str | Path) -> tuple[str, str | None]:
    """The whole file as text and why the compressed stream ended early (None: it did not)."""
    f, comp = open_binary(path)
    with f:
        data = f.read()
        problem = stream_problem(f)
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16"), problem
    try:
        return data.decode("utf-8-sig"), problem
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (invalid byte at offset {e.start})") from None


# -- items ------------------------------------------------------------------------------


def iter_lines(path: str | Path, sniffed: Sniffed | None = None) -> Iterator[tuple[int, str | ReadError]]:
    """``(line_number, text)`` for every line (blank ones included), streamed.

    Only ``\\n`` ends a line (a stray ``\\r`` inside a line stays); a trailing ``\\r`` is
    dropped. A line that is not valid UTF-8, or longer than :data:`MAX_LINE_BYTES`, comes out
    as a ReadError instead of text. A compressed stream that is cut or corrupt gives every
    line before the damage, then one ReadError (``item=False``) at the first line not read;
    a file that changed while it was read ends with one too.
    """
    s = sniffed or sniff(path)
    if s.encoding == "utf-16":  # rare: decode whole, then split
        text, problem = read_text_checked(path)
        parts = text.split("\n")
        for n, line in enumerate(parts, 1):
            yield n, line[:-1] if line.endswith("\r") else line
        if problem:
            yield len(parts), ReadError(str(path), len(parts), f"{problem}; line {len(parts)} and the rest are lost",
                                        item=False)
        return
    src = str(path)
    limit = MAX_LINE_BYTES
    f, comp = open_binary(path)
    with f:
        n = 0
        readline = f.readline
        while True:
            raw = readline(limit)
            if not raw:
                break
            n += 1
            if len(raw) >= limit and not raw.endswith(b"\n"):
                while (more := readline(_OUT_CHUNK)) and not more.endswith(b"\n"):
                    pass
                yield n, ReadError(src, n, f"line longer than {limit >> 20} MiB (not read)")
                continue
            if not raw.endswith(b"\n") and stream_problem(f):  # the line the stream was cut in
                yield n, ReadError(src, n, f"{stream_problem(f)}: line {n} is cut off; the {n - 1} lines before it "
                                   "were read, the rest of the file could not be", item=False)
                return
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            elif raw.endswith(b"\r"):
                raw = raw[:-1]
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, ReadError(src, n, f"not UTF-8 (invalid byte at column {e.start + 1}): another encoding?")
        problem = stream_problem(f)
    if problem:
        yield n + 1, ReadError(src, n + 1, f"{problem} after line {n}; the rest of the file could not be read "
                               "(corrupt or truncated)", item=False)
    changed = changed_error(path, s, n)
    if changed is not None:
        yield n, changed


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
        except RecursionError:
            yield ReadError(src, n, NESTED_TOO_DEEP)


NESTED_TOO_DEEP = "JSON nested too deeply to read (thousands of levels of [ or {): not a data record"


def _jsonl_reason(line: str, e: json.JSONDecodeError) -> str:
    """Say what is wrong with a JSON Lines line in terms a user can act on."""
    if e.msg == "Extra data":
        rest = line[e.pos :].lstrip()
        try:
            json.JSONDecoder().raw_decode(rest)
            glued = True
        except (json.JSONDecodeError, RecursionError):
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
    problem = None
    if text is None:
        stamp_before = stamp(check_file(path))
        text, problem = read_text_checked(path)
        changed = changed_error(path, Sniffed(str(path), None, "utf-8", "json", stamp=stamp_before))
    else:
        changed = None
    last = 1
    for x in _document_items(str(path), text):
        last = x.line if isinstance(x, ReadError) else x[0]
        yield x
    if problem:
        yield ReadError(str(path), last, f"{problem}: the items before the cut were read, the rest is lost", item=False)
    if changed is not None:
        yield changed


def _document_items(src: str, text: str) -> Iterator[Item | ReadError]:
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
        except RecursionError:
            yield ReadError(src, at(pos), NESTED_TOO_DEEP)
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
                except RecursionError:
                    yield ReadError(src, at(pos), f"array item {index}: {NESTED_TOO_DEEP}; the rest of the file "
                                    "was not read", index)
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
    if s.table:
        raise DataError(f"{path}: is a {s.layout} table; read its rows with chatforge.data.tabular.iter_rows")
    raise DataError(f"{path}: is plain text, not JSON")

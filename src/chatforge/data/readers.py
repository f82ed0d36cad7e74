"""Read any supported data file into canonical records, detecting its format by content.

    result = read_file("data.jsonl")            # ReadResult(format, kind, records, errors, n_items)
    for x in iter_file("big.jsonl"):            # streamed: Record or ReadError, in file order
        ...

How a file is read:

1. :func:`chatforge.data.io.sniff` decides the layout from the bytes (JSON Lines, a JSON
   document, text, or a table: CSV/TSV, Parquet, Arrow -- :mod:`chatforge.data.tabular`;
   gzip/bz2/xz, BOM, binary and empty files handled there). Table rows are items like
   JSON objects; their records carry ``meta.row`` instead of ``meta.line``.
2. The first items (or lines, for text) are scored by every adapter in
   :data:`chatforge.data.formats.FORMATS`; the highest total wins (``format=`` forces one).
   Nothing scoring -> :class:`DataError` listing the formats tried.
3. Every item goes through the adapter. An item that cannot be converted becomes a
   :class:`ReadError` (file, line, reason) -- with ``on_error="fail"`` the first one
   raises :class:`DataError` instead. Records + errors account for every item: nothing is
   dropped silently.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

from chatforge.data.formats import BY_NAME, FORMATS, Bad, Format
from chatforge.data.formats.base import describe
from chatforge.data.io import ReadError, iter_items, iter_lines, sniff
from chatforge.data.records import Record, RecordError
from chatforge.data.tabular import iter_rows
from chatforge.errors import DataError

SAMPLE_ITEMS = 64  # parsed items scored for detection
SAMPLE_SCAN = 2000  # at most this many items/errors are looked at to find them
SAMPLE_LINES = 200  # lines scored for text formats
ON_ERROR = ("skip", "fail")


def format_names() -> list[str]:
    return [f.name for f in FORMATS if not f.unsupported]


@dataclass
class ReadResult:
    format: str
    kind: str
    records: list[Record] = field(default_factory=list)
    errors: list[ReadError] = field(default_factory=list)
    n_items: int = 0  # items seen in the file (records come from them, or an error does)
    file: str = ""


class FileStream:
    """One file, detected on construction, streamed on iteration.

    Iterating yields ``Record`` and ``ReadError`` objects in file order; counters
    (``n_items``, ``n_records``, ``n_errors``, ``kinds``) are up to date as it goes.
    Construction raises :class:`DataError` for file-level problems (missing, empty,
    binary, unknown or unsupported format).
    """

    def __init__(self, path: str | Path, format: str | None = None, on_error: str = "skip"):
        if on_error not in ON_ERROR:
            raise DataError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        self.path = str(path)
        self.on_error = on_error
        self.sniffed = sniff(path)
        self.n_items = self.n_records = self.n_errors = 0
        self.kinds: set[str] = set()
        self.scores: dict[str, float] = {}
        if format is not None and format not in BY_NAME:
            raise DataError(f"unknown format {format!r}; known formats: {', '.join(format_names())}")
        forced = BY_NAME[format] if format else None
        if forced is not None and forced.unsupported:
            raise DataError(f"{self.path}: format {forced.name} cannot be read: {forced.unsupported}")
        if forced is not None and not forced.text and self.sniffed.layout == "text":
            raise DataError(f"{self.path}: format {forced.name} reads JSON, but the file is plain text")
        if forced is not None and forced.text and self.sniffed.table:
            raise DataError(f"{self.path}: format {forced.name} reads text lines, but the file is a "
                            f"{self.sniffed.layout} table (its rows are read as records)")
        if self.sniffed.layout == "text" or (forced is not None and forced.text):
            self._init_text(forced)
        else:
            self._init_json(forced)

    # -- detection ---------------------------------------------------------------------
    def _init_json(self, forced: Format | None) -> None:
        items = iter_rows(self.path, self.sniffed) if self.sniffed.table else iter_items(self.path, self.sniffed)
        buf: list[Any] = []
        sample: list[Any] = []
        for x in items:
            buf.append(x)
            if not isinstance(x, ReadError):
                sample.append(x[2])
            if len(sample) >= SAMPLE_ITEMS or len(buf) >= SAMPLE_SCAN:
                break
        self._items = itertools.chain(buf, items)
        if forced is not None:
            self.format = forced
            return
        if not sample:
            first = next((x for x in buf if isinstance(x, ReadError)), None)
            raise DataError(f"{self.path}: none of the first {len(buf)} items is valid JSON (first error: {first})")
        self.format = self._pick([f for f in FORMATS if not f.text], sample, per_item=True)
        if self.format.unsupported:
            n = sum(1 for x in self._items if not isinstance(x, ReadError))
            raise DataError(f"{self.path}: recognised as {self.format.name} ({n} items), which cannot be read: "
                            f"{self.format.unsupported}")

    def _init_text(self, forced: Format | None) -> None:
        lines = iter_lines(self.path, self.sniffed)
        buf = list(itertools.islice(lines, SAMPLE_LINES))
        self._lines = itertools.chain(buf, lines)
        if forced is not None:
            self.format = forced
            return
        sample = [t for _, t in buf if isinstance(t, str)]
        self.format = self._pick([f for f in FORMATS if f.text], sample, per_item=False)

    def _pick(self, candidates: list[Format], sample: list, per_item: bool) -> Format:
        """JSON: every sampled item votes for its best-scoring format (the earlier one on
        ties), so a specific format beats a generic one that matches the same items; the
        most votes win. Text: each format scores the sample of lines as a whole."""
        votes = dict.fromkeys((f.name for f in candidates), 0.0)
        for v in sample if per_item else [sample]:
            best, best_score = None, 0.0
            for f in candidates:
                try:
                    s = f.detect(v)
                except Exception:  # a detector must never crash detection; it just does not match
                    s = 0.0
                if s > best_score:
                    best, best_score = f, s
                if not per_item:
                    votes[f.name] = s
            if per_item and best is not None:
                votes[best.name] += 1
        self.scores = votes
        best = max(candidates, key=lambda f: votes[f.name])  # max keeps the first on ties
        if votes[best.name] <= 0:
            tried = ", ".join(f.name for f in candidates)
            item = "row" if self.sniffed.table else "item"
            what = f"the first {item} is {describe(sample[0])}" if per_item else "the first lines match none of them"
            raise DataError(
                f"{self.path}: unknown format ({self.sniffed.layout}); tried {tried}; {what}. "
                "Use --format to force one."
            )
        return best

    @property
    def kind(self) -> str:
        """The record kind (for mixed canonical files: the kind seen, or "mixed")."""
        if self.format.kind != "mixed":
            return self.format.kind
        if len(self.kinds) == 1:
            return next(iter(self.kinds))
        return "mixed" if self.kinds else "none"

    # -- reading -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Union[Record, ReadError]]:
        source = self.format.convert(self._lines, self.path) if self.format.text else self._convert_items()
        for x in source:
            if isinstance(x, ReadError):
                if self.format.text and x.item:
                    self.n_items += 1
                self.n_errors += 1
                if self.on_error == "fail":
                    raise DataError(str(x))
                yield x
                continue
            if self.format.text:
                self.n_items += 1
                try:
                    x.validate()
                except RecordError as e:
                    x = ReadError(self.path, x.meta.get("line"), str(e))
                    self.n_errors += 1
                    if self.on_error == "fail":
                        raise DataError(str(x)) from None
                    yield x
                    continue
            self.n_records += 1
            self.kinds.add(x.kind)
            yield x

    def _convert_items(self) -> Iterator[Union[Record, ReadError]]:
        """JSON items -> records; errors carry the item's line (and array index)."""
        path, convert = self.path, self.format.convert
        where = "row" if self.sniffed.table else "line"
        for x in self._items:
            if isinstance(x, ReadError):
                if x.item:  # a line that is not JSON: an item lost
                    self.n_items += 1
                yield x
                continue
            line, index, value = x
            self.n_items += 1
            meta: dict[str, Any] = {"source": path, where: line}
            if index is not None:
                meta["index"] = index
            try:
                out = convert(value, meta)
                if not isinstance(out, list):
                    yield out.validate()
                    continue
            except (Bad, RecordError) as e:
                yield _item_error(path, line, index, str(e), where)
                continue
            except RecursionError:  # a converter walking a pathologically nested value
                yield _item_error(path, line, index, "nested too deeply to convert", where)
                continue
            for r in out:  # one item -> several records (self-instruct instances)
                if isinstance(r, Bad):
                    yield _item_error(path, line, index, str(r), where)
                    continue
                try:
                    yield r.validate()
                except RecordError as e:
                    yield _item_error(path, line, index, str(e), where)


def _item_error(path: str, line: int, index: int | None, reason: str, where: str = "line") -> ReadError:
    if where == "row":
        return ReadError(path, None, reason, row=line)
    return ReadError(path, line, reason, index)


def iter_file(path: str | Path, format: str | None = None, on_error: str = "skip") -> FileStream:
    """Stream one file: iterate the result for ``Record`` / ``ReadError`` objects."""
    return FileStream(path, format, on_error)


def read_file(path: str | Path, format: str | None = None, on_error: str = "skip") -> ReadResult:
    """Read one whole file into memory (see :func:`iter_file` to stream)."""
    stream = FileStream(path, format, on_error)
    res = ReadResult(stream.format.name, stream.format.kind, file=stream.path)
    for x in stream:
        (res.errors if isinstance(x, ReadError) else res.records).append(x)
    res.kind = stream.kind
    res.n_items = stream.n_items
    return res


def read_files(paths: Iterable[str | Path], format: str | None = None, on_error: str = "skip") -> list[ReadResult]:
    return [read_file(p, format, on_error) for p in paths]


def iter_records(paths: Iterable[str | Path], format: str | None = None, on_error: str = "skip",
                 errors: list[ReadError] | None = None) -> Iterator[Record]:
    """Records of several files in order; errors are appended to ``errors`` if given."""
    for p in paths:
        for x in FileStream(p, format, on_error):
            if isinstance(x, ReadError):
                if errors is not None:
                    errors.append(x)
            else:
                yield x

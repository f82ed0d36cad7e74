"""Tables as data files: CSV / TSV, Parquet, Arrow -- rows in, the same items JSON gives.

The Hugging Face hub serves datasets as Parquet, ``datasets`` keeps them as Arrow (a
``save_to_disk`` folder, or single ``.arrow`` files in its cache), and spreadsheets export
CSV. Each row becomes a dict of its columns -- exactly what a JSON Lines line gives -- so
the format adapters (``instruction,input,output`` -> alpaca, a ``messages`` column ->
openai-messages, ...) detect and convert rows without knowing where they came from.

Read through the libraries made for them: ``pyarrow.parquet`` (row groups, in batches),
``pyarrow.ipc`` (memory-mapped; the Arrow *file* and *stream* formats -- ``datasets`` writes
the stream one) and ``pyarrow.csv`` (streamed in blocks; compressed CSV is decompressed by
:func:`chatforge.data.io.open_binary`). Every cell of a CSV is read as text, never
type-inferred: an answer "007" stays "007", an empty cell stays "", and ``NA`` is a string.

Rows are numbered from 1. In a CSV the header is row 1 -- the number a spreadsheet shows
-- so the first data row is row 2; in Parquet and Arrow the first row is row 1. A row that
cannot be read (wrong number of fields, a cell that is not UTF-8) is a ReadError naming
the file and its row; damage that stops the reader (a corrupt block, a truncated file)
is one ReadError (``item=False``) at the first row not read. Nested columns (a list of
message structs) arrive as lists of dicts, with None for a struct field a row does not
have; the message adapters drop those.

When is a file a CSV? A ``.csv`` / ``.tsv`` / ``.tab`` name (also under ``.gz`` etc.) that
does not hold JSON, or text whose first lines parse as a table with a header of column
names (:func:`chatforge.data.io.sniff_delimiter`). Such a file is never read as text lines.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from chatforge.data.io import ReadError, Sniffed, changed_error, open_binary, stream_problem
from chatforge.errors import DataError

BATCH_ROWS = 1024  # rows converted to Python at a time
CSV_BLOCK_BYTES = 32 << 20  # pyarrow reads CSV in blocks; one row may not be longer than this


# -- rows ----------------------------------------------------------------------------------

def iter_rows(path: str | Path, sniffed: Sniffed) -> Iterator[tuple[int, None, dict] | ReadError]:
    """``(row, None, row_dict)`` for every row of a table, then any damage as a ReadError."""
    readers = {"csv": _csv_rows, "parquet": _parquet_rows, "arrow": _arrow_rows}
    yield from readers[sniffed.layout](str(path), sniffed)
    changed = changed_error(path, sniffed) if not Path(path).is_dir() else None
    if changed is not None:
        yield changed


def _batches_to_rows(src: str, batches: Iterator[Any], first_row: int, what: str) -> Iterator:
    """Rows of record batches; an error while reading ends the table with one ReadError."""
    import pyarrow as pa

    row = first_row
    try:
        for batch in batches:
            for value in batch.to_pylist():
                yield row, None, value
                row += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        yield ReadError(src, None, f"{what} is damaged from row {row} on ({_short(e)}); rows {first_row}-{row - 1} "
                        "were read, the rest could not be", item=False, row=row)


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _parquet_rows(src: str, sniffed: Sniffed) -> Iterator:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(src, memory_map=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{src}: not a readable Parquet file ({_short(e)})") from None
    yield from _batches_to_rows(src, f.iter_batches(batch_size=BATCH_ROWS), 1, "the Parquet file")


def _arrow_files(src: str) -> list[Path]:
    p = Path(src)
    if not p.is_dir():
        return [p]
    state = p / "state.json"
    if state.is_file():
        try:
            files = [p / d["filename"] for d in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{state}: not a datasets state file ({_short(e)})") from None
    else:
        files = sorted(p.glob("*.arrow"))
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{src}: the dataset folder lacks {missing[0].name}")
    if not files:
        raise DataError(f"{src}: the dataset folder holds no .arrow file")
    return files


def _arrow_batches(path: Path) -> Iterator[Any]:
    """Record batches of one Arrow file, in the *file* (``ARROW1``) or *stream* format."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        if source.read(6) == b"ARROW1":
            source.seek(0)
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            source.seek(0)
            yield from pa.ipc.open_stream(source)
    finally:
        source.close()


def _arrow_rows(src: str, sniffed: Sniffed) -> Iterator:
    import pyarrow as pa

    row = 1
    for path in _arrow_files(src):
        where = str(path)
        try:
            batches = _arrow_batches(path)
            first = next(batches, None)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"{where}: not a readable Arrow file ({_short(e)})") from None
        if first is None:
            continue

        def again(first=first, batches=batches):
            yield first
            yield from batches

        for x in _batches_to_rows(src, again(), row, f"Arrow file {path.name}"):
            if isinstance(x, ReadError):
                yield x
                return
            row = x[0] + 1
            yield x


def _csv_header(src: str, sniffed: Sniffed) -> list[str]:
    f, _ = open_binary(src)
    with f:
        head = f.read(CSV_BLOCK_BYTES)
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    try:
        header = next(csv.reader(io.StringIO(text), delimiter=sniffed.delimiter), None)
    except csv.Error as e:
        raise DataError(f"{src}:1: the CSV header cannot be parsed ({e})") from None
    if not header:
        raise DataError(f"{src}: empty CSV (no header row)")
    dup = {c for c in header if header.count(c) > 1}
    if dup:
        raise DataError(f"{src}:1: the CSV header names column {sorted(dup)[0]!r} twice")
    return header


def _csv_rows(src: str, sniffed: Sniffed) -> Iterator:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    header = _csv_header(src, sniffed)
    bad: dict[int, str] = {}  # row -> reason, from pyarrow's handler (called before the batch it skips from)

    def invalid(row: Any) -> str:
        n = row.number if row.number is not None else -(len(bad) + 1)
        bad[n] = f"{row.actual_columns} fields, the header has {row.expected_columns}: {row.text[:80]!r}"
        return "skip"

    f, _ = open_binary(src)
    try:
        reader = pcsv.open_csv(
            f,
            read_options=pcsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
            parse_options=pcsv.ParseOptions(delimiter=sniffed.delimiter, newlines_in_values=True,
                                            invalid_row_handler=invalid),
            convert_options=pcsv.ConvertOptions(column_types={c: pa.binary() for c in header},
                                                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except (pa.ArrowException, OSError, ValueError) as e:
        f.close()
        raise DataError(f"{src}: not a readable CSV file ({_short(e)})") from None
    row = 2  # the header is row 1
    with f:
        try:
            for batch in reader:
                for values in batch.to_pylist():
                    while row in bad:
                        yield ReadError(src, None, bad.pop(row), row=row)
                        row += 1
                    yield _decoded(src, row, values)
                    row += 1
        except (pa.ArrowException, OSError, ValueError) as e:
            yield ReadError(src, None, f"CSV damaged at row {row} or soon after ({_short(e)}); the rows before it "
                            "were read, the rest could not be", item=False, row=row)
            return
        for n in sorted(bad):
            yield ReadError(src, None, bad[n], row=n if n > 0 else None)
        problem = stream_problem(f)
    if problem:
        yield ReadError(src, None, f"{problem}: the rows before row {row} were read, the rest is lost",
                        item=False, row=row)


def _decoded(src: str, row: int, values: dict[str, bytes]) -> tuple[int, None, dict] | ReadError:
    out: dict[str, str] = {}
    for k, v in values.items():
        try:
            out[k] = v.decode("utf-8")
        except UnicodeDecodeError as e:
            return ReadError(src, None, f"column {k!r} is not UTF-8 (invalid byte at offset {e.start}): another "
                             "encoding?", row=row)
    return row, None, out

"""Hostile input never gives a traceback: every fixture is generated here, each kind of damage
gets a clear error naming the file (and line / row), and nothing readable is lost."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import random
import threading

import pytest

import chatforge.data.io as io_mod
from chatforge.cli import main
from chatforge.data.io import ReadError, iter_items, sniff
from chatforge.data.readers import iter_file, read_file
from chatforge.errors import DataError

_RND = random.Random(0)
ROWS = [{"instruction": f"Say {i}", "output": f"{i} {_RND.getrandbits(160):040x}"} for i in range(3000)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


def test_deeply_nested_jsonl_line_is_a_line_error(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_bytes(JSONL[:200].rsplit(b"\n", 1)[0] + b"\n" + b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
                  + json.dumps(ROWS[0]).encode() + b"\n")
    res = read_file(p)
    (err,) = res.errors
    assert "nested too deeply" in err.reason and err.line == 3 and len(res.records) == 3


def test_deeply_nested_json_document_is_an_error_not_a_recursion_error(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError, match="none of the first 1 items"):  # nothing else in the file
        read_file(p)
    q = tmp_path / "deep2.json"
    q.write_text("[" + json.dumps(ROWS[0]) + ", " + "[" * 200_000 + "]" * 200_000 + "]")
    res = read_file(q)
    assert len(res.records) == 1 and "nested too deeply" in res.errors[0].reason


def test_enormous_line_is_skipped_without_holding_it(tmp_path, monkeypatch):
    monkeypatch.setattr(io_mod, "MAX_LINE_BYTES", 1 << 20)
    p = tmp_path / "huge.jsonl"
    head = JSONL[:500].rsplit(b"\n", 1)[0] + b"\n"
    k = head.count(b"\n")
    with open(p, "wb") as f:
        f.write(head)
        f.write(b'{"instruction": "' + b"y" * (5 << 20) + b'", "output": "z"}\n')
        f.write(json.dumps(ROWS[1]).encode() + b"\n")
    res = read_file(p)
    (err,) = res.errors
    assert "longer than 1 MiB" in err.reason and err.line == k + 1 and len(res.records) == k + 1


# bz2 decompresses whole blocks (compresslevel 1: 100 kB): the text of the cut block is lost
@pytest.mark.parametrize("compress,name", [(gzip.compress, "gzip"), (lambda b: bz2.compress(b, 1), "bz2"),
                                           (lzma.compress, "xz")])
def test_truncated_compressed_stream_keeps_every_record_before_the_cut(tmp_path, compress, name):
    blob = compress(JSONL)
    p = tmp_path / "cut.jsonl.z"
    p.write_bytes(blob[: len(blob) * 2 // 3])
    xs = list(iter_items(p))
    errs = [x for x in xs if isinstance(x, ReadError)]
    n = len(xs) - len(errs)
    assert len(errs) == 1 and not errs[0].item and f"truncated {name} stream" in errs[0].reason
    assert errs[0].line == n + 1 and 0 < n < len(ROWS)
    assert [x[2] for x in xs[:n]] == ROWS[:n]  # every complete line before the cut


def test_small_truncated_gzip_is_not_refused_whole(tmp_path):
    blob = gzip.compress(JSONL[:2000])  # the whole file fits in the sniffed head
    p = tmp_path / "small.jsonl.gz"
    p.write_bytes(blob[:-12])
    res = read_file(p)
    assert len(res.records) >= 20 and "truncated gzip" in res.errors[-1].reason


def test_truncated_gzip_json_document_keeps_the_items_before(tmp_path):
    blob = gzip.compress(json.dumps(ROWS, indent=1).encode())
    p = tmp_path / "cut.json.gz"
    p.write_bytes(blob[: len(blob) // 2])
    res = read_file(p)
    assert 0 < len(res.records) < len(ROWS)
    assert any("truncated gzip stream" in e.reason for e in res.errors)


def test_corrupt_gzip_in_the_middle_is_reported(tmp_path):
    blob = bytearray(gzip.compress(JSONL))
    blob[len(blob) // 2] ^= 0xFF
    p = tmp_path / "flip.jsonl.gz"
    p.write_bytes(bytes(blob))
    res = read_file(p)
    assert res.errors and ("corrupt gzip" in res.errors[-1].reason or "invalid JSON" in res.errors[0].reason)
    assert 0 < len(res.records) < len(ROWS)


def test_mixed_encodings_keep_the_utf8_lines(tmp_path):
    p = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in ROWS[:10]]
    lines[4] = '{"instruction": "café", "output": "crème"}'.encode("latin-1")
    lines[7] = '{"instruction": "日本", "output": "x"}'.encode("shift_jis")
    p.write_bytes(b"\n".join(lines) + b"\n")
    res = read_file(p)
    assert len(res.records) == 8 and [e.line for e in res.errors] == [5, 8]
    assert all("not UTF-8" in e.reason for e in res.errors)


def test_a_file_mostly_in_another_encoding_is_refused_with_the_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes("".join(json.dumps({"instruction": "café", "output": "é"}, ensure_ascii=False) + "\n"
                          for _ in range(5)).encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl:1: not UTF-8 text"):
        sniff(p)


def test_a_plain_directory_and_a_fifo_are_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        read_file(tmp_path / "d")
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(DataError, read_file, fifo)))
    t.start()
    t.join(10)
    assert done, "reading a FIFO blocked"
    assert "FIFO" in str(done[0].value)


def test_a_file_that_changes_while_read_is_reported(tmp_path):
    p = tmp_path / "grow.jsonl"
    p.write_bytes(JSONL)
    stream = iter_file(p)
    it = iter(stream)
    first = [next(it) for _ in range(5)]
    with open(p, "ab") as f:
        f.write(JSONL[:1000])
    rest = list(it)
    errs = [x for x in rest if isinstance(x, ReadError)]
    assert len(first) == 5 and errs and "changed while it was read" in errs[-1].reason and not errs[-1].item


def test_the_cli_prints_one_line_for_each_hostile_file(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    assert main(["data", "inspect", str(fifo), str(deep)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "FIFO" in err and str(deep) in err

"""CSV / TSV, Parquet and Arrow inputs: detection by content, rows as items, errors by row."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.cli import main
from chatforge.data.io import sniff
from chatforge.data.readers import read_file
from chatforge.errors import DataError

ALPACA = [{"instruction": "Say hi", "input": "", "output": "Hi!"},
          {"instruction": "Add", "input": "1 2", "output": "007"}]


def texts(res):
    return [[m["content"] for m in r.messages] for r in res.records]


def test_csv_with_alpaca_columns_is_read_as_alpaca_not_as_lines(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('instruction,input,output\nSay hi,,Hi!\n"Two\nlines",x,"007"\n', encoding="utf-8")
    res = read_file(p)
    assert res.format == "alpaca" and not res.errors
    assert texts(res) == [["Say hi", "Hi!"], ["Two\nlines\n\nx", "007"]]  # "007" not type-inferred to 7
    assert [r.meta["row"] for r in res.records] == [2, 3]  # the header is row 1


def test_a_bad_csv_row_is_named_by_row_and_the_rest_is_read(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("instruction,input,output\nA,,a\nbad,row\nB,,b\n", encoding="utf-8")
    res = read_file(p)
    assert texts(res) == [["A", "a"], ["B", "b"]]
    (err,) = res.errors
    assert err.row == 3 and "2 fields" in err.reason and str(err).startswith(f"{p} row 3: ")


def test_csv_cell_not_utf8_is_a_row_error(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"instruction,input,output\n" + b"A,,a\n" * 50 + b"B,,caf\xe9\nC,,c\n")
    res = read_file(p)
    (err,) = res.errors
    assert err.row == 52 and "not UTF-8" in err.reason and len(res.records) == 51


def test_tsv_and_gzipped_csv(tmp_path):
    t = tmp_path / "d.tsv"
    t.write_text("prompt\tresponse\nHi\tHello\n", encoding="utf-8")
    assert read_file(t).format == "gpt4all"
    g = tmp_path / "d.csv.gz"
    g.write_bytes(gzip.compress(b"instruction,output\nA,a\nB,b\n"))
    res = read_file(g)
    assert res.format == "alpaca" and len(res.records) == 2


def test_text_that_looks_like_a_table_is_read_as_one(tmp_path):
    p = tmp_path / "export.txt"
    p.write_text("instruction;output\nSay hi;Hi!\nAdd 1 and 2;3\n", encoding="utf-8")
    s = sniff(p)
    assert s.layout == "csv" and s.delimiter == ";"
    assert texts(read_file(p)) == [["Say hi", "Hi!"], ["Add 1 and 2", "3"]]


def test_prompt_lines_with_commas_stay_lines(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("What is 2+2, and why?\nName a colour, please.\n", encoding="utf-8")
    assert sniff(p).layout == "text" and read_file(p).format == "lines"


def test_a_table_no_format_matches_says_it_is_a_table(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("city,population\nParis,2100000\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown format \(csv\).*first row is an object with keys city\|population"):
        read_file(p)
    with pytest.raises(DataError, match="reads text lines, but the file is a csv table"):
        read_file(p, format="lines")


def test_parquet_with_nulls_and_nested_messages(tmp_path):
    p = tmp_path / "train-00000-of-00001.parquet"
    rows = [{"messages": [{"role": "user", "content": "Hi", "tool_calls": None},
                          {"role": "assistant", "content": "Hello", "tool_calls": None}], "id": 7}]
    pq.write_table(pa.Table.from_pylist(rows), p)
    res = read_file(p)
    assert res.format == "openai-messages" and not res.errors
    assert res.records[0].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert res.records[0].meta == {"source": str(p), "row": 1, "id": 7}
    a = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([dict(ALPACA[0], input=None), {"instruction": "x", "input": "", "output": None}]), a)
    res = read_file(a)
    assert texts(res) == [["Say hi", "Hi!"]] and res.errors[0].row == 2


def test_arrow_save_to_disk_folder_and_single_arrow_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ALPACA)
    ds.save_to_disk(str(tmp_path / "ds"))
    res = read_file(tmp_path / "ds")
    assert res.format == "alpaca" and texts(res)[1] == ["Add\n\n1 2", "007"]
    (arrow,) = (tmp_path / "ds").glob("*.arrow")  # the IPC stream format
    assert texts(read_file(arrow)) == texts(res)
    f = tmp_path / "file.arrow"  # the IPC file format
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, pa.Table.from_pylist(ALPACA).schema) as w:
        w.write_table(pa.Table.from_pylist(ALPACA))
    assert texts(read_file(f)) == texts(res)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="DatasetDict folder.*pass one split"):
        read_file(tmp_path / "dd")


def test_corrupt_parquet_is_one_clear_error(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"PAR1" + b"\x00" * 100)
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_file(p)


def test_convert_to_parquet_and_back_keeps_every_record(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ALPACA), encoding="utf-8")
    pref = tmp_path / "p.jsonl"
    pref.write_text(json.dumps({"kind": "preference", "prompt": [{"role": "user", "content": "q"}],
                                "chosen": {"role": "assistant", "content": "good"},
                                "rejected": {"role": "assistant", "content": "bad"}, "meta": {"id": "x"}}) + "\n")
    out = tmp_path / "out.parquet"
    assert main(["data", "convert", str(src), str(pref), "-o", str(out)]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["kind", "messages", "prompt", "chosen", "rejected", "meta"]
    assert "tool_calls" not in str(table.schema)  # no tool fields when no record calls tools
    back = tmp_path / "back.jsonl"
    assert main(["data", "convert", str(out), "--to", "jsonl", "-o", str(back)]) == 0
    rows = [json.loads(l) for l in back.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["conversation", "conversation", "preference"]
    assert rows[1]["messages"][1]["content"] == "007" and rows[2]["chosen"]["content"] == "good"
    assert rows[0]["meta"]["source"] == str(src) and rows[2]["meta"]["id"] == "x"
    ds = pytest.importorskip("datasets").load_dataset("parquet", data_files=str(out), split="train")
    assert ds[0]["messages"][0] == {"role": "user", "content": "Say hi"}

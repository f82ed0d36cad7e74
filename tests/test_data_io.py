"""Low-level reading (chatforge.data.io): layouts, encodings, compression, broken JSON."""

import bz2
import gzip
import json
import lzma

import pytest

from chatforge.data.io import ReadError, iter_items, iter_lines, sniff
from chatforge.errors import DataError


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


def items(path):
    return list(iter_items(path))


def values(xs):
    return [x[2] for x in xs if not isinstance(x, ReadError)]


def errors(xs):
    return [x for x in xs if isinstance(x, ReadError)]


# -- layout detection ---------------------------------------------------------------------


def test_jsonl_layout_and_lines_with_blank_lines(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"a": 1}\n\n{"a": 2}\n   \n{"a": 3}\n')
    assert sniff(p).layout == "jsonl"
    xs = items(p)
    assert [(x[0], x[2]["a"]) for x in xs] == [(1, 1), (3, 2), (5, 3)]  # blank lines skipped, numbering kept


def test_json_array_in_a_jsonl_file_is_read_as_array_with_start_lines(tmp_path):
    p = write(tmp_path, "ppo.jsonl", '[\n  {"prompt": "a"},\n  {\n    "prompt": "b"\n  }\n]\n')
    assert sniff(p).layout == "json"
    xs = items(p)
    assert [(line, idx, v["prompt"]) for line, idx, v in xs] == [(2, 0, "a"), (3, 1, "b")]


def test_jsonl_in_a_json_file(tmp_path):
    p = write(tmp_path, "x.json", '{"text": "a"}\n{"text": "b"}\n')
    assert sniff(p).layout == "jsonl"
    assert values(items(p)) == [{"text": "a"}, {"text": "b"}]


def test_pretty_printed_single_object_is_one_item(tmp_path):
    p = write(tmp_path, "one.json", '{\n  "instruction": "x",\n  "output": "y"\n}\n')
    assert sniff(p).layout == "json"
    assert values(items(p)) == [{"instruction": "x", "output": "y"}]


def test_jsonl_whose_first_line_is_broken_stays_jsonl(tmp_path):
    p = write(tmp_path, "k.txt", '{"chosen": "a" "b"}\n{"chosen": "c", "rejected": "d"}\n')
    assert sniff(p).layout == "jsonl"
    xs = items(p)
    assert len(errors(xs)) == 1 and errors(xs)[0].line == 1
    assert values(xs) == [{"chosen": "c", "rejected": "d"}]


def test_text_layout(tmp_path):
    p = write(tmp_path, "seed.txt", "질문 하나?\n질문 둘\n")
    assert sniff(p).layout == "text"
    with pytest.raises(DataError, match="plain text"):
        items(p)


# -- encodings and compression -------------------------------------------------------------


def test_utf8_bom_is_stripped_in_jsonl_array_and_text(tmp_path):
    bom = b"\xef\xbb\xbf"
    p1 = write(tmp_path, "a.jsonl", bom + b'{"a": 1}\n')
    p2 = write(tmp_path, "b.json", bom + b'[{"a": 1}]')
    p3 = write(tmp_path, "c.txt", bom + "불고기\n둘".encode())
    assert sniff(p1).bom and values(items(p1)) == [{"a": 1}]
    assert values(items(p2)) == [{"a": 1}]
    assert [t for _, t in iter_lines(p3)] == ["불고기", "둘"]


def test_crlf_line_endings(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"a": "x"}\r\n{"a": "y"}')  # and no trailing newline
    assert values(items(p)) == [{"a": "x"}, {"a": "y"}]
    t = write(tmp_path, "b.txt", "one\r\ntwo\r\n")
    assert [t for _, t in iter_lines(t)] == ["one", "two"]


@pytest.mark.parametrize("opener,name", [(gzip.compress, "data.jsonl"), (gzip.compress, "data.jsonl.gz"),
                                         (bz2.compress, "data.bin"), (lzma.compress, "data.xz")])
def test_compressed_files_are_detected_by_magic_bytes_not_extension(tmp_path, opener, name):
    p = write(tmp_path, name, opener(b'{"a": 1}\n{"a": 2}\n'))
    s = sniff(p)
    assert s.compression is not None and s.layout == "jsonl"
    assert values(items(p)) == [{"a": 1}, {"a": 2}]


def test_utf16_with_bom_is_decoded(tmp_path):
    p = write(tmp_path, "w.jsonl", '{"a": "é"}\n'.encode("utf-16"))
    assert values(items(p)) == [{"a": "é"}]


# -- file-level errors ---------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"   \n\n  ", b"\xef\xbb\xbf"])
def test_empty_file_is_a_clear_error(tmp_path, content):
    p = write(tmp_path, "e.jsonl", content)
    with pytest.raises(DataError, match="empty file"):
        sniff(p)


def test_empty_gzip_is_empty(tmp_path):
    p = write(tmp_path, "e.gz", gzip.compress(b""))
    with pytest.raises(DataError, match="empty file"):
        sniff(p)


def test_binary_file_is_a_clear_error(tmp_path):
    p = write(tmp_path, "model.bin", bytes(range(256)) * 10)
    with pytest.raises(DataError, match="binary file"):
        sniff(p)


def test_zip_archive_is_named(tmp_path):
    p = write(tmp_path, "d.zip", b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(DataError, match="zip archive"):
        sniff(p)


def test_not_utf8_names_the_line(tmp_path):
    p = write(tmp_path, "latin1.jsonl", '{"a": "ok"}\n{"a": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8"):
        sniff(p)


def test_invalid_utf8_late_in_a_large_jsonl_is_a_line_error(tmp_path):
    good = b'{"a": "x"}\n' * 10000  # past the sniffed head
    p = write(tmp_path, "big.jsonl", good + b'{"a": "\xff"}\n' + b'{"a": "y"}\n')
    xs = items(p)
    errs = errors(xs)
    assert len(errs) == 1 and errs[0].line == 10001 and "UTF-8" in errs[0].reason
    assert len(values(xs)) == 10001


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        sniff(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="directory"):
        sniff(tmp_path)


# -- broken JSON ---------------------------------------------------------------------------


def test_trailing_comma_before_closing_bracket_recovers_all_items_and_names_the_line(tmp_path):
    text = '[\n    {\n        "a": 1\n    },\n    {\n        "a": 2\n    },\n]   \n'
    p = write(tmp_path, "t.json", text)
    with pytest.raises(json.JSONDecodeError) as e:  # what json.load says: the line of "]"
        json.loads(text)
    xs = items(p)
    assert values(xs) == [{"a": 1}, {"a": 2}]
    (err,) = errors(xs)
    assert err.line == e.value.lineno == 8
    assert "trailing comma" in err.reason and "line 7" in err.reason and not err.item


def test_broken_array_item_keeps_the_items_before_it(tmp_path):
    p = write(tmp_path, "b.json", '[{"a": 1},\n{"a": 2},\n{"a": oops},\n{"a": 4}]')
    xs = items(p)
    assert values(xs) == [{"a": 1}, {"a": 2}]
    (err,) = errors(xs)
    assert err.line == 3 and err.index == 2 and "rest of the file was not read" in err.reason


def test_unclosed_array(tmp_path):
    p = write(tmp_path, "u.json", '[{"a": 1},\n{"a": 2}\n')
    xs = items(p)
    assert values(xs) == [{"a": 1}, {"a": 2}]
    assert "not closed" in errors(xs)[0].reason


def test_concatenated_arrays_are_all_read_and_reported(tmp_path):
    p = write(tmp_path, "c.json", '[{"a": 1}]\n[{"a": 2}]\n')
    xs = items(p)
    assert values(xs) == [{"a": 1}, {"a": 2}]
    assert [e.line for e in errors(xs)] == [2] and "second JSON array" in errors(xs)[0].reason


def test_two_objects_glued_on_one_line_are_an_error_not_silently_merged(tmp_path):
    p = write(tmp_path, "g.jsonl", '{"a": 1}\n{"a": 2}{"a": 3}\n{"a": 4}\n')
    xs = items(p)
    assert values(xs) == [{"a": 1}, {"a": 4}]
    (err,) = errors(xs)
    assert err.line == 2 and "two JSON values on one line" in err.reason and "column 9" in err.reason


def test_broken_jsonl_line_reason_has_the_column(tmp_path):
    p = write(tmp_path, "b.jsonl", '{"a": 1}\n{"prompt": {"prompt": "x", "response": "y"}\n')
    (err,) = errors(items(p))
    assert err.line == 2 and err.reason.startswith("invalid JSON") and "column" in err.reason
    assert str(err) == f"{p}:2: {err.reason}"


def test_truncated_gzip_keeps_the_lines_before_and_reports_the_rest(tmp_path):
    blob = gzip.compress(b"".join(b'{"a": %d, "pad": "%s"}\n' % (i, b"x" * 50) for i in range(5000)))
    p = write(tmp_path, "cut.jsonl.gz", blob[: len(blob) // 2])
    xs = items(p)
    errs = errors(xs)
    assert len(errs) == 1 and "truncated" in errs[0].reason and not errs[0].item
    assert 0 < len(values(xs)) < 5000 and errs[0].line == len(values(xs)) + 1

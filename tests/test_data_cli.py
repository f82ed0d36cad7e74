"""`chatforge data inspect | convert | clean | formats`, run in-process through the CLI entry point."""

import json

import pytest

from chatforge.cli import main
from chatforge.data.readers import read_file


EMPTY_LINE = 27  # where the `{}` item of the alpaca fixture starts


@pytest.fixture
def files(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    rows = [{"instruction": "Give three tips for staying healthy.", "input": "",
             "output": "Eat well, sleep enough and move every day."},
            {"instruction": "Translate to French.", "input": "cheese", "output": "fromage"},
            {"instruction": "Design a logo for a coffee shop.", "input": "<noinput>", "output": "A steaming cup."},
            {"instruction": "Predict tomorrow's stock price.", "input": "", "output": "<nooutput>"},
            {"instruction": "Translate to French.", "input": "cheese", "output": "fromage"},
            {}]
    alpaca.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    assert alpaca.read_text().splitlines().index("  {}") + 1 == EMPTY_LINE
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello!", "rejected": "\n\nHuman: hi\n\nAssistant: go away"})
                  + "\n{broken\n", encoding="utf-8")
    weird = tmp_path / "weird.jsonl"
    weird.write_text('{"foo": 1}\n{"foo": 2}\n', encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    return {"alpaca": alpaca, "hh": hh, "weird": weird, "empty": empty, "binary": binary}


def run(capsys, *argv):
    rc = main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_inspect_text_report(capsys, files):
    rc, out, err = run(capsys, "inspect", files["alpaca"], files["hh"])
    assert rc == 0
    assert "format   alpaca (json) -> conversation" in out
    assert "records  5 from 6 items; 1 error(s)" in out
    assert "format   hh-rlhf (jsonl) -> preference" in out
    assert "chars    prompt: min" in out and "sample" in out
    assert f"{files['alpaca']}:{EMPTY_LINE} [item 5]: an empty object" in err
    assert f"{files['hh']}: 1 record(s) could not be read" in err and f"{files['hh']}:2: invalid JSON" in err


def test_inspect_json(capsys, files):
    rc, out, err = run(capsys, "inspect", "--json", files["alpaca"], files["hh"])
    assert rc == 0
    data = json.loads(out)
    a, h = data
    assert {k: a[k] for k in ("file", "format", "kind", "records", "items", "n_errors")} == {
        "file": str(files["alpaca"]), "format": "alpaca", "kind": "conversation", "records": 5, "items": 6, "n_errors": 1}
    assert a["errors"] == [{"line": EMPTY_LINE, "reason": "an empty object {}; expected instruction/input/output", "index": 5}]
    assert a["turns"]["max"] == 2 and a["chars"]["response"]["max"] == len("Eat well, sleep enough and move every day.")
    assert a["sample"]["kind"] == "conversation"
    assert h["errors"][0]["line"] == 2 and h["kind"] == "preference"


def test_inspect_with_tokenizer_counts_tokens(capsys, files):
    rc, out, _ = run(capsys, "inspect", "--json", "--tokenizer", "tiny", files["alpaca"])
    assert rc == 0
    (a,) = json.loads(out)
    assert a["tokens"]["prompt"]["min"] > 0 and a["tokens"]["response"]["max"] > 0


@pytest.mark.parametrize("which,message", [("weird", "unknown format"), ("empty", "empty file"),
                                           ("binary", "binary file")])
def test_inspect_bad_files_exit_nonzero_but_report_the_others(capsys, files, which, message):
    rc, out, err = run(capsys, "inspect", "--json", files[which], files["alpaca"])
    assert rc == 2 and message in err
    bad, good = json.loads(out)
    assert bad["format"] is None and message in bad["fatal"] and good["records"] == 5


def test_inspect_missing_file(capsys, tmp_path):
    rc, _, err = run(capsys, "inspect", tmp_path / "nope.jsonl")
    assert rc == 2 and "no such file" in err


def test_convert_writes_canonical_jsonl(capsys, files, tmp_path):
    out_path = tmp_path / "out" / "all.jsonl"
    rc, out, err = run(capsys, "convert", files["alpaca"], files["hh"], "-o", out_path)
    assert rc == 0 and "wrote 6 record(s)" in out
    assert "1 record(s) could not be read" in err
    back = read_file(out_path)
    assert back.format == "chatforge" and back.kind == "mixed" and len(back.records) == 6
    assert back.records[0].meta["source"] == str(files["alpaca"])  # provenance survives
    assert not (tmp_path / "out" / "all.jsonl.tmp").exists()


def test_convert_on_error_fail_exits_2_and_writes_nothing(capsys, files, tmp_path):
    out_path = tmp_path / "o.jsonl"
    rc, _, err = run(capsys, "convert", files["alpaca"], "-o", out_path, "--on-error", "fail")
    assert rc == 2 and f"{files['alpaca']}:{EMPTY_LINE} [item 5]: an empty object" in err
    assert not out_path.exists() and not (tmp_path / "o.jsonl.tmp").exists()


def test_convert_unknown_format_fails_before_writing(capsys, files, tmp_path):
    out_path = tmp_path / "o.jsonl"
    rc, _, err = run(capsys, "convert", files["alpaca"], files["weird"], "-o", out_path)
    assert rc == 2 and "unknown format" in err and "tried" in err and not out_path.exists()


def test_convert_forced_format(capsys, files, tmp_path):
    out_path = tmp_path / "o.jsonl"
    rc, _, _ = run(capsys, "convert", files["weird"], "-o", out_path, "--format", "lines")
    assert rc == 0 and len(read_file(out_path).records) == 2


def test_clean_writes_kept_rejected_and_report(capsys, files, tmp_path):
    kept, rej, report = tmp_path / "kept.jsonl", tmp_path / "rej.jsonl", tmp_path / "report.json"
    rc, out, err = run(capsys, "clean", files["alpaca"], "-o", kept, "--rejected", rej, "--report", report)
    assert rc == 0
    assert "5 record(s) in, 2 kept" in out and "1 unreadable" in out
    assert "an empty object" in err
    k = read_file(kept).records
    assert [r.messages[0]["content"] for r in k] == ["Give three tips for staying healthy.", "Translate to French.\n\ncheese"]
    rejected = read_file(rej).records
    assert sorted(r.meta["rejected_by"] for r in rejected) == ["duplicate", "na_output", "unfulfillable"]
    rep = json.loads(report.read_text())
    assert rep["records_in"] == 5 and rep["kept"] == 2 and rep["rejected"] == 3 and rep["read_errors"] == 1
    assert rep["rules"]["unfulfillable"] == {"enabled": True, "rejected": 1}
    assert rep["files"][0]["format"] == "alpaca"


def test_clean_rules_can_be_switched_off(capsys, files, tmp_path):
    kept, report = tmp_path / "kept.jsonl", tmp_path / "report.json"
    rc, out, _ = run(capsys, "clean", files["alpaca"], "-o", kept, "--report", report,
                     "--no-unfulfillable", "--no-na-output", "--no-duplicate", "--no-near_duplicate")
    assert rc == 0 and "5 record(s) in, 5 kept" in out
    rules = json.loads(report.read_text())["rules"]
    assert rules["unfulfillable"]["enabled"] is False and rules["empty_output"]["enabled"] is True


def test_formats_lists_every_format(capsys):
    rc, out, _ = run(capsys, "formats")
    assert rc == 0 and "alpaca" in out and "hh-rlhf" in out and "recognised, not readable" in out

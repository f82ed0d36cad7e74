"""``chatforge data synth / judge / rank`` against a real ``chatforge serve tiny`` process (real
HTTP, the real client). A random tiny model answers gibberish, so what is checked is the
mechanics: requests sent and cached, replies that parse or not counted with their reason, the
judge rule in the clean report, resume after a kill without paying twice, dry runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatforge.cli import main
from chatforge.data.clean import Cleaner
from chatforge.data.judge import Verdict, parse_grade, verdict_from
from chatforge.data.records import Conversation, msg

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CHATFORGE_API_KEY": "", "OPENAI_API_KEY": ""}


@pytest.fixture(scope="module")
def served():
    proc = subprocess.Popen([sys.executable, "-m", "chatforge.cli", "serve", "tiny", "--port", "0", "--dtype", "fp32",
                             "--name", "tiny", "--max-tokens", "16"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny at http://127.0.0.1:"), line + proc.stderr.read()
        yield line.split(" at ")[1].split()[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def seeds(tmp_path) -> Path:
    f = tmp_path / "seeds.jsonl"
    rows = [("Give three tips for staying healthy.", "", "Eat well, sleep and exercise."),
            ("Translate the sentence into French.", "The sky is blue.", "Le ciel est bleu."),
            ("Write a short poem about the sea.", "", "Blue and wide, the sea.")]
    f.write_text("".join(json.dumps({"id": f"s{i}", "instruction": a, "instances": [{"input": b, "output": c}]}) + "\n"
                         for i, (a, b, c) in enumerate(rows)))
    return f


def synth_args(seeds: Path, url: str, out: Path, requests: int, *extra: str) -> list[str]:
    return ["data", "synth", "--seed-tasks", str(seeds), "--url", url, "--model", "tiny", "-n", "50", "-o", str(out),
            "--max-tokens", "24", "--max-requests", str(requests), "--list-size", "5", "--report", f"{out}.report.json",
            "--rejected", f"{out}.rej.jsonl", "--backoff", "0.1", *extra]


def test_synth_counts_every_block_and_a_second_run_is_free(served, seeds, tmp_path, capsys):
    out = tmp_path / "synth.jsonl"
    assert main(synth_args(seeds, served, out, 4, "--batch", "2")) == 0
    rep = json.loads(Path(f"{out}.report.json").read_text())
    assert rep["requests"] == 4 and rep["client"]["sent"] == 4 and rep["client"]["cached"] == 0
    assert rep["client"]["completion_tokens"] > 0
    rejected = [json.loads(x) for x in Path(f"{out}.rej.jsonl").read_text().splitlines()]
    assert len(rejected) == sum(rep["rejected"].values()) == rep["blocks_read"] - rep["kept"]
    assert all(r["reason"] and "key" in r for r in rejected)  # every filtered block says why, and from which reply
    assert len(out.read_text().splitlines()) == rep["kept"]
    assert len(Path(f"{out}.cache.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    assert main(synth_args(seeds, served, out, 4, "--batch", "2")) == 0
    rep2 = json.loads(Path(f"{out}.report.json").read_text())
    assert rep2["client"]["sent"] == 0 and rep2["client"]["cached"] == 4 and rep2["rejected"] == rep["rejected"]


def test_synth_resumes_after_a_kill_without_asking_twice(served, seeds, tmp_path):
    out = tmp_path / "killed.jsonl"
    cache = Path(f"{out}.cache.jsonl")
    argv = synth_args(seeds, served, out, 10, "--batch", "1", "--concurrency", "1", "--max-tokens", "64")
    proc = subprocess.Popen([sys.executable, "-m", "chatforge.cli", *argv], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if cache.exists() and len(cache.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(cache.read_bytes().split(b"\n")) - 1  # whole lines written before the kill
    assert 3 <= done < 10 and not out.exists()
    assert main(argv) == 0
    rep = json.loads(Path(f"{out}.report.json").read_text())
    assert rep["requests"] == 10 and rep["client"]["cached"] == done and rep["client"]["sent"] == 10 - done
    keys = [json.loads(x)["key"] for x in cache.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 10  # no request asked (and paid) twice


def test_synth_dry_run_sends_nothing(seeds, tmp_path, capsys):
    out = tmp_path / "dry.jsonl"
    assert main(synth_args(seeds, "http://127.0.0.1:9/v1", out, 4, "--dry-run")) == 0
    text = capsys.readouterr().out
    assert "POST http://127.0.0.1:9/v1/completions" in text and "List of 5 tasks:" in text
    assert text.rstrip().endswith("4. Instruction:") and not out.exists()  # 2 seeds + 1 (no generated yet)
    assert not Path(f"{out}.cache.jsonl").exists()


def test_an_unreachable_endpoint_is_one_line(seeds, tmp_path, capsys):
    rc = main(synth_args(seeds, "http://127.0.0.1:9/v1", tmp_path / "x.jsonl", 2, "--retries", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and "cannot reach http://127.0.0.1:9/v1" in err and "Traceback" not in err


def test_judge_runs_the_cleaning_rules_first_and_reports_the_judge_rule(served, tmp_path, capsys):
    src = tmp_path / "sft.jsonl"
    rows = [("Give three tips for staying healthy.", "Eat well, sleep and exercise."), ("What is 2 + 2?", "4"),
            ("What is 2 + 2?", "4"), ("Say the word blue.", "")]
    src.write_text("".join(json.dumps({"instruction": a, "input": "", "output": b}) + "\n" for a, b in rows))
    out, rej, report = tmp_path / "kept.jsonl", tmp_path / "rej.jsonl", tmp_path / "report.json"
    argv = ["data", "judge", str(src), "--url", served, "--model", "tiny", "-o", str(out), "--rejected", str(rej),
            "--report", str(report), "--max-tokens", "8"]
    assert main(argv) == 0
    rep = json.loads(report.read_text())
    j = rep["rules"]["judge"]
    assert rep["rules"]["duplicate"]["rejected"] == 1 and rep["rules"]["empty_output"]["rejected"] == 1
    assert rep["client"]["sent"] == 2  # only the two survivors were sent to the judge
    assert j["judged"] + j["unjudged"] == 2 and j["rejected"] == sum(v for k, v in j["scores"].items() if int(k) < 3)
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    rejected = [json.loads(x) for x in rej.read_text().splitlines()]
    assert len(kept) + len(rejected) == 4  # nothing vanished
    assert all("judge" in r["meta"] for r in kept)  # a verdict, or why there is none
    assert {r["meta"]["rejected_by"] for r in rejected} >= {"duplicate", "empty_output"}
    capsys.readouterr()
    assert main(argv + ["--dry-run"]) == 0
    assert "[Response to grade]" in capsys.readouterr().out


def test_judge_rule_rejects_low_scores_with_the_reason_and_keeps_the_unjudged():
    recs = [Conversation([msg("user", f"q{i}"), msg("assistant", f"a{i}")]) for i in range(3)]
    verdicts = {id(recs[0]): verdict_from("Score: 2\nReason: wrong sum.", "j", 3),
                id(recs[1]): verdict_from("Score: 5\nReason: right.", "j", 3),
                id(recs[2]): Verdict(None, "", None, "j", error="request failed: HTTP 503")}
    c = Cleaner(judge=lambda r: verdicts.get(id(r)))
    assert [c.check(r) for r in recs] == ["judge", None, None]
    assert recs[0].meta["judge"]["reason"] == "wrong sum." and recs[0].meta["judge"]["score"] == 2
    rep = c.report()["rules"]["judge"]
    assert rep["rejected"] == 1 and rep["scores"] == {"2": 1, "5": 1}
    assert rep["unjudged_reasons"] == {"request failed: HTTP 503": 1}
    assert "judge" not in Cleaner().report()["rules"]


def test_grade_parsing():
    assert parse_grade("Score: 4\nReason: Mostly right.") == (4, "Mostly right.")
    assert parse_grade("**Score:** 2/5\n**Reason:** wrong") == (2, "wrong")
    assert parse_grade('{"score": 1, "reason": "off topic"}') == (1, "off topic")
    assert parse_grade("5. The answer is correct.")[0] == 5
    assert parse_grade("Skor: 3\nSebab: separuh betul") == (3, "separuh betul")
    assert parse_grade("I would give it a nine") is None and parse_grade("Score: 7") is None


def test_rank_from_candidate_files_and_from_a_model(served, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    qs = ["Name a colour.", "What is 2 + 2?"]
    prompts.write_text("".join(json.dumps({"kind": "prompt", "prompt": [msg("user", q)], "meta": {}}) + "\n" for q in qs))
    cands = tmp_path / "cands.jsonl"
    answers = {"Name a colour.": ["blue", "green", "red", "blue"], "What is 2 + 2?": ["4"]}
    cands.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, al in answers.items() for a in al))
    out, rej, report = tmp_path / "r.jsonl", tmp_path / "r.rej.jsonl", tmp_path / "r.json"
    base = ["data", "rank", str(prompts), "--url", served, "--model-name", "tiny", "-o", str(out), "--rejected", str(rej),
            "--report", str(report)]
    assert main(base + ["--candidates", str(cands), "-k", "3"]) == 0
    rep = json.loads(report.read_text())
    assert rep["client"]["sent"] == 6  # 3 distinct candidates: 3 pairs x 2 orders; "2 + 2" has one answer
    dropped = [json.loads(x) for x in rej.read_text().splitlines()]
    assert rep["rankings"] + len(dropped) == 2
    assert any(d["reason"].startswith("fewer than 2 distinct") for d in dropped)
    for line in out.read_text().splitlines():  # whatever the random judge said, a valid AI ranking
        r = json.loads(line)
        assert r["kind"] == "ranking" and r["meta"]["source"] == "ai" and r["meta"]["annotator"] == "ai:tiny"
    assert main(base + ["--model", "tiny", "-k", "2", "--max-new-tokens", "8", "--mode", "listwise"]) == 0
    rep = json.loads(report.read_text())
    assert rep["prompts"] == 2 and rep["client"]["sent"] + rep["client"]["cached"] <= 4  # 2 orders a prompt


def test_rank_drops_a_prompt_whose_requests_failed_instead_of_calling_it_a_tie(tmp_path):
    """A 400 fails one request without a retry; that prompt's ranking would be a tie nobody stated:
    it is dropped with the reason, so a rerun can still judge it."""
    from test_openai_client import Stub

    stub = Stub(script=["400"])
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(json.dumps({"kind": "prompt", "prompt": [msg("user", "Name a colour.")], "meta": {}}) + "\n")
        cands = tmp_path / "cands.jsonl"
        cands.write_text("".join(json.dumps({"instruction": "Name a colour.", "output": a}) + "\n"
                                 for a in ("blue", "green")))
        out, rej = tmp_path / "r.jsonl", tmp_path / "r.rej.jsonl"
        assert main(["data", "rank", str(prompts), "--url", stub.url, "--model-name", "m", "-o", str(out),
                     "--rejected", str(rej), "--candidates", str(cands), "-k", "2", "--concurrency", "1"]) == 0
        assert out.read_text() == ""
        (d,) = [json.loads(x) for x in rej.read_text().splitlines()]
        assert d["reason"].startswith("request failed (1 of 2)")
    finally:
        stub.shutdown()

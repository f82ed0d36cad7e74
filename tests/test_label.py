"""``chatforge label``: the store (judgements -> records, resume, assignment, agreement), the web
API with several annotators at once, a server killed mid-session, bad input, and the training
side of what it writes (ties and "all unacceptable" in the RM and DPO data)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from chatforge.chat.label import (Item, LabelStore, RunningLabel, agreement, engine_candidates, read_candidates,
                                  read_prompts, sibling)
from chatforge.cli import main
from chatforge.data.pairs import DataReport as PairReport, expand_pairs
from chatforge.data.readers import read_file
from chatforge.data.records import Ranking, iter_canonical, msg
from chatforge.errors import ChatforgeError, ConfigError, DataError
from chatforge.train.rm import DataReport, build_groups, expand_to_pairs, group_metrics, kwise_loss, listwise_loss

ROOT = Path(__file__).resolve().parents[1]


def items(n: int = 3, k: int = 3) -> list[Item]:
    return [Item(f"q{i}", [msg("user", f"Question {i}?")], [f"answer {i}.{j}" for j in range(k)],
                 [{"model": f"m{j}"} for j in range(k)]) for i in range(n)]


def candidates_file(path: Path, n: int = 3, k: int = 3) -> Path:
    with open(path, "w") as f:
        for it in items(n, k):
            f.write(json.dumps(it.to_line()) + "\n")
    return path


def rank(store: LabelStore, who: str, order=None, tiers=None, **extra) -> dict:
    """Judge the next item of ``who``: ``order`` as indices into the *candidates* (not the shown order)."""
    nxt = store.next_for(who)
    shown = store.shown_order(nxt["item"], who)
    body = {"annotator": who, "item": nxt["item"], **extra}
    if order is not None:
        body["order"] = [shown.index(i) for i in order]
    if tiers is not None:
        body["tiers"] = tiers
    return store.submit(body)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---------------------------------------------------------------- the store
def test_a_crash_between_demonstration_and_judgement_loses_neither(tmp_path):
    """The demonstration is written first; after a crash the item is still to do, and the retry
    stores the judgement without writing the demonstration twice."""
    from chatforge.data.records import Conversation

    out = tmp_path / "rankings.jsonl"
    store = LabelStore(items(), out)
    nxt = store.next_for("ann")
    store._append(Conversation([*store.items[nxt["item"]].prompt, msg("assistant", "Mine.")],
                               {"annotator": "ann", "source": "human", "item": nxt["item"], "time": "t"}))
    store.close()  # the process dies here, before the ranking line
    store = LabelStore(items(), out)
    assert store.next_for("ann")["item"] == nxt["item"]
    assert rank(store, "ann", order=[0, 1, 2], demonstration="Mine.")["duplicate"] is False
    store.close()
    assert len(lines(out)) == 1 and len(lines(sibling(out, "demos"))) == 1


def test_judgements_become_records_and_resume(tmp_path):
    out = tmp_path / "rankings.jsonl"
    store = LabelStore(items(), out)
    assert store.next_for("ann")["candidates"] == [f"answer 0.{j}" for j in store.shown_order("q0", "ann")]
    rank(store, "ann", order=[2, 0, 1], tiers=[0, 0, 1], comment="close call", demonstration="A better one.")
    rank(store, "ann", action="skip")
    store.close()

    (r,) = lines(out)
    assert [x["content"] for x in r["responses"]] == ["answer 0.2", "answer 0.0", "answer 0.1"]
    assert r["tiers"] == [0, 0, 1]
    m = r["meta"]
    assert (m["annotator"], m["source"], m["item"], m["comment"], m["unacceptable"]) == \
        ("ann", "human", "q0", "close call", False)
    assert m["time"].endswith("Z") and [c["index"] for c in m["candidates"]] == [2, 0, 1]
    assert [c["model"] for c in m["candidates"]] == ["m2", "m0", "m1"]
    assert sorted(m["shown"]) == [0, 1, 2]
    (demo,) = lines(sibling(out, "demos"))
    assert demo["kind"] == "conversation" and demo["messages"][-1] == msg("assistant", "A better one.")
    assert demo["meta"]["item"] == "q0" and demo["meta"]["annotator"] == "ann"
    (skip,) = lines(sibling(out, "skips"))
    assert skip["kind"] == "prompt" and skip["meta"]["skipped"] is True and skip["meta"]["item"] == "q1"

    again = LabelStore(items(), out)  # a restart: continues after what the files hold
    assert again.next_for("ann")["item"] == "q2"
    assert again.submit({"annotator": "ann", "item": "q0", "order": [0, 1, 2]})["duplicate"] is True
    p = again.progress()
    assert p["annotators"] == [{"name": "ann", "ranked": 1, "skipped": 1, "unacceptable": 0, "demonstrations": 1,
                                "todo": 1}]
    assert p["complete"] == 1 and p["todo"] == 2
    again.close()
    assert len(lines(out)) == 1


def test_bad_judgements_are_refused_by_field(tmp_path):
    store = LabelStore(items(), tmp_path / "r.jsonl")
    item = store.next_for("ann")["item"]
    cases = [({"order": [0, 0, 1]}, "order"), ({"order": [0, 1]}, "order"), ({"order": [0, 1, 2], "tiers": [1, 0, 0]},
             "tiers"), ({"order": [0, 1, 2], "colour": 1}, "colour"), ({"action": "rank"}, "order"),
            ({"order": [0, 1, 2], "unacceptable": "yes"}, "unacceptable"), ({"order": [0.0, 1.0, 2.0]}, "order")]
    for extra, field in cases:
        with pytest.raises(ValueError) as e:
            store.submit({"annotator": "ann", "item": item, **extra})
        assert e.value.field == field, (extra, e.value)
    for bad in ("", " ann", "ai:gpt", "x" * 41):
        with pytest.raises(ValueError):
            store.submit({"annotator": bad, "item": item, "order": [0, 1, 2]})
    store.close()
    assert (tmp_path / "r.jsonl").read_text() == ""


def test_one_server_per_output_file(tmp_path):
    store = LabelStore(items(), tmp_path / "r.jsonl")
    with pytest.raises(ConfigError, match="another `chatforge label`"):
        LabelStore(items(), tmp_path / "r.jsonl")
    store.close()
    LabelStore(items(), tmp_path / "r.jsonl").close()  # free again


def test_answers_with_unicode_line_separators_resume(tmp_path):
    out = tmp_path / "r.jsonl"
    odd = [Item("q0", [msg("user", "Q?")], ["one\u2028two", "three\x85four"], [{}, {}])]
    store = LabelStore(odd, out)
    rank(store, "ann", order=[1, 0], demonstration="five\u2029six")
    store.close()
    store = LabelStore(odd, out)  # json.dumps leaves U+2028 / NEL raw: still one record a line
    assert store.next_for("ann")["item"] is None and store.counts["ann"]["demonstrations"] == 1
    store.close()


def test_a_torn_last_line_is_moved_aside(tmp_path):
    out = tmp_path / "r.jsonl"
    store = LabelStore(items(), out)
    rank(store, "ann", order=[0, 1, 2])
    store.close()
    whole = out.read_text()
    out.write_text(whole + '{"kind": "ranking", "prom')
    logs: list[str] = []
    store = LabelStore(items(), out, log=logs.append)
    assert out.read_text() == whole and "unfinished last line" in logs[0]
    assert Path(str(out) + ".torn").read_text() == '{"kind": "ranking", "prom\n'
    assert store.next_for("ann")["item"] == "q1"
    store.close()


def test_overlap_items_go_to_two_people_and_agreement_is_measured(tmp_path):
    store = LabelStore(items(4), tmp_path / "r.jsonl", overlap=0.5, seed=1)
    assert len(store.double) == 2
    seen = {"a": [], "b": []}
    for _ in range(8):
        for who, order in (("a", [0, 1, 2]), ("b", [0, 2, 1])):
            nxt = store.next_for(who)
            if nxt["item"] is not None:
                seen[who].append(nxt["item"])
                rank(store, who, order=order)
    # every item is ranked once, the double ones twice, never twice by one person
    assert sorted(seen["a"] + seen["b"]) == sorted(store.order + sorted(store.double))
    assert set(seen["a"]) & set(seen["b"]) == store.double
    p = store.progress()
    assert p["complete"] == 4 and p["todo"] == 0
    (row,) = p["agreement"]
    assert row["annotators"] == ["a", "b"] and row["items"] == 2
    assert row["pairwise_agreement"] == pytest.approx(2 / 3) and row["kendall_tau"] == pytest.approx(1 / 3)
    store.close()


def test_agreement_by_hand():
    assert agreement({0: 0, 1: 1, 2: 2}, {0: 0, 1: 1, 2: 2}) == (1.0, 1.0)
    assert agreement({0: 0, 1: 1, 2: 2}, {0: 2, 1: 1, 2: 0}) == (0.0, -1.0)
    a, tau = agreement({0: 0, 1: 0, 2: 1}, {0: 0, 1: 1, 2: 2})  # a tie in one of them
    assert a == pytest.approx(2 / 3) and tau == pytest.approx(2 / math.sqrt(2 * 3))
    assert agreement({0: 0, 1: 0}, {0: 0, 1: 1}) == (0.0, None)  # one ties everything: no tau


def test_a_claimed_item_is_not_given_to_a_second_annotator(tmp_path):
    store = LabelStore(items(2), tmp_path / "r.jsonl")
    assert store.next_for("a")["item"] == "q0"
    assert store.next_for("a")["item"] == "q0"  # a reload shows the same item
    assert store.next_for("b")["item"] == "q1"
    assert store.next_for("c")["item"] is None
    store.close()


# ---------------------------------------------------------------- several annotators over HTTP
def post(url: str, body: dict, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + "/api/judge", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def get(url: str, path: str, key: str | None = None) -> dict:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def annotate_all(url: str, who: str, key: str | None = None) -> int:
    n = 0
    while (nxt := get(url, f"/api/next?annotator={who}", key))["item"] is not None:
        c = nxt["candidates"]  # shown shuffled per annotator: rank by text, so both agree
        post(url, {"annotator": who, "item": nxt["item"], "order": sorted(range(len(c)), key=c.__getitem__)[::-1],
                   "comment": who * 200}, key)  # long lines: an interleaved write would show
        n += 1
    return n


def test_two_annotators_at_once_lose_and_mix_nothing(tmp_path):
    out = tmp_path / "r.jsonl"
    with RunningLabel(LabelStore(items(30, 4), out, overlap=1.0), api_key="k") as srv:
        with pytest.raises(urllib.error.HTTPError) as e:
            get(srv.url, "/api/next?annotator=a")
        assert e.value.code == 401
        done: dict[str, int] = {}
        threads = [threading.Thread(target=lambda w=w: done.__setitem__(w, annotate_all(srv.url, w, "k")))
                   for w in ("alice", "bob")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert done == {"alice": 30, "bob": 30}
        assert get(srv.url, "/api/progress", "k")["overall"]["pairwise_agreement"] == 1.0
    recs = list(iter_canonical(out))  # every line a whole, valid record
    assert len(recs) == 60 and len(out.read_text().splitlines()) == 60
    assert sorted((r.meta["annotator"], r.meta["item"]) for r in recs) == sorted(
        (w, f"q{i}") for w in ("alice", "bob") for i in range(30))


def test_http_errors_are_openai_shaped(tmp_path):
    with RunningLabel(LabelStore(items(), tmp_path / "r.jsonl")) as srv:
        with pytest.raises(urllib.error.HTTPError) as e:
            post(srv.url, {"annotator": "a", "item": "nope", "order": [0, 1, 2]})
        assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "item"
        page = urllib.request.urlopen(srv.url + "/").read().decode()
        assert "label.js" in page and "Content-Security-Policy" in page


# ---------------------------------------------------------------- a server killed mid-session
def start_cli(args: list[str]) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "chatforge", "label", *args, "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if "labelling at " in line:
            return proc, line.split("labelling at ")[1].split()[0].rstrip("/")
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"the label app did not start: {proc.stdout.read()}")


def test_killed_server_keeps_every_judgement_and_resumes(tmp_path):
    cands, out = candidates_file(tmp_path / "cands.jsonl", n=4), tmp_path / "r.jsonl"
    proc, url = start_cli(["--candidates", str(cands), "--out", str(out)])
    try:
        for _ in range(2):
            nxt = get(url, "/api/next?annotator=ann")
            assert post(url, {"annotator": "ann", "item": nxt["item"], "order": [1, 0, 2]})["ok"]
        get(url, "/api/next?annotator=ann")  # the third item is on screen when the server dies
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert [r.meta["item"] for r in iter_canonical(out)] == ["q0", "q1"]
    proc, url = start_cli(["--candidates", str(cands), "--out", str(out)])
    try:
        assert get(url, "/api/next?annotator=ann")["item"] == "q2"
        assert get(url, "/api/progress")["annotators"][0]["ranked"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


# ---------------------------------------------------------------- bad input
def test_bad_input_is_one_line_naming_the_place(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "ok too"}\n{not json\n')
    assert main(["label", str(prompts), "--model", "tiny", "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{prompts}:3" in err

    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "fine"}\n')
    assert main(["label", str(good), "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert main(["label", str(good), "--model", str(broken), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and len(err.strip().splitlines()) == 1
    assert main(["label", str(good), "--model", "tiny", "--k", "1", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "--k 1" in capsys.readouterr().err

    cands = tmp_path / "c.jsonl"
    cands.write_text('{"prompt": "q", "candidates": ["a", "b"]}\n{"prompt": "q2", "candidates": ["only one"]}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: 'candidates'"):
        read_candidates(str(cands))
    cands.write_text('{"id": "x", "prompt": "q", "candidates": ["a", "b"]}\n'
                     '{"id": "x", "prompt": "q2", "candidates": ["a", "b"]}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: item id 'x' again"):
        read_candidates(str(cands))
    cands.write_bytes(b'{"prompt": "q", "candidates": ["a", "b"]}\n{"prompt": "q\xff2", "candidates": ["a", "b"]}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not UTF-8"):
        read_candidates(str(cands))
    cands.write_text('{"prompt": "q", "candidates": ["a", "b"]}\n' + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:2: JSON nested too deeply"):
        read_candidates(str(cands))
    conv = tmp_path / "conv.jsonl"
    conv.write_text('{"kind": "prompt", "prompt": [{"role": "user", "content": "a"}], "meta": {}}\n'
                    '{"kind": "conversation", "messages": [{"role": "assistant", "content": "hi"}], "meta": {}}\n')
    with pytest.raises(DataError, match=r"conv\.jsonl:2: the prompt does not end with a user message"):
        read_prompts(str(conv))


def test_engine_candidates_record_their_settings(tmp_path):
    from chatforge.generate.engine import Engine, SamplingConfig
    from chatforge.models.tiny import chatty_tiny

    engine = Engine(*chatty_tiny())
    prompts = read_prompts(str(candidates_file(tmp_path / "c.jsonl", n=2)))  # their prompts are read too
    got = engine_candidates(engine, prompts, 3, SamplingConfig(max_new_tokens=6, temperature=0.9, seed=5), "tiny",
                            progress=False)
    assert [it.id for it in got] == [p[0] for p in prompts] and all(len(it.texts) == 3 for it in got)
    assert all(t.strip() for it in got for t in it.texts)
    info = got[0].info[2]
    assert (info["model"], info["sample"], info["temperature"], info["max_tokens"], info["seed"]) == \
        ("tiny", 2, 0.9, 6, 5)


def test_candidates_from_an_openai_compatible_server(tmp_path):
    from chatforge.chat import server
    from chatforge.chat.label import remote_candidates
    from chatforge.chat.remote import Client
    from chatforge.generate.engine import Engine, SamplingConfig
    from chatforge.models.tiny import chatty_tiny

    srv = server.make_server(Engine(*chatty_tiny()), "tiny-chat", port=0, api_key="k")
    try:
        prompts = read_prompts(str(candidates_file(tmp_path / "c.jsonl", n=2)))
        got = remote_candidates(Client(srv.url + "/v1", "k"), "tiny-chat", prompts, 2,
                                SamplingConfig(max_new_tokens=5, temperature=1.0, seed=3), progress=False)
        assert [len(it.texts) for it in got] == [2, 2] and all(t.strip() for it in got for t in it.texts)
        assert got[1].info[1]["seed"] == 4 and got[1].info[1]["finish_reason"] == "length"
        with pytest.raises(ChatforgeError, match="401"):
            remote_candidates(Client(srv.url + "/v1", "wrong"), "tiny-chat", prompts, 2, SamplingConfig(),
                              progress=False)
    finally:
        srv.close()


# ---------------------------------------------------------------- ties and "all unacceptable" in training
def test_kwise_masks_tied_pairs_and_listwise_uses_tier_groups():
    s = torch.tensor([[3.0, 1.0, 2.0]])
    tied = torch.tensor([[0, 0, 1]])  # responses 0 and 1 tied, both above 2
    want = -(torch.nn.functional.logsigmoid(torch.tensor(1.0)) + torch.nn.functional.logsigmoid(torch.tensor(-1.0))) / 2
    assert kwise_loss(s, tiers=tied).item() == pytest.approx(want.item(), abs=1e-6)
    assert kwise_loss(s, tiers=torch.tensor([[0, 1, 2]])).item() == pytest.approx(kwise_loss(s).item())
    # Breslow: 0 and 1 are each picked from {0, 1, 2}, 2 from {2}
    lse = torch.logsumexp(s[0], 0).item()
    assert listwise_loss(s, tiers=tied).item() == pytest.approx((lse - 3) + (lse - 1), abs=1e-5)
    assert listwise_loss(s, tiers=torch.tensor([[0, 1, 2]])).item() == pytest.approx(listwise_loss(s).item(), abs=1e-6)
    m = group_metrics([[3.0, 1.0, 2.0]], [[0, 0, 1]])
    assert m["pairs"] == 2 and m["acc"] == 0.5 and m["tau"] == 0.0


def _ranking(texts, tiers=None, line=1, **meta):
    return Ranking([msg("user", "q")], [msg("assistant", t) for t in texts],
                   {"source": "human", "file": "r.jsonl", "line": line, **meta}, tiers)


def test_ties_and_unacceptable_in_rm_and_dpo_data():
    from chatforge.models.tiny import tiny_tokenizer

    recs = [_ranking(["a", "b", "c"], [0, 0, 1], 1), _ranking(["a", "b"], [0, 0], 2),
            _ranking(["a", "a", "c"], [0, 0, 1], 3), _ranking(["a", "b", "a"], [0, 1, 2], 4),
            _ranking(["x", "y", "z"], None, 5, unacceptable=True)]
    pairs = expand_pairs(recs, rep := PairReport())
    assert [(p.chosen["content"], p.rejected["content"]) for p in pairs] == [
        ("a", "c"), ("b", "c"), ("a", "c"), ("a", "c"), ("x", "y"), ("x", "z"), ("y", "z")]
    assert rep.skipped == {"all responses tied (no pair)": 1, "identical responses (a tie)": 1}
    assert rep.kept == {"all answers unacceptable (order kept)": 1}   # trained on: counted, not a skip
    assert "r.jsonl:2: all responses tied (no pair)" in rep.first
    dropped = expand_pairs(recs, rep2 := PairReport(), unacceptable="drop")
    assert len(dropped) == 4 and rep2.skipped["all answers unacceptable (dropped)"] == 1

    groups = build_groups(recs, range(len(recs)), tiny_tokenizer(), 64, "auto", DataReport())
    assert [(g.record, g.tiers) for g in groups] == [(0, [0, 0, 1]), (2, [0, 0, 1]), (4, None)]
    assert len(expand_to_pairs(groups)) == 2 + 2 + 3


def test_app_output_trains_a_tiny_rm_and_inspects(tmp_path, capsys):
    from chatforge.train.rm import RMConfig, train

    out = tmp_path / "rankings.jsonl"
    store = LabelStore(items(6, 3), out)
    rank(store, "ann", order=[0, 1, 2])
    rank(store, "ann", order=[0, 1, 2], tiers=[0, 0, 1])
    rank(store, "ann", order=[2, 1, 0], unacceptable=True)
    rank(store, "ann", order=[0, 1, 2], tiers=[0, 0, 0])
    rank(store, "ann", order=[1, 0, 2])
    rank(store, "ann", action="skip")
    store.close()
    res = read_file(out)
    assert res.format == "chatforge" and res.kind == "ranking" and len(res.records) == 5 and not res.errors
    assert main(["data", "inspect", str(out), str(sibling(out, "skips"))]) == 0
    text = capsys.readouterr().out
    assert "-> ranking" in text and "-> prompt" in text
    cfg = RMConfig(model="tiny", data=[str(out)], out=str(tmp_path / "run"), precision="fp32", max_len=64,
                   batch_size=2, grad_accum=1, max_steps=2, eval_fraction=0.0, loss="kwise", eval_every=1000,
                   save_every=1000, log_every=1)
    cfg.validate()
    train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["skipped"] == {"all responses tied (no pair)": 1}
    assert summary["data"]["kept"] == {"all answers unacceptable (order kept)": 1}
    assert summary["train_groups"] == 4

    from chatforge.train.dpo import DPOConfig, train as train_dpo

    dcfg = DPOConfig(model="tiny", data=[str(out)], out=str(tmp_path / "dpo"), precision="fp32", max_len=64,
                     batch_size=2, grad_accum=1, max_steps=1, eval_fraction=0.0, kl_prompts=0, eval_every=1000,
                     save_every=1000, log_every=1, unacceptable="drop")
    dcfg.validate()
    train_dpo(dcfg)
    d = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert d["train_pairs"] == 3 + 2 + 3 and d["data"]["skipped"] == {
        "all responses tied (no pair)": 1, "all answers unacceptable (dropped)": 1}

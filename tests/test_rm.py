"""Reward model: losses against hand-computed values, data hygiene (ties, empty, identical),
the padding-invariant score, HF sequence-classifier round trip, LoRA adapter sharing, and a
tiny RM that must learn a trivially separable preference."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from chatforge.data.records import Conversation, Preference, Ranking, msg, write_jsonl
from chatforge.data.split import split_indices
from chatforge.models.heads import (RewardModel, last_token_index, load_reward_model, load_scorer, pad_batch,
                                    position_ids_from_mask, reward_pad_token)
from chatforge.models.tiny import tiny_model, tiny_tokenizer
from chatforge.train.rm import (DataReport, RMConfig, build_groups, centering_penalty, expand_to_pairs,
                                group_metrics, kwise_loss, listwise_loss, pairwise_loss, train)


def softplus(x: float) -> float:  # -log sigmoid(-x) == log(1 + e^x)
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- losses
def test_pairwise_loss_by_hand():
    # -log sigmoid(1) = log(1 + e^-1)
    assert pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(0.3132617, abs=1e-6)
    # a margin of 0.5 asks for more: -log sigmoid(0.5)
    assert pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=0.5).item() == pytest.approx(0.4740770, abs=1e-6)
    # batch mean; the second pair is wrong way round
    got = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])).item()
    assert got == pytest.approx((softplus(-2) + softplus(1)) / 2, abs=1e-6)
    assert got == pytest.approx(0.7200950, abs=1e-6)


def test_kwise_loss_k3_by_hand_each_ranking_counts_once():
    # ranking 1: scores [3, 1, 2] best->worst; pairs (0,1) d=2, (0,2) d=1, (1,2) d=-1
    r1 = (softplus(-2) + softplus(-1) + softplus(1)) / 3
    assert r1 == pytest.approx(0.5844839, abs=1e-6)
    assert kwise_loss(torch.tensor([[3.0, 1.0, 2.0]])).item() == pytest.approx(r1, abs=1e-6)
    # ranking 2 has K=2 (one padding slot): d = 0 - 1
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 123.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    r2 = softplus(1)
    got = kwise_loss(scores, mask).item()
    assert got == pytest.approx((r1 + r2) / 2, abs=1e-6)
    # not the mean over the 4 pairs as independent samples (which would weigh ranking 1 3x)
    assert got != pytest.approx((3 * r1 + r2) / 4, abs=1e-3)
    # with K=2 everywhere it IS the pairwise loss; margins shift every pair
    s2 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert kwise_loss(s2, margin=0.3).item() == pytest.approx(
        pairwise_loss(s2[:, 0], s2[:, 1], margin=0.3).item(), abs=1e-6)


def test_listwise_plackett_luce_by_hand():
    # -log P([3,1,2] in this order) = (lse(3,1,2) - 3) + (lse(1,2) - 1)
    lse = lambda *x: math.log(sum(math.exp(v) for v in x))  # noqa: E731
    want = (lse(3, 1, 2) - 3) + (lse(1, 2) - 1)
    assert want == pytest.approx(1.7208685, abs=1e-6)
    assert listwise_loss(torch.tensor([[3.0, 1.0, 2.0]])).item() == pytest.approx(want, abs=1e-5)
    # K=2 reduces to Bradley-Terry; padded slots contribute nothing and give finite gradients
    s = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    loss = listwise_loss(s, torch.tensor([[True, True, False]]))
    assert loss.item() == pytest.approx(softplus(1), abs=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad[0, 2].item() == 0.0


def test_centering_penalty():
    # group means 1 and -2 (the padded 50 is ignored): ((1)^2 + (-2)^2) / 2
    s = torch.tensor([[0.5, 1.5, 50.0], [-2.0, -2.0, 0.0]])
    m = torch.tensor([[True, True, False], [True, True, False]])
    assert centering_penalty(s, m).item() == pytest.approx(2.5)


def test_group_metrics_accuracy_top1_tau():
    # ranking [3,1,2]: pairs correct 2/3, tau = (2-1)/3, top1 yes; pair [0,1]: wrong
    m = group_metrics([[3.0, 1.0, 2.0], [0.0, 1.0]])
    assert m["acc"] == pytest.approx(2 / 4)
    assert m["tau"] == pytest.approx(1 / 3) and m["top1"] == 1.0 and m["rankings"] == 1
    assert m["margin"] == pytest.approx((2 + 1 - 1 - 1) / 4)
    assert m["best_mean"] == pytest.approx(1.5) and m["worst_mean"] == pytest.approx(1.5)
    perfect = group_metrics([[3.0, 2.0, 1.0]])
    assert perfect["tau"] == 1.0 and group_metrics([[1.0, 2.0, 3.0]])["tau"] == -1.0
    assert group_metrics([[1.0, 1.0]])["acc"] == 0.5  # a tie in score counts half


# ---------------------------------------------------------------- data hygiene
def _pref(prompt: str, chosen: str, rejected: str, line: int) -> Preference:
    return Preference([msg("user", prompt)], msg("assistant", chosen), msg("assistant", rejected),
                      {"source": "t.jsonl", "line": line})


def test_ties_refused_and_bad_records_reported():
    tok = tiny_tokenizer()
    recs = [
        _pref("Say blue", "blue", "red", 1),
        _pref("Say blue", "same", "same", 2),                          # identical: a tie
        _pref("Say blue", "  ", "red", 3),                             # empty
        Ranking([msg("user", "x")], [msg("assistant", a) for a in ("a", "b", "c")],
                {"source": "t.jsonl", "line": 4, "ranking": [0, 0, 1]}),  # tied ranks
        Ranking([msg("user", "x")], [msg("assistant", a) for a in ("a", "b", "a")],
                {"source": "t.jsonl", "line": 5}),                     # identical responses
        Ranking([msg("user", "x")], [msg("assistant", a) for a in ("a", "", "c")],
                {"source": "t.jsonl", "line": 6}),                     # empty one dropped, K=2 left
        Conversation([msg("user", "hi"), msg("assistant", "hello")], {"source": "t.jsonl", "line": 7}),
    ]
    rep = DataReport()
    groups = build_groups(recs, range(len(recs)), tok, 64, "auto", rep)
    assert [g.record for g in groups] == [0, 5]
    assert len(groups[1].ids) == 2
    assert rep.skipped == {"identical responses (a tie)": 2, "empty response": 1, "tied ranks (refused)": 1,
                           "empty response dropped from a ranking (kept)": 1,
                           "conversation record (needs preference or ranking data)": 1}
    assert rep.first[0] == "t.jsonl:2: identical responses (a tie)"
    assert "t.jsonl:4: tied ranks (refused)" in rep.first
    assert rep.records == 7 and rep.groups == 2


def test_truncation_keeps_response_and_skips_when_it_cannot():
    from chatforge.models.heads import encode_for_reward

    tok = tiny_tokenizer()
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    ids, fits = encode_for_reward(tok, [msg("user", long_prompt)], "It is blue.", 24)
    assert fits and len(ids) == 24
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")  # the reward is read at the end-of-turn
    assert tok.decode(ids).endswith("It is blue.<|im_end|>")
    rep = DataReport()
    groups = build_groups([_pref(long_prompt, "It is blue. " * 20, "no", 1)], [0], tok, 24, "auto", rep)
    assert groups == [] and rep.skipped == {"response longer than max_len=24": 1}
    kept = build_groups([_pref(long_prompt, "It is blue. " * 20, "no", 1)], [0], tok, 24, "auto", DataReport(),
                        keep_long=True)
    assert len(kept) == 1 and all(len(s) == 24 for s in kept[0].ids)


def test_pair_expansion_and_split():
    tok = tiny_tokenizer()
    rk = Ranking([msg("user", "x")], [msg("assistant", a) for a in ("a", "b", "c")], {"line": 1})
    groups = build_groups([rk], [0], tok, 64, "auto", DataReport())
    pairs = expand_to_pairs(groups)
    ids = groups[0].ids
    assert [(p.ids[0], p.ids[1]) for p in pairs] == [(ids[0], ids[1]), (ids[0], ids[2]), (ids[1], ids[2])]
    tr, held = split_indices(100, 0.2, seed=0)
    assert len(held) == 20 and sorted(tr + held) == list(range(100)) and not set(tr) & set(held)
    assert split_indices(100, 0.2, seed=0) == (tr, held) and split_indices(100, 0.2, seed=1)[1] != held


# ---------------------------------------------------------------- the score
def _rm(seed: int = 0) -> tuple[RewardModel, object, int]:
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    pad = reward_pad_token(tok)
    return RewardModel.from_causal_lm(tiny_model(seed), pad_token_id=pad).eval(), tok, pad


def _seqs(tok) -> list[list[int]]:
    texts = ["Hello, how are you?<|im_end|>", "The quick brown fox jumps over the lazy dog. Please explain "
             "photosynthesis in simple words.<|im_end|>", "Yes.<|im_end|>"]
    return [tok(t)["input_ids"] for t in texts]


def test_last_token_index_and_positions():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 4]
    assert last_token_index(left).tolist() == [4, 4]
    assert position_ids_from_mask(left)[0].tolist() == [0, 0, 0, 1, 2]


def test_score_is_padding_and_batch_invariant():
    rm, tok, pad = _rm()
    seqs = _seqs(tok)
    with torch.no_grad():
        alone = torch.cat([rm.scores(*pad_batch([s], pad)) for s in seqs])
        right = rm.scores(*pad_batch(seqs, pad, "right"))
        left = rm.scores(*pad_batch(seqs, pad, "left"))
        # a different batch composition and pad value (pad == eos, as SmolLM2 ships it)
        mixed = rm.scores(*pad_batch([seqs[2], seqs[1] * 2, seqs[0]], tok.eos_token_id, "left"))
    assert torch.allclose(alone, right, atol=1e-5) and torch.allclose(alone, left, atol=1e-5)
    assert torch.allclose(mixed[[2, 0]], alone[[0, 2]], atol=1e-5)
    assert alone.std() > 1e-3  # the three sequences do score differently (the test can fail)


def test_hf_sequence_classification_round_trip(tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm, tok, pad = _rm()
    rm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    note = json.loads((tmp_path / "reward_model.json").read_text())
    assert note["hf_class"] == "LlamaForSequenceClassification" and note["pad_token_id"] == pad != tok.eos_token_id
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == pad
    seqs = _seqs(tok)
    with torch.no_grad():
        ours = rm.scores(*pad_batch(seqs, pad, "right"))
        for side in ("right", "left"):
            ids, mask = pad_batch(seqs, pad, side)
            theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
            assert torch.allclose(ours, theirs, atol=1e-4), side
        back, tok2 = load_reward_model(tmp_path)
        assert torch.allclose(back.scores(*pad_batch(seqs, pad)), ours, atol=1e-6)
    assert tok2.pad_token_id == pad


def test_lora_reward_model_saves_merged_and_rides_on_a_policy_adapter(tmp_path):
    from chatforge.models.lora import LoraSettings, apply_lora

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    pad = reward_pad_token(tok)

    def noisy_lora(r: int):
        m = apply_lora(tiny_model(0), LoraSettings(r=r)).eval()
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.1)  # a non-zero adapter, so merging is tested
        return m

    rm = RewardModel.from_causal_lm(noisy_lora(4), pad_token_id=pad).eval()
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("score.") for n in trainable)
    ids, mask = pad_batch(_seqs(tok), pad)
    with torch.no_grad():
        want = rm.scores(ids, mask)
    rm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    merged, _ = load_reward_model(tmp_path)
    policy = noisy_lora(8)
    with torch.no_grad():
        before = policy(input_ids=ids, attention_mask=mask).logits
    grads = {n: p.requires_grad for n, p in policy.named_parameters()}
    shared, _ = load_reward_model(tmp_path, onto=policy, adapter_name="reward")
    with torch.no_grad():
        assert torch.allclose(merged.scores(ids, mask), want, atol=1e-5)
        assert torch.allclose(shared.scores(ids, mask), want, atol=1e-5)
        after = policy(input_ids=ids, attention_mask=mask).logits
    assert policy.active_adapter == "default" and torch.equal(before, after)
    assert grads == {n: p.requires_grad for n, p in policy.named_parameters() if n in grads}


# ---------------------------------------------------------------- learning
WORDS = ("apple banana cherry orange grape lemon water coffee tea milk bread rice fish chicken soup salad "
         "good bad great happy sad fast slow big small hot cold new old").split()


def marker_prefs(n: int, seed: int = 0) -> list[Preference]:
    """The response containing 'blue' always wins: a trivially separable preference."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choices(WORDS, k=4)) + "?"
        a = rng.choices(WORDS, k=rng.randint(2, 6))
        b = rng.choices(WORDS, k=rng.randint(2, 6))
        a.insert(rng.randint(0, len(a)), "blue")
        out.append(_pref(prompt, " ".join(a), " ".join(b), i + 1))
    return out


def tiny_cfg(tmp_path: Path, data: list[str], **kw) -> RMConfig:
    base = dict(model="tiny", data=data, out=str(tmp_path / "run"), precision="fp32", max_len=64, batch_size=8,
                grad_accum=1, lr=3e-3, warmup_steps=3, max_steps=30, log_every=5, eval_every=1000, save_every=1000,
                eval_batch_size=32)
    base.update(kw)
    return RMConfig(**base)


@pytest.mark.slow
def test_tiny_rm_learns_marker_word(tmp_path):
    data = tmp_path / "prefs.jsonl"
    write_jsonl(marker_prefs(200), data)
    cfg = tiny_cfg(tmp_path, [str(data)])
    cfg.validate()
    model_dir = train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_groups"] == 40 and summary["eval_acc"] > 0.95, summary
    assert summary["eval_acc_before"] < 0.9  # the untrained head's evaluation at step 0
    assert (tmp_path / "run" / "accuracy.png").exists() and (tmp_path / "run" / "DONE").exists()
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["heldout"]) == 40
    assert sum(1 for _ in open(tmp_path / "run" / "heldout.jsonl")) == 40
    scorer = load_scorer(tmp_path / "run")
    s = scorer.score([[msg("user", "tea?")]] * 2, ["milk blue tea", "milk tea"])
    assert s[0] > s[1]
    assert model_dir == tmp_path / "run" / "model"


def test_freeze_bottom_layers_only_top_trains():
    rm, tok, pad = _rm()
    assert rm.freeze_bottom(1) == 1
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm.", "score.")) for n in trainable)
    ids, mask = pad_batch(_seqs(tok), pad)
    rm.train()
    rm.scores(ids, mask).sum().backward()
    assert rm.model.layers[0].self_attn.q_proj.weight.grad is None
    assert rm.model.layers[1].self_attn.q_proj.weight.grad is not None
    with pytest.raises(Exception, match="has 2 layers"):
        rm.freeze_bottom(3)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def test_resume_continues_exactly(tmp_path):
    """2 steps + resume to 4 == 4 steps straight (constant lr, same data order)."""
    data = tmp_path / "prefs.jsonl"
    write_jsonl(marker_prefs(40), data)
    kw = dict(max_steps=4, schedule="constant", warmup_steps=0, save_every=2, eval_every=1000, log_every=1,
              batch_size=4, eval_fraction=0.25)
    straight = tiny_cfg(tmp_path / "a", [str(data)], **kw)
    train(straight)
    half = tiny_cfg(tmp_path / "b", [str(data)], **dict(kw, max_steps=2))
    train(half)
    train(tiny_cfg(tmp_path / "b", [str(data)], **kw), resume=True)
    a, b = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    rows = [json.loads(l) for l in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


class Killed(Exception):
    pass


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_after_kill_matches_straight_run(tmp_path, lora):
    data = tmp_path / "prefs.jsonl"
    write_jsonl(marker_prefs(40), data)
    kw = dict(max_steps=6, save_every=3, eval_every=2, log_every=1, grad_accum=2, batch_size=2, lora=lora,
              lr=1e-2 if lora else 3e-3, schedule="cosine", warmup_steps=2, eval_fraction=0.25)
    train(tiny_cfg(tmp_path / "straight", [str(data)], **kw))
    seen: list[list[list[int]]] = []

    def kill_at_3(step, model, idx):
        seen.append(idx)
        if step == 3:
            raise Killed

    cfg = tiny_cfg(tmp_path / "killed", [str(data)], **kw)
    run = tmp_path / "killed" / "run"
    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_3)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert len(seen) == 3 and all(len(ix) == 2 and all(len(mb) == 2 for mb in ix) for ix in seen)
    train(cfg, resume=True)
    a, b = _weights(tmp_path / "straight" / "run"), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and steps[-1] == 6
    # resuming a finished run changes nothing
    mtime = (run / "summary.json").stat().st_mtime
    train(cfg, resume=True)
    assert (run / "summary.json").stat().st_mtime == mtime


def test_cli_rm_kwise_then_score(tmp_path, capsys):
    from chatforge.cli import main

    data = tmp_path / "rank.jsonl"
    rng = random.Random(1)
    recs = []
    for i in range(30):  # 'blue' twice > once > never
        words = [rng.choices(WORDS, k=3) for _ in range(3)]
        texts = [" ".join(words[0] + ["blue", "blue"]), " ".join(words[1][:1] + ["blue"] + words[1][1:]),
                 " ".join(words[2])]
        recs.append(Ranking([msg("user", f"q{i}?")], [msg("assistant", t) for t in texts], {"line": i + 1}))
    recs.append(_pref("q?", "same", "same", 99))
    write_jsonl(recs, data)
    out = tmp_path / "run"
    assert main(["rm", "--model", "tiny", "--data", str(data), "--out", str(out), "--loss", "kwise",
                 "max_steps=3", "precision=fp32", "max_len=64", "log_every=1", "eval_every=1000"]) == 0
    text = capsys.readouterr().out
    assert "skipped: identical responses (a tie) 1" in text and "loss=kwise" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss_fn"] == "kwise" and summary["eval_rankings"] == 6 and "eval_tau" in summary
    scored = tmp_path / "scored.jsonl"
    assert main(["score", "--rm", str(out), "--data", str(out / "heldout.jsonl"), "-o", str(scored)]) == 0
    rows = [json.loads(l) for l in open(scored)]
    assert len(rows) == 6 and all(len(r["scores"]) == 3 and "tau" in r for r in rows)
    assert "pairwise accuracy" in capsys.readouterr().out
    assert main(["score", "--rm", str(out), "--prompt", "q?", "--response", "blue"]) == 0
    float(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["score", "--rm", str(out), "--prompt", "q?"]) == 2


def test_length_sorted_chunks_give_the_same_scores_in_the_right_slots():
    from chatforge.train.rm import Group, make_batch, to_matrix

    rm, tok, pad = _rm()
    a, b, c = _seqs(tok)
    groups = [Group([b, c], 0), Group([a, b, c], 1), Group([c, a], 2)]
    with torch.no_grad():
        want = {tuple(s): v for s, v in zip([a, b, c], rm.scores(*pad_batch([a, b, c], pad)).tolist())}
        for chunk in (0, 1, 2, 4):
            bt = make_batch(groups, pad, chunk)
            assert len(bt.input_ids) == (1 if chunk == 0 else math.ceil(7 / chunk))
            assert bt.tokens == 2 * len(a) + 2 * len(b) + 3 * len(c)
            m = to_matrix(rm(bt.input_ids, bt.attention_mask), bt.slot, bt.group_mask)
            for g, row, mask in zip(groups, m, bt.group_mask):
                got = row[mask].tolist()
                assert got == pytest.approx([want[tuple(s)] for s in g.ids], abs=1e-5)


def test_split_seed_keeps_the_held_out_set_when_the_training_seed_changes(tmp_path):
    from chatforge.train.rm import load_data

    data = tmp_path / "prefs.jsonl"
    write_jsonl(marker_prefs(50), data)
    tok = tiny_tokenizer()

    def held(**kw):
        _, h, _ = load_data(tiny_cfg(tmp_path, [str(data)], **kw), tok, log=lambda *_: None)
        return [g.record for g in h]

    assert held(seed=1, split_seed=0) == held(seed=0) != held(seed=1)

"""DPO: the losses against hand-computed values, the reference cache, LoRA adapter-off,
data expansion / rejection, the shared-prompt segment mask, learning a separable preference,
exact resume after a kill."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chatforge.config import load_config
from chatforge.data.pairs import DataReport, expand_pairs
from chatforge.data.records import Preference, Prompt, Ranking, msg
from chatforge.errors import ConfigError
from chatforge.train.dpo import DPOConfig, dpo_loss, reward_accuracy

T = torch.tensor


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and immune to OpenMP barrier stalls when
    the machine's cores are shared with other work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- the math
# pol_c=-10, pol_r=-12, ref_c=-11, ref_r=-11  ->  h = (-10+11) - (-12+11) = 2
LOGPS = (T([-10.0]), T([-12.0]), T([-11.0]), T([-11.0]))


def test_sigmoid_loss_hand_computed():
    loss, rc, rr = dpo_loss(*LOGPS, beta=0.1)
    # -log sigmoid(0.1 * 2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388693
    assert loss.item() == pytest.approx(0.5981388693, abs=1e-6)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)


def test_label_smoothing_hand_computed():
    loss, _, _ = dpo_loss(*LOGPS, beta=0.1, label_smoothing=0.1)
    # 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.9 * 0.5981388693 + 0.1 * 0.7981388693
    assert loss.item() == pytest.approx(0.6181388693, abs=1e-6)
    # the optimum of conservative DPO is a finite margin: the gradient vanishes at
    # sigmoid(beta h) = 1 - eps, i.e. beta h = log(0.9 / 0.1)
    h = torch.tensor([math.log(9) / 0.1], requires_grad=True)
    loss, _, _ = dpo_loss(h, T([0.0]), T([0.0]), T([0.0]), beta=0.1, label_smoothing=0.1)
    loss.sum().backward()
    assert abs(h.grad.item()) < 1e-6


def test_ipo_loss_hand_computed():
    assert dpo_loss(*LOGPS, beta=0.1, loss="ipo")[0].item() == pytest.approx((2 - 5) ** 2)   # target 1/(2*0.1) = 5
    assert dpo_loss(*LOGPS, beta=0.5, loss="ipo")[0].item() == pytest.approx((2 - 1) ** 2)   # target 1
    loss, rc, rr = dpo_loss(*LOGPS, beta=0.5, loss="ipo")
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


def test_policy_equal_reference_is_log2_and_chance():
    lp = torch.randn(64) * 30 - 50
    lr = torch.randn(64) * 30 - 50
    loss, rc, rr = dpo_loss(lp, lr, lp.clone(), lr.clone(), beta=0.1)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)))
    # convention: ties count half, so a policy identical to its reference sits at chance
    assert reward_accuracy(rc, rr).mean().item() == 0.5


def test_reward_accuracy_convention():
    acc = reward_accuracy(T([1.0, -1.0, 0.3, 0.2]), T([0.0, 0.0, 0.3, 0.5]))
    assert acc.tolist() == [1.0, 0.0, 0.5, 0.0]


def test_loss_gradient_pushes_chosen_up_rejected_down():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    for kind in ("sigmoid", "ipo"):
        pc.grad = pr.grad = None
        dpo_loss(pc, pr, T([-5.0]), T([-5.0]), beta=0.1, loss=kind)[0].sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item()


def test_config_validation():
    assert load_config(DPOConfig, overrides=[]).lr == 5e-6
    assert load_config(DPOConfig, overrides=["lora=true"]).lr == 5e-5
    assert load_config(DPOConfig, overrides=["lr=1e-4"]).lr == 1e-4
    for bad in (["beta=0"], ["label_smoothing=0.5"], ["loss=kto"], ["loss=ipo", "label_smoothing=0.1"], ["betta=1"]):
        with pytest.raises(ConfigError):
            load_config(DPOConfig, overrides=bad)


# ---------------------------------------------------------------- data
def test_rankings_expand_and_bad_pairs_are_reported():
    p = [msg("user", "hi")]
    a, b, c = msg("assistant", "good"), msg("assistant", "ok"), msg("assistant", "bad")
    recs = [
        Ranking(p, [a, b, c], {"source": "r.jsonl", "line": 1}),
        Preference(p, a, a, {"source": "p.jsonl", "line": 2}),
        Preference(p, a, msg("assistant", "  "), {"source": "p.jsonl", "line": 3}),
        Prompt(p, {"source": "p.jsonl", "line": 4}),
        Preference(p, a, c, {"source": "p.jsonl", "line": 5}),
    ]
    report = DataReport()
    pairs = expand_pairs(recs, report)
    assert [(x.chosen["content"], x.rejected["content"]) for x in pairs] == [
        ("good", "ok"), ("good", "bad"), ("ok", "bad"), ("good", "bad")]
    assert report.records == 5
    assert report.skipped == {"identical responses (a tie)": 1, "empty response": 1,
                              "prompt record (needs preference or ranking data)": 1}
    assert report.first[0] == "p.jsonl:2: identical responses (a tie)"


# ---------------------------------------------------------------- log-probs and the reference
def _tiny_pairs(n: int = 6, seed: int = 0):
    from chatforge.data.pairs import PairExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, 500, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(3, 500, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(3, 500, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        out.append(PairExample(p, c, c, r, r, [msg("user", str(i))]))
    return out


def _plain_logps(model, prompt: list[int], response: list[int]) -> float:
    """The textbook computation: one sequence, full logits, log_softmax, gather the next tokens."""
    ids, labels = prompt + response, [-100] * len(prompt) + response
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1)
    tgt = torch.tensor(labels[1:])
    keep = tgt != -100
    return lp[keep].gather(1, tgt[keep, None]).sum().item()


class _Acc:
    """Enough of an Accelerator for the reference pass on one process."""
    process_index, num_processes, is_main_process = 0, 1, True

    @staticmethod
    def autocast():
        from contextlib import nullcontext
        return nullcontext()


def test_cached_reference_equals_fresh_forward_of_frozen_model(tmp_path):
    from chatforge.models.logprobs import backbone_and_head
    from chatforge.models.tiny import tiny_model
    from chatforge.train.dpo import SequenceLogps, reference_logps

    model = tiny_model()
    assert backbone_and_head(model) is not None  # the response-only LM-head path is the one tested
    pairs = _tiny_pairs()
    cfg = DPOConfig(model="tiny", ref_batch_size=4)  # 6 pairs -> an uneven last batch, mixed lengths
    cache = tmp_path / "ref_logps.pt"
    ref = reference_logps(model, cfg, {"train": pairs}, pad_id=0, accelerator=_Acc(), cache=cache)["train"]
    fresh = [[_plain_logps(model, p.prompt_ids, p.chosen_ids), _plain_logps(model, p.prompt_ids, p.rejected_ids)]
             for p in pairs]
    assert torch.allclose(ref, torch.tensor(fresh), atol=1e-4)
    # the cache is reused for the same data, and ignored for different data
    assert cache.exists()
    saved = torch.load(cache, weights_only=True)  # tensors and a string only: nothing else is unpickled
    torch.save({"fingerprint": saved["fingerprint"], "logps": {"train": ref + 1}}, cache)
    assert torch.equal(reference_logps(model, cfg, {"train": pairs}, 0, _Acc(), cache)["train"], ref + 1)
    other = _tiny_pairs(seed=1)
    assert not torch.equal(reference_logps(model, cfg, {"train": other}, 0, _Acc(), cache)["train"][:1], ref[:1] + 1)
    # the training forward (chosen and rejected in one batch, shared prompt or not) agrees with the cache
    from chatforge.train.shared_prompt import pair_batch
    for share in (True, False):
        logps, ntok = SequenceLogps(model)(**pair_batch(pairs, 0, share_prompt=share))
        assert torch.allclose(logps, torch.cat([ref[:, 0], ref[:, 1]]), atol=1e-4)
        assert ntok.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]


def test_reference_pass_covers_exactly_the_planned_pairs():
    from chatforge.models.tiny import tiny_model
    from chatforge.train.core import batch_indices
    from chatforge.train.dpo import planned_pairs, reference_logps

    cfg = DPOConfig(model="tiny", batch_size=2, grad_accum=2)
    it = batch_indices(12, 2, 0)
    first = sorted({i for _ in range(4) for i in next(it)})   # 2 steps x 2 micro-batches
    assert planned_pairs(12, cfg, 2, 1) == first and len(first) == 8
    assert planned_pairs(12, cfg, 50, 1) == list(range(12))
    both = set()
    for rank in (0, 1):  # two processes: each rank's shard of every global batch counts
        it = batch_indices(12, 2, 0, rank, 2)
        both |= {i for _ in range(2) for i in next(it)}
    assert planned_pairs(12, cfg, 1, 2) == sorted(both) and len(both) == 8
    pairs = _tiny_pairs(12)
    ref = reference_logps(tiny_model(), cfg, {"train": pairs}, 0, _Acc(), None, needed={"train": first})["train"]
    done = ~torch.isnan(ref).any(1)
    assert done.nonzero()[:, 0].tolist() == first


def test_lora_adapter_off_gives_base_model_logps():
    from chatforge.models.lora import LoraSettings, apply_lora
    from chatforge.models.tiny import tiny_model
    from chatforge.train.dpo import reference_logps, score_pairs, SequenceLogps

    pairs = _tiny_pairs()
    base = [[_plain_logps(tiny_model(), p.prompt_ids, p.chosen_ids),
             _plain_logps(tiny_model(), p.prompt_ids, p.rejected_ids)] for p in pairs]
    model = apply_lora(tiny_model(), LoraSettings(r=4, dropout=0.0))
    with torch.no_grad():  # a trained adapter: B != 0, so adapter-on differs from the base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    on = score_pairs(SequenceLogps(model), pairs, 4, 0)
    assert not torch.allclose(on, torch.tensor(base), atol=1e-2)
    off = reference_logps(model, DPOConfig(model="tiny", lora=True), {"train": pairs}, 0, _Acc(), None)["train"]
    assert torch.allclose(off, torch.tensor(base), atol=1e-4)
    assert torch.allclose(score_pairs(SequenceLogps(model), pairs, 4, 0), on)  # adapter back on afterwards


# ---------------------------------------------------------------- end to end on the tiny model
GOOD = ["Yes.", "Thank you!", "Sure, here is an answer.", "It is blue.", "Plants use sunlight."]
BAD = ["No.", "Sorry, I cannot help with that.", "The sky is green.", "I like milk.", "bad terrible slow"]
TOPICS = ["apple", "banana", "cherry", "orange", "grape", "lemon", "water", "coffee", "tea", "milk", "bread",
          "rice", "fish", "chicken", "soup", "salad", "Monday", "Friday", "morning", "night", "the sea", "cats"]


def separable_prefs(path, n: int, seed: int) -> None:
    """Preference pairs whose chosen side always comes from GOOD and rejected from BAD:
    a preference a tiny model can learn and carry over to unseen prompts."""
    import random

    from chatforge.data.records import write_jsonl

    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        q = f"{rng.choice(['Tell me about', 'What is', 'Write a poem about', 'Say the word'])} {rng.choice(TOPICS)} " \
            f"{rng.randint(0, 1000)}?"
        recs.append(Preference([msg("user", q)], msg("assistant", rng.choice(GOOD)), msg("assistant", rng.choice(BAD))))
    write_jsonl(recs, path)


def tiny_cfg(tmp_path, **kw) -> DPOConfig:
    base = dict(model="tiny", data=[str(tmp_path / "train.jsonl")], eval_data=[str(tmp_path / "eval.jsonl")],
                out=str(tmp_path / "run"), precision="fp32", max_len=64, batch_size=8, grad_accum=1, lr=2e-3,
                warmup_steps=0, max_steps=24, log_every=4, eval_every=12, save_every=12, kl_prompts=3,
                kl_max_new_tokens=8, ref_batch_size=16)
    base.update(kw)
    return load_config(DPOConfig, overrides=base)


@pytest.fixture
def prefs(tmp_path):
    separable_prefs(tmp_path / "train.jsonl", 128, seed=0)
    separable_prefs(tmp_path / "eval.jsonl", 40, seed=1)
    return tmp_path


def test_tiny_model_learns_a_separable_preference(prefs):
    from chatforge.runs import read_metrics
    from chatforge.train.dpo import train

    out = train(tiny_cfg(prefs))
    rows = read_metrics(prefs / "run" / "metrics.jsonl")
    start = rows[0]
    assert start["step"] == 0
    # policy == reference at step 0: log 2, chance accuracy, zero KL
    assert start["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert start["eval_acc"] == 0.5
    assert abs(start["kl"]) < 1e-4
    summary = json.loads((prefs / "run" / "summary.json").read_text())
    assert summary["eval_acc"] > 0.9, summary              # held-out prompts, unseen during training
    assert summary["eval_margin"] > 0 and summary["eval_loss"] < 0.5
    assert "kl" in summary and summary["sample_len"] > 0
    assert summary["steps"] == 24 and summary["train_pairs"] == 128 and summary["eval_pairs"] == 40
    assert (out / "model.safetensors").exists() and (prefs / "run" / "dpo.png").exists()
    assert (prefs / "run" / "DONE").exists() and (prefs / "run" / "ref_logps.pt").exists()


def test_lora_ipo_learns_and_keeps_reference_as_adapter_off(prefs):
    from chatforge.train.dpo import train

    cfg = tiny_cfg(prefs, lora=True, loss="ipo", beta=0.5, lr=1e-2, max_steps=12, eval_every=12, save_every=12,
                   kl_prompts=2, kl_max_new_tokens=4)
    out = train(cfg)
    from chatforge.runs import read_metrics
    start = read_metrics(prefs / "run" / "metrics.jsonl")[0]
    # step 0: the adapter is zero, so policy == adapter-off reference: IPO loss (0 - 1/(2 beta))^2 = 1, no KL
    assert start["eval_loss"] == pytest.approx(1.0, abs=1e-5) and abs(start["kl"]) < 1e-5
    summary = json.loads((prefs / "run" / "summary.json").read_text())
    assert summary["eval_acc"] > 0.8, summary
    assert (out / "adapter_model.safetensors").exists()


def test_lora_dpo_on_an_adapter_policy_keeps_the_sft_adapter(prefs):
    """DPO from a LoRA SFT run: checkpoints name the SFT run as their base and ``model/`` is
    merged, so neither loads as the raw base model without the SFT behaviour."""
    from chatforge.models.load import load, resolve
    from chatforge.models.tiny import tiny_lora_run
    from chatforge.train.dpo import train

    tiny_lora_run(prefs / "sft")
    out = train(tiny_cfg(prefs, model=str(prefs / "sft"), lora=True, max_steps=2, eval_every=2, save_every=2,
                         kl_prompts=1, kl_max_new_tokens=2))
    assert resolve(out).kind == "hf"
    ck = prefs / "run" / "checkpoints" / "step-0000002"
    assert json.loads((ck / "adapter_config.json").read_text())["base_model_name_or_path"] == str(prefs / "sft")
    start, _ = load(prefs / "sft")
    raw, _ = load("tiny")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        s, r = start(ids).logits, raw(ids).logits
        for model in (load(out)[0], load(ck)[0]):
            got = model(ids).logits
            assert (got - s).abs().max() < (got - r).abs().max()  # the SFT policy moved a little, not the raw base


class Killed(Exception):
    pass


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_after_kill_matches_straight_run(prefs, lora):
    """Killed right after the step-3 checkpoint and resumed: the same metrics and the same
    final weights as a run that never stopped (and never silently restarted over)."""
    from chatforge.models.load import load_model
    from chatforge.runs import read_metrics
    from chatforge.train.dpo import train

    kw = dict(max_steps=6, save_every=3, eval_every=3, log_every=1, kl_prompts=0, grad_accum=2, batch_size=4,
              schedule="cosine", warmup_steps=2, lora=lora, lora_cfg={"dropout": 0.1})  # dropout: RNG restored too
    straight_dir = train(tiny_cfg(prefs, out=str(prefs / "straight"), **kw))
    straight = {k: v.float() for k, v in load_model(str(straight_dir)).state_dict().items()}

    def kill_at_3(step, model, idx):
        assert len(idx) == 2 and all(len(ix) == 4 for ix in idx)  # this rank's micro-batches of the step
        if step == 3:
            raise Killed

    cfg = tiny_cfg(prefs, **kw)
    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_3)
    run = prefs / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003" and not (run / "DONE").exists()
    with pytest.raises(ConfigError):  # never silently restarted over a run
        train(cfg)
    resumed = {k: v.float() for k, v in load_model(str(train(cfg, resume=True))).state_dict().items()}
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.allclose(straight[k], resumed[k], atol=1e-6), k
    keys = ["loss", "acc", "margin", "chosen_logp", "eval_loss"]
    strip = lambda rows: [{k: r[k] for k in ["step"] + keys if k in r} for r in rows]  # noqa: E731
    assert strip(read_metrics(run / "metrics.jsonl")) == strip(read_metrics(prefs / "straight" / "metrics.jsonl"))
    # resuming a finished run changes nothing
    mtime = (run / "summary.json").stat().st_mtime
    train(cfg, resume=True)
    assert (run / "summary.json").stat().st_mtime == mtime


def test_bad_records_are_reported_and_skipped(prefs, capsys):
    from chatforge.errors import DataError
    from chatforge.train.dpo import train

    lines = (prefs / "train.jsonl").read_text().splitlines()[:40]
    same = {"kind": "preference", "prompt": [msg("user", "hi")], "chosen": msg("assistant", "Yes."),
            "rejected": msg("assistant", "Yes."), "meta": {}}
    empty = dict(same, rejected=msg("assistant", ""))
    rank = {"kind": "ranking", "prompt": [msg("user", "hi")], "meta": {},
            "responses": [msg("assistant", x) for x in ("Yes.", "No.", "Sorry, I cannot help with that.")]}
    lines += [json.dumps(same), json.dumps(empty), "{not json", json.dumps(rank)]
    (prefs / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    train(tiny_cfg(prefs, data=[str(prefs / "mixed.jsonl")], max_steps=2, kl_prompts=0))
    summary = json.loads((prefs / "run" / "summary.json").read_text())
    assert summary["data"]["skipped"] == {"identical responses (a tie)": 1, "empty response": 1}
    assert summary["data"]["read_errors"] == 1
    assert summary["train_pairs"] == 40 + 3  # the ranking's three pairs
    out = capsys.readouterr().out
    assert "identical responses (a tie)" in out and "mixed.jsonl:42" in out
    (prefs / "useless.jsonl").write_text(json.dumps(same) + "\n" + json.dumps(empty) + "\n")
    with pytest.raises(DataError, match="no usable preference pairs"):
        train(tiny_cfg(prefs, data=[str(prefs / "useless.jsonl")], out=str(prefs / "run2")))


def test_truncation_keeps_prompt_end_and_shared_prefix():
    from chatforge.data.pairs import encode_pair
    from chatforge.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    long_prompt = [msg("user", "The quick brown fox jumps over the lazy dog. " * 20 + "What colour is the sky?")]
    pair = Preference(long_prompt, msg("assistant", "It is blue. " * 30), msg("assistant", "No."))
    ex = encode_pair(tok, pair, max_len=64)
    assert len(ex.prompt_ids) + len(ex.chosen_ids) <= 64 and len(ex.prompt_ids) + len(ex.rejected_ids) <= 64
    prompt_text = tok.decode(ex.prompt_ids)
    assert "sky?" in prompt_text and prompt_text.endswith("<|im_start|>assistant\n")  # the prompt's END survives
    assert len(ex.chosen_ids) >= 32                                                    # a response keeps max_len // 2
    assert tok.decode(ex.rejected_ids) == "No.<|im_end|>"                              # scored up to its end-of-turn
    assert ex.rejected_labels == ex.rejected_ids
    same_head = Preference(long_prompt, msg("assistant", "It is blue. " * 30 + "Yes."),
                           msg("assistant", "It is blue. " * 30 + "No."))
    assert "identical after truncation" in encode_pair(tok, same_head, max_len=64)


def test_cli(prefs):
    from chatforge.cli import main

    args = ["dpo", "--policy", "tiny", "--data", str(prefs / "train.jsonl"), "max_steps=2", "precision=fp32",
            "--out", str(prefs / "cli"), "--beta", "0.2", "kl_prompts=0", "max_len=64"]
    assert main(args) == 0
    cfg = (prefs / "cli" / "config.yaml").read_text()
    assert "beta: 0.2" in cfg and "max_steps: 2" in cfg and "model: tiny" in cfg
    # no --eval-data: the reward model's split (seed 0, eval_fraction 0.05 -> 6 of 128 records held out)
    from chatforge.data.split import split_indices
    split = json.loads((prefs / "cli" / "split.json").read_text())
    assert split["heldout"] == split_indices(128, 0.05, 0)[1] and len(split["heldout"]) == 6
    assert len((prefs / "cli" / "heldout.jsonl").read_text().splitlines()) == 6
    summary = json.loads((prefs / "cli" / "summary.json").read_text())
    assert (summary["train_pairs"], summary["eval_pairs"]) == (122, 6)
    assert main(args) == 2                                     # the run exists: --resume or --overwrite
    again = ["dpo", "--resume", "--policy", "tiny", "--data", str(prefs / "train.jsonl"), "--out", str(prefs / "cli"),
             "max_steps=3"]
    assert main(again) == 0                                    # continues with its saved config
    assert json.loads((prefs / "cli" / "summary.json").read_text())["steps"] == 3
    assert main(["dpo", "--policy", "tiny", "--data", str(prefs / "train.jsonl"), "betta=1"]) == 2


def test_segment_mask_and_gather_indices():
    from chatforge.train.shared_prompt import IGNORE, build_batch

    b = build_batch([([5, 6], [([7, 8], [7, IGNORE], 0), ([9], [9], 1)]), ([4], [([3], [3], 2)])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    m = b["attention_mask"][0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0],   # prompt: causal
                 [1, 1, 0, 0, 0],
                 [1, 1, 1, 0, 0],   # segment 1 sees the prompt and itself
                 [1, 1, 1, 1, 0],
                 [1, 1, 0, 0, 1]]   # segment 2 sees the prompt, not segment 1
    assert b["attention_mask"][1, 0].int().tolist()[3] == [0, 0, 0, 1, 0]  # padding: only itself
    # token 7 is predicted at the prompt's last position, 9 too (its own segment starts there); 8 is not scored
    assert list(zip(b["src_row"].tolist(), b["src_pos"].tolist(), b["target"].tolist(), b["seq"].tolist())) == [
        (0, 1, 7, 0), (0, 1, 9, 1), (1, 0, 3, 2)]


def test_shared_prompt_gradients_match_separate_sequences():
    from chatforge.models.tiny import tiny_model
    from chatforge.train.dpo import SequenceLogps
    from chatforge.train.shared_prompt import pair_batch

    pairs = _tiny_pairs(4, seed=3)
    grads = []
    for share in (True, False):
        model = tiny_model()
        logps, _ = SequenceLogps(model)(**pair_batch(pairs, 0, share_prompt=share))
        dpo_loss(logps[:4], logps[4:], logps[:4].detach() - 1, logps[4:].detach(), 0.1)[0].mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    eager = tiny_model()
    eager.set_attn_implementation("eager")  # the boolean segment mask becomes an additive one
    logps, _ = SequenceLogps(eager)(**pair_batch(pairs, 0, share_prompt=True))
    sdpa, _ = SequenceLogps(tiny_model())(**pair_batch(pairs, 0, share_prompt=False))
    assert torch.allclose(logps, sdpa, atol=1e-4)


def test_kl_estimate_matches_exact_kl_on_one_token():
    """With one sampled token the sequence KL is computable exactly from the logits; the
    Monte-Carlo estimate (policy samples, teacher-forced log-prob difference) must agree."""
    from chatforge.models.tiny import tiny_model, tiny_tokenizer
    from chatforge.train.dpo import kl_to_reference

    tok = tiny_tokenizer()
    policy = tiny_model()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    prompt = [msg("user", "What colour is the sky?")]
    cfg = DPOConfig(model="tiny", max_len=64, kl_max_new_tokens=1, ref_batch_size=64)
    est = kl_to_reference(policy, tok, [prompt] * 400, cfg)  # the reference is re-read from "tiny"
    from chatforge.data.tokenize import encode_prompt

    ids = torch.tensor([encode_prompt(tok, prompt)])
    with torch.no_grad():
        lp = torch.log_softmax(policy(ids).logits[0, -1], -1)
        lq = torch.log_softmax(tiny_model()(ids).logits[0, -1], -1)
    exact = (lp.exp() * (lp - lq)).sum().item()
    assert exact > 0.05
    assert est["kl"] == pytest.approx(exact, rel=0.25), (est, exact)
    assert est["sample_len"] == 1


def test_judge_win_rate_ties_and_differences(tmp_path):
    """The reward model scores both policies' greedy answers; identical policies tie (0.5),
    and the reported means are the judge's scores of exactly those answers."""
    from chatforge.models.heads import RewardModel, load_reward_model, reward_pad_token, score_texts
    from chatforge.models.lora import LoraSettings, apply_lora
    from chatforge.models.tiny import tiny_model, tiny_tokenizer
    from chatforge.train.dpo import judge_win_rate, sample

    tok = tiny_tokenizer()
    rm = RewardModel.from_causal_lm(tiny_model(seed=7), pad_token_id=reward_pad_token(tok)).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = [[msg("user", q)] for q in ("What is 2 + 2?", "Tell me a joke about cats.", "Hello, how are you?")]
    cfg = DPOConfig(model="tiny", judge=str(tmp_path / "rm"), judge_max_new_tokens=6, max_len=64)
    same = apply_lora(tiny_model(), LoraSettings(r=4))          # fresh adapter: B = 0, the start policy itself
    tie = judge_win_rate(same, tok, prompts, cfg)
    assert tie["win_rate"] == 0.5 and tie["judge_score_policy"] == tie["judge_score_start"]
    other = apply_lora(tiny_model(), LoraSettings(r=4, dropout=0.0))
    with torch.no_grad():
        for n, p in other.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    res = judge_win_rate(other, tok, prompts, cfg)
    judge, jtok = load_reward_model(tmp_path / "rm")
    ours = score_texts(judge, jtok, prompts, [t for _, _, t in sample(other, tok, prompts, cfg, 6, 0.0)])
    with other.disable_adapter():
        start = score_texts(judge, jtok, prompts, [t for _, _, t in sample(other, tok, prompts, cfg, 6, 0.0)])
    assert res["judge_score_policy"] == pytest.approx(sum(ours) / 3, abs=1e-5)
    assert res["judge_score_start"] == pytest.approx(sum(start) / 3, abs=1e-5)
    assert res["win_rate"] == sum((a > b) + 0.5 * (a == b) for a, b in zip(ours, start)) / 3

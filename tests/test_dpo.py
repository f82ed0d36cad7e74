"""DPO: the losses against hand-computed values, the reference cache, LoRA adapter-off,
data expansion / rejection, learning a separable preference, exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chatforge.config import load_config
from chatforge.data.records import Preference, Prompt, Ranking, msg
from chatforge.errors import ConfigError
from chatforge.train.dpo import DataReport, DPOConfig, dpo_loss, expand_pairs, reward_accuracy

T = torch.tensor


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
    assert report.skipped == {"identical chosen and rejected": 1, "empty response": 1,
                              "prompt record (DPO needs preference or ranking data)": 1}
    assert report.first[0] == "p.jsonl:2: identical chosen and rejected"


# ---------------------------------------------------------------- log-probs and the reference
def _tiny_pairs(n: int = 6, seed: int = 0):
    from chatforge.train.dpo import IGNORE, PairExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, 500, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(3, 500, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(3, 500, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        out.append(PairExample(p + c, [IGNORE] * len(p) + c, p + r, [IGNORE] * len(p) + r, [msg("user", str(i))]))
    return out


def _plain_logps(model, ids: list[int], labels: list[int]) -> float:
    """The textbook computation: full logits, log_softmax, gather the labelled next tokens."""
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
    from chatforge.models.tiny import tiny_model
    from chatforge.train.dpo import SequenceLogps, backbone_and_head, reference_logps

    model = tiny_model()
    assert backbone_and_head(model) is not None  # the response-only LM-head path is the one tested
    pairs = _tiny_pairs()
    cfg = DPOConfig(model="tiny", ref_batch_size=4)  # 6 pairs -> an uneven last batch, mixed lengths
    cache = tmp_path / "ref_logps.pt"
    ref = reference_logps(model, cfg, {"train": pairs}, pad_id=0, accelerator=_Acc(), cache=cache)["train"]
    fresh = [[_plain_logps(model, p.chosen_ids, p.chosen_labels), _plain_logps(model, p.rejected_ids, p.rejected_labels)]
             for p in pairs]
    assert torch.allclose(ref, torch.tensor(fresh), atol=1e-4)
    # the cache is reused for the same data, and ignored for different data
    assert cache.exists()
    torch.save({"fingerprint": torch.load(cache)["fingerprint"], "logps": {"train": ref + 1}}, cache)
    assert torch.equal(reference_logps(model, cfg, {"train": pairs}, 0, _Acc(), cache)["train"], ref + 1)
    other = _tiny_pairs(seed=1)
    assert not torch.equal(reference_logps(model, cfg, {"train": other}, 0, _Acc(), cache)["train"][:1], ref[:1] + 1)
    # the training forward (chosen and rejected in one padded batch) agrees with the cache
    from chatforge.train.dpo import collate_pairs
    logps, ntok = SequenceLogps(model)(**collate_pairs(pairs, 0))
    assert torch.allclose(logps, torch.cat([ref[:, 0], ref[:, 1]]), atol=1e-4)
    assert ntok.tolist() == [sum(l != -100 for l in p.chosen_labels[1:]) for p in pairs] + \
        [sum(l != -100 for l in p.rejected_labels[1:]) for p in pairs]


def test_lora_adapter_off_gives_base_model_logps():
    from chatforge.models.lora import LoraSettings, apply_lora
    from chatforge.models.tiny import tiny_model
    from chatforge.train.dpo import reference_logps, score_pairs, SequenceLogps

    pairs = _tiny_pairs()
    base = [[_plain_logps(tiny_model(), p.chosen_ids, p.chosen_labels),
             _plain_logps(tiny_model(), p.rejected_ids, p.rejected_labels)] for p in pairs]
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

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

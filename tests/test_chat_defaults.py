"""Chat defaults chosen from measurements (eval/chat_defaults.py) and read back by the chat."""

from __future__ import annotations

import json

import pytest

from chatforge.chat.session import run_sampling_defaults
from chatforge.errors import ConfigError
from chatforge.eval.chat_defaults import choose


def _row(score, loops, no_eos):
    return {"settings": {}, "score": score, "loop_rate": loops, "no_eos_rate": no_eos}


def test_a_higher_score_never_buys_more_degeneration():
    rows = [_row(1.0, 0.0, 0.0), _row(3.0, 0.5, 0.0), _row(2.0, 0.05, 0.1), _row(2.5, 0.0, 0.4)]
    # row 1 (loops 50 %) and row 3 (cut off 40 %) score higher but degenerate: row 2 is within slack of both bests
    assert choose(rows, slack=0.1) == 2
    assert choose(rows, slack=1.0) == 1  # no degeneration guard: the score alone
    # no judge: least degeneration, ties to the earlier candidate
    assert choose([_row(None, 0.2, 0.0), _row(None, 0.0, 0.1), _row(None, 0.1, 0.0)]) == 1


def test_a_choice_is_made_when_no_setting_is_near_the_best_on_both_rates():
    # the one that loops least is cut off most and the reverse (seen on a 2-step SFT model):
    # the choice falls to the lowest loop + no-EOS rate together, then the score
    rows = [_row(2.0, 0.0, 0.6), _row(1.0, 0.45, 0.0), _row(1.5, 0.25, 0.25), _row(1.9, 0.3, 0.3)]
    assert choose(rows, slack=0.1) == 2
    assert choose([_row(None, 0.0, 0.5), _row(None, 0.4, 0.0)], slack=0.05) == 1


def test_run_defaults_are_found_from_the_run_its_checkpoints_and_model_folder(tmp_path):
    run = tmp_path / "ppo"
    (run / "model").mkdir(parents=True)
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "config.yaml").write_text("template: chatml\n")
    assert run_sampling_defaults(str(run)) is None
    rec = {"settings": {"temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.1, "max_tokens": 512}}
    (run / "chat_defaults.json").write_text(json.dumps(rec))
    for where in (run, run / "model", run / "checkpoints" / "step-4"):
        got = run_sampling_defaults(str(where))
        assert got["temperature"] == 0.3 and got["repetition_penalty"] == 1.1 and got["source"].endswith(
            "chat_defaults.json")
    (run / "chat_defaults.json").write_text(json.dumps({"settings": {"temperature": -1}}))
    with pytest.raises(ConfigError, match="chat_defaults.json"):
        run_sampling_defaults(str(run))
    assert run_sampling_defaults("smollm2") is None


def test_chat_starts_from_the_runs_measured_settings_and_flags_win(tmp_path, monkeypatch):
    import argparse

    from chatforge.commands import chat as chat_cmd

    run = tmp_path / "ppo"
    run.mkdir()
    (run / "config.yaml").write_text("template: chatml\n")
    (run / "chat_defaults.json").write_text(json.dumps(
        {"settings": {"temperature": 0.3, "top_p": 0.8, "repetition_penalty": 1.1, "max_tokens": 512}}))
    made = {}

    class FakeSession:
        def __init__(self, engine, system=None, cfg=None):
            made["cfg"] = cfg

    monkeypatch.setattr("chatforge.chat.session.ChatSession", FakeSession)
    monkeypatch.setattr("chatforge.chat.session.load_engine", lambda *a, **k: None)
    monkeypatch.setattr("chatforge.models.load.check_model_exists", lambda m: None)
    p = argparse.ArgumentParser()
    chat_cmd.add_parser(p.add_subparsers())
    chat_cmd.build_session(p.parse_args(["chat", str(run)]))
    assert (made["cfg"].temperature, made["cfg"].top_p, made["cfg"].repetition_penalty) == (0.3, 0.8, 1.1)
    chat_cmd.build_session(p.parse_args(["chat", str(run), "--temperature", "0"]))
    assert made["cfg"].temperature == 0 and made["cfg"].repetition_penalty == 1.1
    chat_cmd.build_session(p.parse_args(["chat", str(tmp_path / "nothing-here")]))
    assert (made["cfg"].temperature, made["cfg"].top_p, made["cfg"].repetition_penalty) == (0.7, 0.9, 1.0)

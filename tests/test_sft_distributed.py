"""The SFT loop under ``torchrun`` with 2 CPU processes (gloo): the ranks end with identical
weights, and the data was sharded (each global batch split between the ranks), not
duplicated. (``accelerate launch --cpu --num_processes 2`` starts one process on this
machine, hence torchrun.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DRIVER = textwrap.dedent('''
    import hashlib, json, sys
    import torch
    torch.set_num_threads(1)
    from chatforge.config import load_config
    from chatforge.train.sft import SFTConfig, train_sft

    out, data, precision, lora = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "lora"
    cfg = load_config(SFTConfig, overrides=dict(
        model="tiny", data=[data], out=out, eval_fraction=0.2, max_len=48, pack=False, batch_size=2,
        grad_accum=2, max_steps=4, lr=5e-3, warmup_steps=0, log_every=1, eval_every=2, save_every=2,
        precision=precision, eval_at_start=False, lora=lora))
    seen, digest = [], {}

    def on_step(step, model, idx):
        import torch.distributed as dist
        seen.append([step, idx])
        h = hashlib.sha256()
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().contiguous().numpy().tobytes())
        digest["hash"] = h.hexdigest()
        digest["rank"] = dist.get_rank() if dist.is_initialized() else 0
        digest["world"] = dist.get_world_size() if dist.is_initialized() else 1

    train_sft(cfg, on_step=on_step)
    with open(f"{out}/rank{digest['rank']}.json", "w") as f:
        json.dump({"seen": seen, **digest}, f)
''')


def write_data(path: Path, n: int = 25) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            msgs = [{"role": "user", "content": f"What is {i} + {i}?"},
                    {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("precision,mode", [("auto", "full"), ("fp32", "full"), ("auto", "lora")])
def test_two_ranks_identical_weights_and_sharded_data(tmp_path, precision, mode):
    from chatforge.train.core import batch_indices

    data = tmp_path / "d.jsonl"
    write_data(data)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(driver), str(out), str(data), precision, mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2)
    assert r0["hash"] == r1["hash"]  # DDP kept the replicas identical

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    n, per_rank, accum = summary["train_rows"], 2, 2
    global_batches = batch_indices(n, per_rank * 2, seed=0)  # what one process with the global batch would take
    for (s0, idx0), (s1, idx1) in zip(r0["seen"], r1["seen"]):
        assert s0 == s1
        for m0, m1 in zip(idx0, idx1):
            assert len(m0) == len(m1) == per_rank
            assert not set(m0) & set(m1)  # sharded, not duplicated
            assert sorted(m0 + m1) == sorted(next(global_batches))  # together: exactly the global batch
    assert len(r0["seen"]) == 4 and all(len(i) == accum for _, i in r0["seen"])

    # the run folder is written once (rank 0), complete
    weights = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    assert (out / "DONE").exists() and (out / "model" / weights).exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert any("eval_loss" in r for r in rows)

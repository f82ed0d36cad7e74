"""The loop every method runs on: budget, stop agreement, logging, evaluation and checkpoint
cadence, checkpoints and exact resume -- on one process or many, through accelerate.

A method file keeps its algorithm in the open and hands the rest to :class:`Loop`::

    run = open_run(acc, cfg, resume, overwrite)
    ...                                        # data, model, optimizer, acc.prepare(...)
    loop = Loop(acc, run, cfg, steps, "sft", Checkpointer(acc, run, model, tokenizer, cfg),
                evaluate=evaluate)
    extra = loop.resume(resume)                # weights, optimizer, scheduler, RNG, step
    for step in loop:                          # stops at `steps` or at the budget, on every rank alike
        ...                                    # one optimizer step
        loop.record(tokens=n, loss=..., acc=...)
    return loop.finish(**summary)              # final checkpoint -> model/, summary.json, DONE

What it guarantees:

* **One budget**: ``max_minutes`` counts the time spent in the loop's steps (the method's
  body: rollouts, forwards, backwards, optimizer steps). Set-up (loading, tokenising, DPO's
  reference pass), evaluation and checkpoints are excluded, so two runs with the same budget
  got the same compute; ``budget_clock=cpu`` counts this process's CPU time divided by its
  threads instead of wall time (the same compute however busy a shared machine is). The time
  is kept in the checkpoint: a resumed run continues the budget, it does not restart it.
  The loop stops after the step that brings it within half a step of the budget (judged by
  the step just taken), so a run ends as near its budget as its step allows, under or
  over, instead of always up to one step over: a pipeline's stages keep to their parts
  (on a slow CPU one step can be most of a stage's part).
* **Ranks agree**: the out-of-time decision is reduced across ranks (max) every step, so all
  ranks stop after the same step; logged metrics are averaged over ranks (tokens summed).
* **Checkpoints are accelerate's** (``accelerator.save_state``): model, optimizer, scheduler
  and every rank's RNG state, so DDP, FSDP and DeepSpeed shard and gather as they must. Only
  trainable weights go into the trainer state (a LoRA checkpoint is megabytes, the frozen
  base is rebuilt from the start model); beside it the model in Hugging Face format (what
  ``chatforge eval``/``chat`` and plain transformers load) and ``loop.json`` (step, budget
  used, the method's own state such as PPO's KL controller). Nothing is unpickled on resume
  beyond tensors (``weights_only=True``).
* **Exact resume**: data order is a function of the step (``core.batch_indices``), the RNG
  streams of every rank are restored, evaluation runs under a forked RNG: a run killed and
  resumed ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch

from chatforge.errors import ConfigError
from chatforge.models.save import save_model
from chatforge.runs import Run, plot_curves
from chatforge.train.core import TrainConfig, is_sharded

STATE_DIR = "trainer_state"
LOOP_FILE = "loop.json"


# ---------------------------------------------------------------- the run folder
def begin(cfg: TrainConfig, resume: bool, check: tuple[str, ...] = ()):
    """The opening every trainer shares: the start model (and ``check``, e.g. a judge)
    exists -- before any weights are loaded --, a finished run is not redone, the
    accelerator. Returns the ``Accelerator``, or None when ``cfg.out`` is already finished."""
    from chatforge.models.load import check_model_exists
    from chatforge.train.core import setup_accelerator

    for name in (cfg.model, *check):
        check_model_exists(name)
    if resume and finished(cfg.out, cfg):
        print(f"{cfg.out} is finished (DONE); nothing to resume")
        return None
    return setup_accelerator(cfg)


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def finished(out: str | Path, cfg: TrainConfig) -> bool:
    """A run that completed its plan: DONE, not stopped by the budget, and at least the
    ``max_steps`` asked for now. Anything else, ``--resume`` continues."""
    out = Path(out)
    if not (out / "DONE").exists() or not (out / "summary.json").exists():
        return False
    s = json.loads((out / "summary.json").read_text())
    return not s.get("stopped_early") and (cfg.max_steps == 0 or s.get("steps", 0) >= cfg.max_steps)


def open_run(accelerator, cfg: TrainConfig, resume: bool, overwrite: bool) -> Run:
    """The run folder, on every rank after rank 0 has made (or emptied) it; config.yaml."""
    run = Run(cfg.out, resume=resume, overwrite=overwrite, is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if resume and accelerator.is_main_process:
        (run.path / "DONE").unlink(missing_ok=True)  # running again: not done until finish()
    run.write_config(cfg)
    return run


# ---------------------------------------------------------------- checkpoints
def _prefix_of(root: torch.nn.Module, inner: torch.nn.Module) -> str | None:
    for name, mod in root.named_modules():
        if mod is inner:
            return name
    return None


class Checkpointer:
    """Writes ``checkpoints/step-N`` (HF model + ``trainer_state/``) atomically from all ranks
    and restores it.

    ``model`` is what ``model/`` publishes (a transformers / peft model, or the reward model);
    ``extra_modules`` are saved beside it as ``NAME.safetensors`` (PPO's value head);
    ``weights_ctx`` is entered around saving and loading (bf16 compute weights switch to their
    fp32 masters there, see ``levers.MasterWeights``).
    """

    def __init__(self, accelerator, run: Run, model: torch.nn.Module, tokenizer, cfg: TrainConfig,
                 extra_modules: dict[str, torch.nn.Module] | None = None,
                 weights_ctx: Callable[[], ContextManager] = nullcontext):
        self.acc, self.run, self.model, self.tokenizer = accelerator, run, model, tokenizer
        self.keep_last = cfg.keep_last
        self.extra_modules = extra_modules or {}
        self.weights_ctx = weights_ctx
        self._hook = accelerator.register_save_state_pre_hook(self._trainable_only)

    @staticmethod
    def _trainable_only(models: list, weights: list[dict], output_dir: str) -> None:
        """accelerate hook: keep only trainable weights (and buffers) of each unsharded model."""
        for i, (m, sd) in enumerate(zip(models, weights)):
            frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
            if frozen:
                weights[i] = {k: v for k, v in sd.items() if k not in frozen}

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Collective: every rank calls it at the same step."""
        acc, run = self.acc, self.run
        tmp = run.checkpoint_tmp(step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / STATE_DIR).mkdir(parents=True)
        acc.wait_for_everyone()
        with self.weights_ctx():
            acc.save_state(str(tmp / STATE_DIR), safe_serialization=True)
            full = self._gathered_state()
            if acc.is_main_process:
                save_model(self.model, self.tokenizer, tmp, state_dict=full)
                self._save_extras(tmp)
                (tmp / STATE_DIR / LOOP_FILE).write_text(json.dumps({"step": step, **state}, indent=1) + "\n")
        acc.wait_for_everyone()
        final = run.publish_checkpoint(tmp, step, keep_last=self.keep_last)
        acc.wait_for_everyone()
        return final

    def _gathered_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP / DeepSpeed the full weights of ``model``, gathered (collective); None
        otherwise (``save_pretrained`` reads the live module)."""
        if not is_sharded(self.acc):
            return None
        prepared = self.acc._models[0]
        full = self.acc.get_state_dict(prepared)
        root = self.acc.unwrap_model(prepared)
        prefix = _prefix_of(root, self.model)
        if not self.acc.is_main_process or full is None:
            return None
        if prefix:
            full = {k[len(prefix) + 1:]: v for k, v in full.items() if k.startswith(prefix + ".")}
        return full

    def _save_extras(self, out: Path) -> None:
        from safetensors.torch import save_file

        for name, mod in self.extra_modules.items():
            sd = {k: v.detach().contiguous().cpu() for k, v in mod.state_dict().items()}
            save_file(sd, str(out / f"{name}.safetensors"))

    def load(self, ckpt: Path) -> dict[str, Any]:
        """Restore ``ckpt`` into the prepared objects (every rank); returns ``loop.json``."""
        from safetensors import safe_open

        st = ckpt / STATE_DIR
        if not (st / LOOP_FILE).exists():
            raise ConfigError(f"{ckpt}: no {STATE_DIR}/{LOOP_FILE} -- written by an older chatforge; "
                              f"start the run again with --overwrite")
        for i, m in enumerate(self.acc._models):  # a checkpoint of another model must not load partially
            f = st / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            if f.exists():
                with safe_open(str(f), framework="pt") as fh:
                    extra = set(fh.keys()) - set(m.state_dict().keys())
                if extra:
                    raise ConfigError(f"{ckpt}: weights do not match the model (e.g. {sorted(extra)[:3]})")
        with self.weights_ctx():
            self.acc.load_state(str(st), strict=False)
        return json.loads((st / LOOP_FILE).read_text())


# ---------------------------------------------------------------- the loop
class Loop:
    """Iterate ``for step in loop`` over optimizer steps 1..``total``; see the module doc.

    ``evaluate(final: bool) -> metrics`` runs on every rank at step 0 (``cfg.eval_at_start``),
    every ``eval_every`` steps and at the end, under a forked RNG; a method whose evaluation
    is rank-0 only returns ``{}`` elsewhere. ``state()`` returns the method's own JSON state
    for checkpoints (restored by :meth:`resume`). ``on_step(step)`` runs on every rank after
    each step (tests hash weights there or simulate a kill).
    """

    def __init__(self, accelerator, run: Run, cfg: TrainConfig, total: int, desc: str, saver: Checkpointer,
                 evaluate: Callable[[bool], dict[str, float]] | None = None,
                 state: Callable[[], dict[str, Any]] | None = None,
                 on_step: Callable[[int], None] | None = None, show: tuple[str, ...] = ("loss",),
                 plot: tuple[str, list[str], str] | None = None, scheduler=None):
        self.acc, self.run, self.cfg, self.total, self.desc = accelerator, run, cfg, total, desc
        self.saver, self._evaluate, self._state, self.on_step = saver, evaluate, state, on_step
        self.show, self.plot, self.scheduler = show, plot, scheduler
        self.step = 0
        self.train_s = 0.0                   # on the budget clock
        self.budget_s = 60 * cfg.max_minutes if cfg.max_minutes else math.inf
        self.stopped_early = False
        self.last_eval: dict[str, float] = {}
        self.first_eval: dict[str, float] = {}
        self._window: list[dict[str, float]] = []
        self._notes: dict[str, Any] = {}
        self._tokens = 0
        self._window_s = 0.0
        self.tokens_total, self.wall_s = 0, 0.0
        self._saved_at = -1

    # ---- resume ---------------------------------------------------------------
    def resume(self, resume: bool) -> dict[str, Any]:
        """Restore the newest checkpoint when ``resume`` and one exists; returns the method's
        state saved with it (``{}`` for a fresh run)."""
        ck = self.run.latest_checkpoint() if resume else None
        if ck is None:
            return {}
        st = self.saver.load(ck)
        self.step = int(st["step"])
        self.train_s = float(st.get("train_s", 0.0))
        self.tokens_total = int(st.get("tokens", 0))
        self.wall_s = float(st.get("wall_s", 0.0))
        self.first_eval = dict(st.get("first_eval", {}))
        self._saved_at = self.step
        self.run.truncate_metrics(self.step)
        self.acc.print(f"resumed from {ck} at step {self.step}")
        return dict(st.get("method", {}))

    # ---- iteration ------------------------------------------------------------
    def _clock(self) -> float:
        if self.cfg.budget_clock == "cpu":
            return time.process_time() / max(1, torch.get_num_threads())
        return time.perf_counter()

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is True on any (collective)."""
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def __iter__(self) -> Iterator[int]:
        from tqdm.auto import tqdm

        if self.step == 0 and self.cfg.eval_at_start:
            self.first_eval = self.evaluate(final=False)
        bar = tqdm(total=self.total, initial=self.step, desc=self.desc, disable=not self.acc.is_main_process,
                   dynamic_ncols=True)
        while self.step < self.total:
            c0, w0 = self._clock(), time.perf_counter()
            yield self.step + 1
            self.step += 1
            step_s = self._clock() - c0
            self.train_s += step_s
            self._window_s += time.perf_counter() - w0
            bar.update(1)
            out_of_time = self._agree(self.train_s + 0.5 * step_s > self.budget_s)
            last = self.step == self.total or out_of_time
            if self.step % self.cfg.log_every == 0 or last:
                row = self.flush()
                bar.set_postfix({k: f"{row[k]:.3g}" for k in self.show if isinstance(row.get(k), float)})
            if self._evaluate is not None and self.step % self.cfg.eval_every == 0 and not last:
                self.evaluate(final=False)
            if self.step % self.cfg.save_every == 0 and not last:
                self.save()
            if self.on_step is not None:
                self.on_step(self.step)
            if out_of_time and self.step < self.total:
                self.acc.print(f"max_minutes={self.cfg.max_minutes}: {self.train_s / 60:.2f} min of training "
                               f"at step {self.step}/{self.total}, within half a step of the budget; stopping")
                self.stopped_early = True
                break
        bar.close()
        if self._evaluate is not None:
            self.evaluate(final=True)

    # ---- metrics --------------------------------------------------------------
    def record(self, tokens: int = 0, **stats: float) -> None:
        """This rank's figures of the step just taken (every rank records the same keys)."""
        self._window.append({k: float(v) for k, v in stats.items() if v is not None})
        self._tokens += int(tokens)

    def note(self, **values: Any) -> None:
        """Values logged as they are at the next log line (counters, settings)."""
        self._notes.update(values)

    def flush(self) -> dict[str, Any]:
        """Average the window over its steps and over ranks, and log it (collective)."""
        keys = sorted({k for w in self._window for k in w})
        means = [sum(w[k] for w in self._window if k in w) / max(1, sum(1 for w in self._window if k in w))
                 for k in keys]
        vec = torch.tensor(means + [float(self._tokens)], dtype=torch.float64)
        if self.acc.num_processes > 1:
            vec = self.acc.reduce(vec.to(self.acc.device), reduction="sum").cpu()
            vec[:-1] /= self.acc.num_processes
        row: dict[str, Any] = dict(zip(keys, vec[:-1].tolist()))
        n_steps = max(1, len(self._window))
        tokens = int(vec[-1].item())
        if self.scheduler is not None:
            row["lr"] = self.scheduler.get_last_lr()[0]
        row.update(tokens_per_s=tokens / self._window_s if self._window_s > 0 else 0.0,
                   step_time_s=self._window_s / n_steps, train_min=self.train_s / 60, **self._notes)
        self.tokens_total += tokens
        self.wall_s += self._window_s
        self.run.log(self.step, **row)
        self._window, self._tokens, self._window_s, self._notes = [], 0, 0.0, {}
        return row

    def evaluate(self, final: bool) -> dict[str, float]:
        """Run the method's evaluation (all ranks) without touching the training RNG; log it."""
        if self._evaluate is None:
            return {}
        devices = [self.acc.device] if self.acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            m = self._evaluate(final)
        if m:
            self.last_eval = m
            self.run.log(self.step, **m)
            self.acc.print(f"step {self.step}{' (final)' if final else ''}: "
                           + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, (int, float))))
        return m

    # ---- saving ---------------------------------------------------------------
    def save(self) -> Path:
        state = {"train_s": self.train_s, "tokens": self.tokens_total, "wall_s": self.wall_s,
                 "first_eval": self.first_eval, "method": self._state() if self._state else {}}
        self._saved_at = self.step
        return self.saver.save(self.step, state)

    def finish(self, merge: bool = False, **summary: Any) -> Path:
        """Final checkpoint (with optimizer state: a finished run can be resumed for more
        steps) -> ``model/``, ``summary.json``, the plot, ``DONE``. Returns ``model/``."""
        if self._saved_at != self.step:
            self.save()
        run, acc = self.run, self.acc
        if acc.is_main_process:
            ck = run.latest_checkpoint()
            if merge:
                publish_merged(run, self.saver.model, self.saver.tokenizer, ck)
            else:
                run.publish_model(ck)
            base = {"steps": self.step, "planned_steps": self.total, "stopped_early": self.stopped_early,
                    "train_time_s": round(self.train_s, 1), "budget_clock": self.cfg.budget_clock,
                    "tokens_per_s": round(self.tokens_total / self.wall_s, 1) if self.wall_s > 0 else 0.0,
                    "world_size": acc.num_processes}
            base.update({f"{k}_before": v for k, v in self.first_eval.items() if isinstance(v, (int, float))})
            base.update({k: v for k, v in self.last_eval.items() if isinstance(v, (int, float))})
            base.update(summary)
            run.write_summary(**base)
            if self.plot is not None:
                name, keys, title = self.plot
                plot_curves(run.read_metrics(), keys, run.path / name, title=title)
            run.mark_done()
        acc.wait_for_everyone()
        return run.path / "model"


def publish_merged(run: Run, model, tokenizer, checkpoint: Path) -> Path:
    """``model/`` as full merged weights: the start policy was itself an adapter (merged
    into the backbone we trained on), so this run's adapter alone has no loadable base
    outside chatforge. Extra files of the checkpoint (a value head) are kept."""
    import copy
    import tempfile

    merged = copy.deepcopy(model).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-merged-", dir=run.path))
    save_model(merged, tokenizer, tmp)
    for extra in checkpoint.glob("value_head.safetensors"):
        shutil.copy2(extra, tmp / extra.name)
    dst = run.path / "model"
    if dst.exists():
        shutil.rmtree(dst)
    tmp.replace(dst)
    return dst


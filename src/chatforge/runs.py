"""The run folder every command writes, and its atomic checkpoints.

::

    runs/NAME/
      config.yaml          fully resolved config
      metrics.jsonl        one JSON object per logged step ({"step", "time", ...})
      summary.json         final figures, wall time, peak RSS
      *.png                curves
      checkpoints/
        step-0000100/      HF-format model (or adapter) + tokenizer + trainer_state/
        latest             text file naming the newest *complete* checkpoint
      model/               the final model, HF format
      DONE                 written last: the stage finished (pipeline skips it)

A checkpoint is written into ``checkpoints/.tmp-*`` and renamed into place; ``latest`` is
replaced with ``os.replace``. A run killed at any instant therefore leaves either the old or
the new checkpoint as "latest", never a half-written one.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from chatforge.errors import ConfigError

# The sampling settings measured best for a run's model (chatforge.eval.chat_defaults), which
# `chatforge chat RUN` and `chatforge serve RUN` start from.
CHAT_DEFAULTS_FILE = "chat_defaults.json"


def peak_rss_mb() -> float:
    """Peak resident set size of this process (and waited-for children) in MiB."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 1024 if sys.platform != "darwin" else ru / 2**20


def file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 minus the umask): ``mkstemp`` makes
    0o600 files, and a report or model card nobody else can read is a surprise. Linux tells
    the umask without changing it (``/proc/self/status``); elsewhere it is set and restored,
    a moment in which another thread's new file would get 0o666."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    os.chmod(tmp, file_mode())
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class Run:
    """A run folder. ``resume=False`` on a folder with checkpoints is an error, so a
    finished or interrupted run is never overwritten by accident."""

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.start = time.time()
        if self.path.exists() and not resume and is_main:
            has_work = (self.path / "checkpoints").exists() or (self.path / "DONE").exists()
            if has_work and not overwrite:
                raise ConfigError(f"{self.path} already holds a run; pass --resume to continue it "
                                  f"or --overwrite to start again")
            if has_work and overwrite:
                shutil.rmtree(self.path)
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)

    # ---- files -------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def write_config(self, cfg: Any) -> None:
        if not self.is_main:
            return
        from chatforge.config import dump_yaml

        dump_yaml(cfg, self.path / "config.yaml")

    def log(self, step: int, **metrics: Any) -> dict[str, Any]:
        row = {"step": step, "time": round(time.time() - self.start, 3)}
        row.update({k: _finite(float(v)) if hasattr(v, "__float__") and not isinstance(v, (bool, str)) else v
                    for k, v in metrics.items()})
        if self.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """On resume: forget rows logged after the checkpoint we resume from."""
        if not self.is_main or not self.metrics_path.exists():
            return
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def write_json(self, name: str, data: Any) -> None:
        if self.is_main:
            atomic_write_text(self.path / name, json.dumps(data, indent=2, default=str) + "\n")

    def write_summary(self, **summary: Any) -> dict[str, Any]:
        summary.setdefault("wall_time_s", round(time.time() - self.start, 2))
        summary.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
        self.write_json("summary.json", {k: _finite(v) for k, v in summary.items()})
        return summary

    def mark_done(self) -> None:
        if self.is_main:
            atomic_write_text(self.path / "DONE", time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")

    # ---- checkpoints ---------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step-{step:07d}"

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    def save_checkpoint(self, step: int, save: Callable[[Path], None], keep_last: int = 0) -> Path:
        """Call ``save(tmpdir)``, then publish it atomically as ``step-N`` and ``latest``.

        ``keep_last > 0`` prunes older checkpoints (the newest ``keep_last`` stay).
        """
        final = self.checkpoint_dir(step)
        if not self.is_main:
            return final
        ckroot = self.path / "checkpoints"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=ckroot))
        try:
            save(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.publish_checkpoint(tmp, step, keep_last)

    def checkpoint_tmp(self, step: int) -> Path:
        """Where every rank writes its part of checkpoint ``step`` before it is published (a
        name all ranks agree on, unlike a ``mkdtemp``)."""
        return self.path / "checkpoints" / f".tmp-{self.checkpoint_dir(step).name}"

    def publish_checkpoint(self, tmp: Path, step: int, keep_last: int = 0) -> Path:
        """Rank 0: rename a complete ``tmp`` to ``step-N``, point ``latest`` at it, prune."""
        final = self.checkpoint_dir(step)
        if not self.is_main:
            return final
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(self.path / "checkpoints" / "latest", final.name + "\n")
        if keep_last > 0:
            for old in list_checkpoints(self.path)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def publish_model(self, src: Path) -> Path:
        """Copy a checkpoint's model files to ``model/`` (atomic), without trainer state."""
        dst = self.path / "model"
        if not self.is_main:
            return dst
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=self.path))
        for item in src.iterdir():
            if item.name == "trainer_state":
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        return dst


def list_checkpoints(run: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_checkpoint(run: str | Path) -> Path | None:
    f = Path(run) / "checkpoints" / "latest"
    if f.is_file():
        d = f.parent / f.read_text().strip()
        if d.is_dir():
            return d
    return None


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a kill mid-write; the rest is intact
    return rows


def plot_curves(rows: Iterable[dict[str, Any]], keys: list[str], out: str | Path, title: str = "",
                x: str = "step") -> Path | None:
    """One PNG with a panel per metric key present in ``rows`` (skips absent keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    present = [k for k in keys if any(k in r and r[k] is not None for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.2), squeeze=False)
    for ax, k in zip(axes[0], present):
        pts = [(r[x], r[k]) for r in rows if k in r and r[k] is not None and x in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(k)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out

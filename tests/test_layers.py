"""The floors hold: imports only go down (data -> models -> generate / train -> eval / chat ->
pipeline / commands -> cli), no cycles -- checked on the source by scripts/check_layers.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_only_go_down():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/check_layers.py")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_checker_catches_a_climbing_import(tmp_path):
    """A copy of the tree with one import that climbs (data -> train) must fail."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    bad = src / "chatforge" / "data" / "records.py"
    bad.write_text(bad.read_text() + "\n\ndef _oops():\n    from chatforge.train import core  # noqa\n")
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts/check_layers.py", tmp_path / "scripts/check_layers.py")
    proc = subprocess.run([sys.executable, str(tmp_path / "scripts/check_layers.py")], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "chatforge.data.records" in proc.stdout + proc.stderr

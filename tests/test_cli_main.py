"""``python -m chatforge`` runs the CLI (as the ``chatforge`` script does)."""

from __future__ import annotations

import subprocess
import sys


def test_python_m_chatforge_help():
    r = subprocess.run([sys.executable, "-m", "chatforge", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "chat" in r.stdout


def test_python_m_chatforge_unknown_command_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "chatforge", "no-such-command"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr

"""bf16 autocast on a CPU is chosen by timing, not by the CPU's flags alone."""

from __future__ import annotations

import pytest

from chatforge.models import load as L


@pytest.fixture(autouse=True)
def fresh():
    L.fast_bf16_cpu.cache_clear()
    yield
    L.fast_bf16_cpu.cache_clear()


def test_the_override_decides_without_timing(monkeypatch):
    monkeypatch.setattr(L, "bf16_matmul_speedup", lambda *a, **k: pytest.fail("timed despite the override"))
    monkeypatch.setenv("CHATFORGE_CPU_BF16", "1")
    assert L.fast_bf16_cpu() is True
    L.fast_bf16_cpu.cache_clear()
    monkeypatch.setenv("CHATFORGE_CPU_BF16", "0")
    assert L.fast_bf16_cpu() is False


def test_a_bf16_flag_is_not_enough(monkeypatch, tmp_path):
    monkeypatch.delenv("CHATFORGE_CPU_BF16", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    real = L.Path
    monkeypatch.setattr(L, "Path", lambda p, *a: real(tmp_path / "cpuinfo") if str(p) == "/proc/cpuinfo" else real(p, *a))
    (tmp_path / "cpuinfo").write_text("flags : fpu avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(L, "bf16_matmul_speedup", lambda *a, **k: 0.6)   # the Xeon where bf16 ran at 0.6x fp32
    assert L.fast_bf16_cpu() is False
    L.fast_bf16_cpu.cache_clear()
    monkeypatch.setattr(L, "bf16_matmul_speedup", lambda *a, **k: 4.0)   # the EPYC where it ran at ~4x
    assert L.fast_bf16_cpu() is True
    L.fast_bf16_cpu.cache_clear()
    (tmp_path / "cpuinfo").write_text("flags : fpu avx2\n")                 # no bf16 flag: not even timed
    monkeypatch.setattr(L, "bf16_matmul_speedup", lambda *a, **k: pytest.fail("timed an AVX2-only CPU"))
    assert L.fast_bf16_cpu() is False


def test_the_speedup_is_a_positive_ratio():
    assert L.bf16_matmul_speedup(n=64, reps=2) > 0

"""A small C kernel for the matrix-vector products of CPU decoding.

Decoding one token reads every weight once and does 2 FLOPs per weight: it is bound by
memory bandwidth. PyTorch's CPU GEMM (MKL / oneDNN) is tuned for large matrices; for the
``[1..16, K] x [K, N]`` products of decoding it reaches ~10-12 GB/s here, a fraction of
what the memory delivers. This kernel streams each weight row once, dots it with all
batch rows (AVX-512 FMA for fp32, AVX-512-BF16 ``vdpbf16ps`` for bf16, plain loops the
compiler vectorises elsewhere), accumulates in fp32 and rounds like PyTorch
(round-to-nearest-even to bf16).

It is compiled on first use with the system C compiler (``cc -O3 -march=native -fopenmp``,
about a second) into ``~/.cache/chatforge/kernels/`` and loaded with ctypes. It links the
OpenMP runtime by soname, so it shares PyTorch's thread pool (``torch.set_num_threads``
applies). No compiler, or ``CHATFORGE_KERNELS=0``: :func:`load` returns None and the engine
uses ``torch.nn.functional.linear``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline uint16_t f2bf(float f) {  /* round to nearest even, as torch does */
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

#define TN 4  /* weight rows per tile */
#define TB 4  /* batch rows per tile */

/* Y[b, n] = sum_k X[b, k] * W[n, k]  (+ bias[n]);  X [B, K], W [N, K], Y [B, N], all contiguous. */
void linear_f32(const float* X, const float* W, const float* bias, float* Y, int64_t B, int64_t N, int64_t K) {
  #pragma omp parallel for schedule(static)
  for (int64_t n0 = 0; n0 < N; n0 += TN) {
    int64_t nr = N - n0 < TN ? N - n0 : TN;
    for (int64_t b0 = 0; b0 < B; b0 += TB) {
      int64_t br = B - b0 < TB ? B - b0 : TB;
      float out[TN][TB];
#ifdef __AVX512F__
      __m512 acc[TN][TB];
      for (int i = 0; i < TN; i++) for (int j = 0; j < TB; j++) acc[i][j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 w[TN], x[TB];
        for (int i = 0; i < TN; i++) w[i] = _mm512_maskz_loadu_ps(i < nr ? m : 0, W + (n0 + (i < nr ? i : 0)) * K + k);
        for (int j = 0; j < TB; j++) x[j] = _mm512_maskz_loadu_ps(j < br ? m : 0, X + (b0 + (j < br ? j : 0)) * K + k);
        for (int i = 0; i < TN; i++) for (int j = 0; j < TB; j++) acc[i][j] = _mm512_fmadd_ps(w[i], x[j], acc[i][j]);
      }
      for (int i = 0; i < nr; i++) for (int j = 0; j < br; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
#else
      for (int i = 0; i < nr; i++) for (int j = 0; j < br; j++) {
        const float* w = W + (n0 + i) * K; const float* x = X + (b0 + j) * K; float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t k = 0; k < K; k++) s += w[k] * x[k];
        out[i][j] = s;
      }
#endif
      for (int i = 0; i < nr; i++) for (int j = 0; j < br; j++)
        Y[(b0 + j) * N + n0 + i] = out[i][j] + (bias ? bias[n0 + i] : 0.f);
    }
  }
}

void linear_bf16(const uint16_t* X, const uint16_t* W, const uint16_t* bias, uint16_t* Y, int64_t B, int64_t N, int64_t K) {
  #pragma omp parallel for schedule(static)
  for (int64_t n0 = 0; n0 < N; n0 += TN) {
    int64_t nr = N - n0 < TN ? N - n0 : TN;
    for (int64_t b0 = 0; b0 < B; b0 += TB) {
      int64_t br = B - b0 < TB ? B - b0 : TB;
      float out[TN][TB];
#if defined(__AVX512F__) && defined(__AVX512BF16__)
      __m512 acc[TN][TB];
      for (int i = 0; i < TN; i++) for (int j = 0; j < TB; j++) acc[i][j] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        __mmask32 m = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1);
        __m512bh w[TN], x[TB];
        for (int i = 0; i < TN; i++) w[i] = (__m512bh)_mm512_maskz_loadu_epi16(i < nr ? m : 0, W + (n0 + (i < nr ? i : 0)) * K + k);
        for (int j = 0; j < TB; j++) x[j] = (__m512bh)_mm512_maskz_loadu_epi16(j < br ? m : 0, X + (b0 + (j < br ? j : 0)) * K + k);
        for (int i = 0; i < TN; i++) for (int j = 0; j < TB; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w[i], x[j]);
      }
      for (int i = 0; i < nr; i++) for (int j = 0; j < br; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
#else
      for (int i = 0; i < nr; i++) for (int j = 0; j < br; j++) {
        const uint16_t* w = W + (n0 + i) * K; const uint16_t* x = X + (b0 + j) * K; float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t k = 0; k < K; k++) s += bf2f(w[k]) * bf2f(x[k]);
        out[i][j] = s;
      }
#endif
      for (int i = 0; i < nr; i++) for (int j = 0; j < br; j++) {
        Y[(b0 + j) * N + n0 + i] = f2bf(out[i][j] + (bias ? bf2f(bias[n0 + i]) : 0.f));
      }
    }
  }
}
"""

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cc: str) -> Path:
    from chatforge.models.load import cache_dir

    key = hashlib.sha1("\0".join([SOURCE, cc, *FLAGS, platform.machine(), platform.node()]).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"linear-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "linear.c"
        src.write_text(SOURCE)
        subprocess.run([cc, *FLAGS, str(src), "-o", str(Path(tmp) / "linear.so")], check=True,
                       capture_output=True, timeout=120)
        os.replace(Path(tmp) / "linear.so", out)  # atomic: concurrent builders are fine
    return out


class Kernels:
    """ctypes bindings of the compiled kernel."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        self._fns = {torch.float32: lib.linear_f32, torch.bfloat16: lib.linear_bf16}
        for fn in self._fns.values():
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
            fn.restype = None

    def supports(self, weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and weight.dtype in self._fns and weight.is_contiguous()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear`` for a 2-D ``x`` of the weight's dtype (checked by the caller via :meth:`supports`)."""
        x = x.contiguous()
        N, K = weight.shape
        y = torch.empty((x.shape[0], N), dtype=x.dtype)
        self._fns[x.dtype](x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                           y.data_ptr(), x.shape[0], N, K)
        return y


@functools.cache
def load() -> Kernels | None:
    """The compiled kernels, or None (no compiler, not a CPU we build for, or disabled)."""
    if os.environ.get("CHATFORGE_KERNELS", "1") == "0" or platform.system() != "Linux":
        return None
    cc = _compiler()
    if cc is None:
        return None
    try:
        return Kernels(_build(cc))
    except (OSError, subprocess.SubprocessError):
        return None

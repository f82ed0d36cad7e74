"""Small C kernels for CPU decoding: matrix-vector products and the per-layer glue.

Decoding one token reads every weight once and does 2 FLOPs per weight: it is bound by
memory bandwidth. PyTorch's CPU GEMM (MKL / oneDNN) is tuned for large matrices; for the
``[1..16, K] x [K, N]`` products of decoding it reached ~10-12 GB/s on an Intel Sapphire
Rapids, a fraction of what the memory delivers. (On an AMD EPYC with AVX-512-BF16 oneDNN
does better than this file: the engine times both on the model's weights and takes the
faster, see :func:`chatforge.generate.fast.kernels_pay_off`.) This kernel streams each
weight row once, dots it with all batch rows (AVX-512 FMA for fp32, AVX-512-BF16
``vdpbf16ps`` for bf16, plain loops the compiler vectorises elsewhere), accumulates in fp32
and rounds like PyTorch (round-to-nearest-even to bf16).

The same file holds the small per-layer operations of a decode step (RMSNorm, rotary
embedding + KV-cache store, attention over the cache, SiLU-gate): each is one call here
instead of 5-10 PyTorch calls, whose fixed cost (~3-10 us each, ~180 us for the CPU SDPA
kernel) otherwise dominates a 135M model's step. They round every intermediate result to
the storage dtype exactly where PyTorch does, so bf16 results stay close to ``transformers``.

It is compiled on first use with the system C compiler (``cc -O3 -march=native -fopenmp``,
about a second) into ``~/.cache/chatforge/kernels/`` under a hash of the source, the flags, the
compiler and the CPU (:func:`cache_key`), and loaded with ctypes. It links the
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
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef uint16_t bf16;
static inline float bf2f(bf16 h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline bf16 f2bf(float f) {  /* round to nearest even, as torch does */
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  /* NaN stays NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}
/* LD: storage -> float; ST: float -> storage; RND: round a float as storing it would
   (torch rounds every intermediate result of a bf16 op to bf16: we do the same) */
#define LD_f32(x) (x)
#define ST_f32(x) (x)
#define RND_f32(x) (x)
#define LD_bf16(x) bf2f(x)
#define ST_bf16(x) f2bf(x)
#define RND_bf16(x) bf2f(f2bf(x))

#define LAYER_PTRS 16  /* per layer: in-norm, q w/b, k w/b, v w/b, o w/b, post-norm, gate w/b, up w/b, down w/b */
#define TN 4  /* weight rows per tile */
#define TB 4  /* batch rows per tile */

#ifdef __AVX512F__
/* r[k] = sum of the 16 lanes of v[k], for 16 vectors at once: a transpose-and-add tree
   (45 instructions instead of 16 separate horizontal sums of ~9 each) */
static inline __m512 hsum16(const __m512 v[16]) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; i++)  /* per 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3] */
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++)  /* per block: one partial sum of each of 4 vectors */
    x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44), _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; i++)  /* fold blocks 2,3 onto 0,1 */
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x44), _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}
#endif

/* acc[i][j] = dot(W[n0 + i], X[b0 + j]) for a TN x TB tile */
static inline void tile_f32(const float* X, const float* W, int64_t n0, int64_t nr, int64_t b0, int64_t br,
                            int64_t K, float out[TN][TB]) {
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
  float sums[TN * TB];
  _mm512_storeu_ps(sums, hsum16(&acc[0][0]));
  for (int i = 0; i < nr; i++) for (int j = 0; j < br; j++) out[i][j] = sums[i * TB + j];
#else
  for (int i = 0; i < nr; i++) for (int j = 0; j < br; j++) {
    const float* w = W + (n0 + i) * K; const float* x = X + (b0 + j) * K; float s = 0.f;
    #pragma omp simd reduction(+:s)
    for (int64_t k = 0; k < K; k++) s += w[k] * x[k];
    out[i][j] = s;
  }
#endif
}

static inline void tile_bf16(const bf16* X, const bf16* W, int64_t n0, int64_t nr, int64_t b0, int64_t br,
                             int64_t K, float out[TN][TB]) {
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
  float sums[TN * TB];
  _mm512_storeu_ps(sums, hsum16(&acc[0][0]));
  for (int i = 0; i < nr; i++) for (int j = 0; j < br; j++) out[i][j] = sums[i * TB + j];
#else
  for (int i = 0; i < nr; i++) for (int j = 0; j < br; j++) {
    const bf16* w = W + (n0 + i) * K; const bf16* x = X + (b0 + j) * K; float s = 0.f;
    #pragma omp simd reduction(+:s)
    for (int64_t k = 0; k < K; k++) s += bf2f(w[k]) * bf2f(x[k]);
    out[i][j] = s;
  }
#endif
}

#define DEFINE_OPS(T, S)                                                                                      \
/* Y = R + alpha * (X W^T + bias): X [B, K], W [N, K], R and Y [B, N] (R, bias optional). Rounded   \
   to T after each step, as `r + F.linear(x, w, b) * alpha` does (alpha: a LoRA scaling). */              \
void linear_##S(const T* X, const T* W, const T* bias, const T* R, T* Y, int64_t B, int64_t N, int64_t K,   \
                float alpha) {                                                                              \
  _Pragma("omp parallel for schedule(static)")                                                              \
  for (int64_t n0 = 0; n0 < N; n0 += TN) {                                                                  \
    int64_t nr = N - n0 < TN ? N - n0 : TN;                                                                 \
    for (int64_t b0 = 0; b0 < B; b0 += TB) {                                                                \
      int64_t br = B - b0 < TB ? B - b0 : TB;                                                               \
      float out[TN][TB];                                                                                    \
      tile_##S(X, W, n0, nr, b0, br, K, out);                                                               \
      for (int i = 0; i < nr; i++) for (int j = 0; j < br; j++) {                                           \
        int64_t o = (b0 + j) * N + n0 + i;                                                                  \
        float y = out[i][j] + (bias ? LD_##S(bias[n0 + i]) : 0.f);                                          \
        if (alpha != 1.0f) y = RND_##S(RND_##S(y) * alpha);                                                 \
        Y[o] = R ? ST_##S(RND_##S(y) + LD_##S(R[o])) : ST_##S(y);                                           \
      }                                                                                                     \
    }                                                                                                       \
  }                                                                                                         \
}                                                                                                           \
/* LlamaRMSNorm: y = w * T(x * rsqrt(mean(x^2) + eps)), statistics in fp32 */                               \
void rmsnorm_##S(const T* X, const T* W, T* Y, int64_t B, int64_t H, float eps) {                          \
  for (int64_t b = 0; b < B; b++) {                                                                         \
    const T* x = X + b * H; T* y = Y + b * H; float ss = 0.f;                                               \
    for (int64_t i = 0; i < H; i++) { float v = LD_##S(x[i]); ss += v * v; }                                \
    float r = 1.0f / sqrtf(ss / (float)H + eps);                                                            \
    for (int64_t i = 0; i < H; i++) y[i] = ST_##S(LD_##S(W[i]) * RND_##S(LD_##S(x[i]) * r));                \
  }                                                                                                         \
}                                                                                                           \
static inline float rot_##S(const T* x, int64_t i, int64_t half, float c, float s) {                        \
  float r = i < half ? -LD_##S(x[i + half]) : LD_##S(x[i - half]);                                         \
  return RND_##S(LD_##S(x[i]) * c) + RND_##S(r * s);                                                        \
}                                                                                                           \
/* Rotary embedding of q (in place) and k, then k and v stored at column `col` of the caches           \
   [B, n_kv, Tmax, hd]. q [B, nH, hd], k and v [B, n_kv, hd], cos and sin [B, hd]. */                       \
void rope_store_##S(T* q, const T* k, const T* v, const T* cos, const T* sin, T* Kc, T* Vc, int64_t B,      \
                    int64_t nH, int64_t nKV, int64_t hd, int64_t Tmax, int64_t col) {                       \
  int64_t half = hd / 2; float tmp[hd];                                                                     \
  for (int64_t b = 0; b < B; b++) {                                                                         \
    const T* c = cos + b * hd; const T* s = sin + b * hd;                                                   \
    for (int64_t h = 0; h < nH; h++) {                                                                      \
      T* x = q + (b * nH + h) * hd;                                                                         \
      for (int64_t i = 0; i < hd; i++) tmp[i] = rot_##S(x, i, half, LD_##S(c[i]), LD_##S(s[i]));            \
      for (int64_t i = 0; i < hd; i++) x[i] = ST_##S(tmp[i]);                                               \
    }                                                                                                       \
    for (int64_t h = 0; h < nKV; h++) {                                                                     \
      const T* x = k + (b * nKV + h) * hd; int64_t off = ((b * nKV + h) * Tmax + col) * hd;                 \
      for (int64_t i = 0; i < hd; i++) Kc[off + i] = ST_##S(rot_##S(x, i, half, LD_##S(c[i]), LD_##S(s[i])));\
      memcpy(Vc + off, v + (b * nKV + h) * hd, hd * sizeof(T));                                             \
    }                                                                                                       \
  }                                                                                                         \
}                                                                                                           \
/* One query per (row, head) against cache columns [0, len) where valid; online softmax in fp32.      \
   Query head h reads KV head h / (nH / nKV) (grouped-query attention). out [B, nH, hd]. */                \
void attention_##S(const T* q, const T* Kc, const T* Vc, const uint8_t* valid, T* out, int64_t B,          \
                   int64_t nH, int64_t nKV, int64_t hd, int64_t Tmax, int64_t len, float scale) {          \
  int64_t rep = nH / nKV;                                                                                   \
  _Pragma("omp parallel for schedule(static)")                                                              \
  for (int64_t bh = 0; bh < B * nH; bh++) {                                                                 \
    int64_t b = bh / nH, g = (bh % nH) / rep;                                                               \
    const T* K = Kc + (b * nKV + g) * Tmax * hd; const T* V = Vc + (b * nKV + g) * Tmax * hd;               \
    const uint8_t* m = valid + b * Tmax;                                                                    \
    float qf[hd], acc[hd], mx = -INFINITY, sum = 0.f;                                                       \
    for (int64_t i = 0; i < hd; i++) { qf[i] = LD_##S(q[bh * hd + i]); acc[i] = 0.f; }                      \
    for (int64_t t = 0; t < len; t++) {                                                                     \
      if (!m[t]) continue;                                                                                  \
      const T* kt = K + t * hd; const T* vt = V + t * hd; float sc = 0.f;                                   \
      for (int64_t i = 0; i < hd; i++) sc += qf[i] * LD_##S(kt[i]);                                         \
      sc *= scale;                                                                                          \
      if (sc > mx) { float c = expf(mx - sc); sum *= c; for (int64_t i = 0; i < hd; i++) acc[i] *= c; mx = sc; } \
      float p = expf(sc - mx); sum += p;                                                                    \
      for (int64_t i = 0; i < hd; i++) acc[i] += p * LD_##S(vt[i]);                                         \
    }                                                                                                       \
    for (int64_t i = 0; i < hd; i++) out[bh * hd + i] = ST_##S(acc[i] / sum);                               \
  }                                                                                                         \
}                                                                                                           \
/* out = T(silu(g)) * u, as `F.silu(g) * u` */                                                              \
void silu_mul_##S(const T* g, const T* u, T* out, int64_t n) {                                              \
  for (int64_t i = 0; i < n; i++) { float x = LD_##S(g[i]); out[i] = ST_##S(RND_##S(x / (1.0f + expf(-x))) * LD_##S(u[i])); } \
}                                                                                                           \
/* Every decoder layer of one decode step, the same calls in the same order as the per-op path        \
   (so the same bits), without returning to Python between them. x [B, H] is updated in place.         \
   w: LAYER_PTRS pointers per layer (see kernels.Kernels.layers); scratch: h [B,H], q and a [B,nH*hd],    \
   k and v [B,nKV*hd], g and u [B,I]. */                                                                 \
void layers_##S(T* x, const T* const* w, T* const* Kc, T* const* Vc, int64_t L, T* h, T* q, T* k, T* v,    \
                T* a, T* g, T* u, const uint8_t* valid, const T* cos, const T* sin, int64_t B, int64_t H,   \
                int64_t nH, int64_t nKV, int64_t hd, int64_t I, int64_t Tmax, int64_t col, float eps,        \
                float scale) {                                                                              \
  for (int64_t l = 0; l < L; l++) {                                                                         \
    const T* const* p = w + LAYER_PTRS * l;                                                                 \
    rmsnorm_##S(x, p[0], h, B, H, eps);                                                                     \
    linear_##S(h, p[1], p[2], NULL, q, B, nH * hd, H, 1.0f);                                                \
    linear_##S(h, p[3], p[4], NULL, k, B, nKV * hd, H, 1.0f);                                               \
    linear_##S(h, p[5], p[6], NULL, v, B, nKV * hd, H, 1.0f);                                               \
    rope_store_##S(q, k, v, cos, sin, Kc[l], Vc[l], B, nH, nKV, hd, Tmax, col);                             \
    attention_##S(q, Kc[l], Vc[l], valid, a, B, nH, nKV, hd, Tmax, col + 1, scale);                        \
    linear_##S(a, p[7], p[8], x, x, B, H, nH * hd, 1.0f);  /* residual in place: element-wise, safe */      \
    rmsnorm_##S(x, p[9], h, B, H, eps);                                                                     \
    linear_##S(h, p[10], p[11], NULL, g, B, I, H, 1.0f);                                                    \
    linear_##S(h, p[12], p[13], NULL, u, B, I, H, 1.0f);                                                    \
    silu_mul_##S(g, u, g, B * I);                                                                           \
    linear_##S(g, p[14], p[15], x, x, B, H, I, 1.0f);                                                       \
  }                                                                                                         \
}

DEFINE_OPS(float, f32)
DEFINE_OPS(bf16, bf16)
"""

# -ffp-contract=off: no fused multiply-adds where torch rounds the product first
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _target(cc: str) -> str:
    """What the flags mean to this compiler on this CPU: its predefined macros under ``FLAGS``
    (``__VERSION__``, and what ``-march=native`` resolved to: ``__AVX2__``, ``__AVX512F__``,
    ``__AVX512BF16__``, ``__znver4__``, ...). Part of the cache key because the library is built
    for the CPU it was built on while the cache folder can outlive that CPU (a home directory
    shared between hosts, a container moved to another machine): a library built with
    AVX-512 loaded on an AVX2-only CPU dies on its first call with an illegal instruction."""
    r = subprocess.run([cc, *FLAGS, "-dM", "-E", "-x", "c", "-"], input="", capture_output=True, text=True,
                       check=True, timeout=60)
    return "\n".join(sorted(r.stdout.splitlines()))


def cache_key(cc: str) -> str:
    """sha256 of everything that decides the compiled library's bytes: the C source, the flags,
    the compiler (its resolved path; its version is in :func:`_target`) and the target CPU.
    A changed source, flag, compiler or CPU gets a new file name, never a stale library."""
    parts = [SOURCE, *FLAGS, shutil.which(cc) or cc, platform.machine(), _target(cc)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def library_path(cc: str) -> Path:
    """Where the library for :func:`cache_key` lives (``CHATFORGE_CACHE``/kernels)."""
    from chatforge.models.load import cache_dir

    return cache_dir() / "kernels" / f"decode-{cache_key(cc)[:32]}.so"


def _build(cc: str) -> Path:
    out = library_path(cc)
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
    """ctypes bindings of the compiled kernels (one set per dtype: fp32 and bf16).

    The callers (the fast decoder) guarantee contiguous CPU tensors of one dtype; these
    wrappers only allocate outputs and pass pointers.
    """

    DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        P, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        sigs = {"linear": [P] * 5 + [I] * 3 + [F], "rmsnorm": [P] * 3 + [I] * 2 + [F],
                "rope_store": [P] * 7 + [I] * 6, "attention": [P] * 5 + [I] * 6 + [F], "silu_mul": [P] * 3 + [I],
                "layers": [P] * 4 + [I] + [P] * 10 + [I] * 8 + [F] * 2}
        self.fns = {}
        for dtype, suffix in self.DTYPES.items():
            for name, argtypes in sigs.items():
                fn = getattr(lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, None
                self.fns[name, dtype] = fn

    def supports(self, weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and weight.dtype in self.DTYPES and weight.is_contiguous()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
        """``residual + F.linear(x, weight, bias) * alpha`` for a 2-D ``x``."""
        x = x.contiguous()
        N, K = weight.shape
        y = torch.empty((x.shape[0], N), dtype=x.dtype)
        self.fns["linear", x.dtype](x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                                    residual.data_ptr() if residual is not None else None, y.data_ptr(),
                                    x.shape[0], N, K, alpha)
        return y

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y = torch.empty(x.shape, dtype=x.dtype)  # (empty_like costs ~5 us, empty < 1 us)
        self.fns["rmsnorm", x.dtype](x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
        return y

    def rope_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   kc: torch.Tensor, vc: torch.Tensor, col: int) -> None:
        """Rotate ``q`` ([B, nH*hd]) in place; rotate ``k`` and store it and ``v`` at cache column ``col``."""
        B, n_kv, T, hd = kc.shape
        self.fns["rope_store", q.dtype](q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                        kc.data_ptr(), vc.data_ptr(), B, q.shape[1] // hd, n_kv, hd, T, col)

    def attention(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, valid: torch.Tensor, length: int,
                  scale: float) -> torch.Tensor:
        """Decode attention of ``q`` [B, nH*hd] over cache columns ``< length`` where ``valid`` [B, Tmax]."""
        B, n_kv, T, hd = kc.shape
        out = torch.empty(q.shape, dtype=q.dtype)
        self.fns["attention", q.dtype](q.data_ptr(), kc.data_ptr(), vc.data_ptr(), valid.data_ptr(), out.data_ptr(),
                                       B, q.shape[1] // hd, n_kv, hd, T, length, scale)
        return out

    LAYER_PTRS = 16  # as in the C source

    @staticmethod
    def pointers(tensors: list[torch.Tensor | None]) -> ctypes.Array:
        """A C array of the tensors' data pointers (NULL for None)."""
        return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])

    def layer_pointers(self, layers) -> ctypes.Array:
        """The weight pointers :meth:`layers` reads, ``LAYER_PTRS`` per Llama decoder layer
        (biases None when absent). Taken at each prefill: in-place training updates keep them."""
        tensors = []
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            for mod in (layer.input_layernorm, a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.post_attention_layernorm,
                        m.gate_proj, m.up_proj, m.down_proj):
                tensors += [mod.weight, mod.bias] if isinstance(mod, torch.nn.Linear) else [mod.weight]
        assert len(tensors) == self.LAYER_PTRS * len(layers)
        return self.pointers(tensors)

    def layers(self, x: torch.Tensor, weights: ctypes.Array, kc: list[torch.Tensor], kp: ctypes.Array,
               vp: ctypes.Array, scratch: dict[str, torch.Tensor], valid: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, n_heads: int, col: int, eps: float, scale: float) -> None:
        """All decoder layers of one step on ``x`` [B, H] in place (see ``layers_*`` in the C source).
        ``kp`` / ``vp``: :meth:`pointers` of the per-layer K / V caches ``kc`` / its twin."""
        B, H = x.shape
        _, n_kv, T, hd = kc[0].shape
        s = scratch
        self.fns["layers", x.dtype](x.data_ptr(), weights, kp, vp, len(kc), s["h"].data_ptr(), s["q"].data_ptr(),
                                    s["k"].data_ptr(), s["v"].data_ptr(), s["a"].data_ptr(), s["g"].data_ptr(),
                                    s["u"].data_ptr(), valid.data_ptr(), cos.data_ptr(), sin.data_ptr(), B, H,
                                    n_heads, n_kv, hd, s["g"].shape[1], T, col, eps, scale)

    def silu_mul(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        out = torch.empty(g.shape, dtype=g.dtype)
        self.fns["silu_mul", g.dtype](g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel())
        return out


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

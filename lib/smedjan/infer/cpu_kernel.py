"""A float32 matrix-vector kernel for CPU decoding, compiled on first use.

Decoding one token multiplies each weight matrix by one activation row: a
matrix-vector product that only streams the weights from memory. The BLAS behind
PyTorch's CPU matmul (MKL) reaches about half the memory bandwidth on such shapes on
some CPUs (AMD in particular); a plain AVX2/FMA dot product per weight row, as
llama.cpp's ggml does, reaches the rest. The kernel is a few lines of C, compiled with
the system's C compiler into a temporary folder the first time a process needs it and
loaded with ctypes (nothing is written anywhere else). It runs on the threads of
PyTorch's own OpenMP pool (the library links the libgomp that torch already loaded), so
`torch.set_num_threads` governs both.

Used only where it applies: an x86-64 CPU with AVX2 and FMA, float32, a compiler on
PATH, and not disabled with SMEDJAN_CPU_KERNEL=0. Anything else (or any failure to
build) leaves `load()` returning None and the caller on `torch.matmul`.

    k = load()
    if k is not None:
        y = k.gemv(w, x)      # w: float32 [out, in] contiguous; x: [n, in] with n <= MAX_ROWS -> [n, out]
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import torch

MAX_ROWS = 8  # activation rows per call: the weights are read once for all of them

SOURCE = r"""
#include <immintrin.h>
#include <math.h>

static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

/* dot(w, x) over n values: four independent 8-wide FMA chains, then the tail. */
static inline float dot(const float *w, const float *x, long n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++)
        s += w[i] * x[i];
    return s;
}

/* y[b, o] (+)= sum_i w[o, i] x[b, i], b < rows: each weight row is read once, for all rows. */
static void gemv(const float *w, const float *x, float *y, long out, long in, long rows, int add, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && out * in >= 65536)
    for (long o = 0; o < out; o++) {
        const float *wo = w + o * in;
        for (long b = 0; b < rows; b++) {
            float s = dot(wo, x + b * in, in);
            y[b * out + o] = add ? y[b * out + o] + s : s;
        }
    }
}

void smedjan_gemv(const float *w, const float *x, float *y, long out, long in, long rows, int threads) {
    gemv(w, x, y, out, in, rows, 0, threads);
}

/* y = x * rsqrt(|x|^2 + eps) per row (the gain is folded into the next matrix). */
static void norm(const float *x, float *y, long rows, long dim, float eps) {
    for (long b = 0; b < rows; b++) {
        const float *xb = x + b * dim;
        float r = 1.0f / sqrtf(dot(xb, xb, dim) + eps);
        for (long i = 0; i < dim; i++)
            y[b * dim + i] = xb[i] * r;
    }
}

typedef struct {
    const float *wqkv, *wo, *w13, *w2;  /* [out, in] row-major, as Runner stores them */
    const float *cos, *sin;             /* [positions, head_dim]; sin already signed [-s, +s] */
    long dim, n_heads, n_kv_heads, head_dim, ffn, window;
    float eps;
} Layer;

/* One decoder layer for one new token per row: x [rows, dim] is updated in place; row b's
   token sits at position pos[b], where its key and value are written; it attends to its
   own columns pos[b] - window + 1 .. pos[b] (all of 0 .. pos[b] without a window).
   Caches: [>= rows, n_kv_heads, max_len, head_dim]. scratch: rows * (dim + qkv + att + 3 ffn). */
void smedjan_layer(const Layer *L, float *x, long rows, const long *pos, float *kc, float *vc, long max_len,
                   float *scratch, int threads) {
    const long D = L->dim, H = L->n_heads, Hkv = L->n_kv_heads, hd = L->head_dim, F = L->ffn;
    const long nq = (H + 2 * Hkv) * hd, half = hd / 2, group = H / Hkv;
    float *h = scratch, *qkv = h + rows * D, *att = qkv + rows * nq, *g = att + rows * H * hd, *a = g + rows * 2 * F;

    norm(x, h, rows, D, L->eps);
    gemv(L->wqkv, h, qkv, nq, D, rows, 0, threads);
    for (long b = 0; b < rows; b++) {  /* RoPE on the Q and K heads, then K and V into the cache */
        const float *c = L->cos + pos[b] * hd, *s = L->sin + pos[b] * hd;
        for (long j = 0; j < H + Hkv; j++) {
            float *v = qkv + b * nq + j * hd, t[hd];
            for (long i = 0; i < hd; i++) t[i] = v[i];
            for (long i = 0; i < hd; i++) v[i] = t[i] * c[i] + t[(i + half) % hd] * s[i];
        }
        for (long j = 0; j < Hkv; j++) {
            float *kd = kc + ((b * Hkv + j) * max_len + pos[b]) * hd, *vd = vc + ((b * Hkv + j) * max_len + pos[b]) * hd;
            const float *ks = qkv + b * nq + (H + j) * hd, *vs = qkv + b * nq + (H + Hkv + j) * hd;
            for (long i = 0; i < hd; i++) { kd[i] = ks[i]; vd[i] = vs[i]; }
        }
    }
    /* attention, one (row, head) per task, with a one-pass (online) softmax: no score buffer */
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * H * (pos[0] + 1) >= 4096)
    for (long bh = 0; bh < rows * H; bh++) {
        const long b = bh / H, hh = bh % H, kv = hh / group;
        const long lo = L->window > 0 && pos[b] + 1 > L->window ? pos[b] + 1 - L->window : 0;
        const float *q = qkv + b * nq + hh * hd;
        const float *K = kc + (b * Hkv + kv) * max_len * hd, *V = vc + (b * Hkv + kv) * max_len * hd;
        float acc[hd], m = -INFINITY, l = 0.0f;
        for (long i = 0; i < hd; i++) acc[i] = 0.0f;
        for (long j = lo; j <= pos[b]; j++) {
            float sc = dot(q, K + j * hd, hd);  /* 1/sqrt(hd) is folded into Q */
            if (sc > m) {
                float r = expf(m - sc);
                for (long i = 0; i < hd; i++) acc[i] *= r;
                l *= r;
                m = sc;
            }
            float e = expf(sc - m);
            l += e;
            const float *vj = V + j * hd;
            for (long i = 0; i < hd; i++) acc[i] += e * vj[i];
        }
        for (long i = 0; i < hd; i++) att[b * H * hd + hh * hd + i] = acc[i] / l;
    }
    gemv(L->wo, att, x, D, H * hd, rows, 1, threads);
    norm(x, h, rows, D, L->eps);
    gemv(L->w13, h, g, 2 * F, D, rows, 0, threads);
    for (long b = 0; b < rows; b++)  /* SwiGLU: silu(gate) * up */
        for (long i = 0; i < F; i++) {
            float z = g[b * 2 * F + i];
            a[b * F + i] = z / (1.0f + expf(-z)) * g[b * 2 * F + F + i];
        }
    gemv(L->w2, a, x, D, F, rows, 1, threads);
}

/* logits [rows, vocab] = norm(x) @ head (the final norm's gain folded into head) */
void smedjan_head(const float *x, long rows, long dim, float eps, const float *head, long vocab, float *logits,
                  float *scratch, int threads) {
    norm(x, scratch, rows, dim, eps);
    gemv(head, scratch, logits, vocab, dim, rows, 0, threads);
}
"""


@dataclass(frozen=True)
class Shape:
    """The widths of a plain attention + SwiGLU layer."""

    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("wqkv", "wo", "w13", "w2", "cos", "sin")] + \
               [(name, ctypes.c_long) for name in ("dim", "n_heads", "n_kv_heads", "head_dim", "ffn", "window")] + \
               [("eps", ctypes.c_float)]


class Kernel:
    def __init__(self, lib: ctypes.CDLL):
        P, Lg, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        self._gemv = lib.smedjan_gemv
        self._gemv.argtypes = [P, P, P, Lg, Lg, Lg, I]
        self._layer = lib.smedjan_layer
        self._layer.argtypes = [ctypes.POINTER(_Layer), P, Lg, P, P, P, Lg, P, I]
        self._head = lib.smedjan_head
        self._head.argtypes = [P, Lg, Lg, ctypes.c_float, P, Lg, P, P, I]
        for f in (self._gemv, self._layer, self._head):
            f.restype = None

    def gemv(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] @ w.T for w float32 [out, in] contiguous, n <= MAX_ROWS: float32 [n, out]."""
        n, k = x.shape
        out = w.shape[0]
        x = x.contiguous()
        y = torch.empty((n, out), dtype=torch.float32)
        self._gemv(w.data_ptr(), x.data_ptr(), y.data_ptr(), out, k, n, torch.get_num_threads())
        return y

    @staticmethod
    def layer_spec(wqkv, wo, w13, w2, cos, sin, shape: "Shape", window: int, eps: float) -> "_Layer":
        """The C view of one layer's (contiguous float32) tensors; the caller keeps them alive."""
        return _Layer(wqkv.data_ptr(), wo.data_ptr(), w13.data_ptr(), w2.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                      shape.dim, shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.ffn, window, eps)

    @staticmethod
    def scratch_size(shape: "Shape", rows: int) -> int:
        s = shape
        return rows * (s.dim + (s.n_heads + 2 * s.n_kv_heads) * s.head_dim + s.n_heads * s.head_dim + 3 * s.ffn)

    def layer(self, spec: "_Layer", x: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scratch: torch.Tensor) -> None:
        """In place on x [n, dim]: one decoder layer for one token per row at positions pos (int64 [n])."""
        self._layer(ctypes.byref(spec), x.data_ptr(), x.shape[0], pos.data_ptr(), k.data_ptr(), v.data_ptr(),
                    k.shape[2], scratch.data_ptr(), torch.get_num_threads())

    def head(self, x: torch.Tensor, eps: float, head: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        n, dim = x.shape
        logits = torch.empty((n, head.shape[0]), dtype=torch.float32)
        self._head(x.data_ptr(), n, dim, eps, head.data_ptr(), head.shape[0], logits.data_ptr(), scratch.data_ptr(),
                   torch.get_num_threads())
        return logits


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


@lru_cache(maxsize=1)
def load() -> Kernel | None:
    """The compiled kernel, or None where it does not apply or cannot be built."""
    if os.environ.get("SMEDJAN_CPU_KERNEL", "1") == "0" or not _cpu_has_avx2_fma():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    with tempfile.TemporaryDirectory(prefix="smedjan-kernel-") as tmp:
        src, lib = os.path.join(tmp, "gemv.c"), os.path.join(tmp, "gemv.so")
        with open(src, "w") as f:
            f.write(SOURCE)
        # Without OpenMP (a compiler that lacks it) the same source builds single-threaded.
        for openmp in (["-fopenmp"], []):
            try:
                subprocess.run([cc, "-O3", "-mavx2", "-mfma", *openmp, "-shared", "-fPIC", src, "-o", lib],
                               check=True, capture_output=True, timeout=120)
                return Kernel(ctypes.CDLL(lib))  # the library stays mapped after the folder is removed
            except (OSError, subprocess.SubprocessError, AttributeError):
                continue
    return None

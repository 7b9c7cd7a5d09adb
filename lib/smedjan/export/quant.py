"""Reference q8_0 / q4_0 block quantizers in numpy, bit-exact with ggml's C reference.

GGML stores a quantized row of n floats (n a multiple of 32) as n/32 blocks:
- q8_0 (34 bytes): fp16 scale d = amax/127, then 32 int8 q = roundf(x/d) (half away from zero);
- q4_0 (18 bytes): fp16 scale d = m/-8 where m is the signed value of largest magnitude
  (the first one on ties), then 16 bytes of nibbles q = min(15, trunc(x/d + 8.5)); byte j
  holds element j in its low nibble and element j+16 in its high nibble.
This is `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` of ggml-quants.c, spelled out
independently of `gguf.quants` (the tests hold all three equal, byte for byte). Scales are
computed in float32, as in C, and rounded to fp16 with round-to-nearest-even. (A block whose
largest magnitude is below ~1e-37 makes 1/d overflow, where C's float-to-int8 is undefined;
weights never come close.)

    blocks = quantize(w, "q4_0")          # w: float32 [rows, cols], cols % 32 == 0
    w_hat = dequantize(blocks, "q4_0")    # float32 [rows, cols]
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
# bytes per block of 32 values
BLOCK_BYTES = {"q8_0": 2 + 32, "q4_0": 2 + 16}
QUANT_TYPES = tuple(BLOCK_BYTES)


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % BLOCK:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of {BLOCK}")
    return x.reshape(-1, BLOCK)  # [n_blocks, 32]


def _reciprocal(d: np.ndarray) -> np.ndarray:
    # C: `id = d ? 1.0f/d : 0.0f`, in float32.
    out = np.zeros_like(d)
    nz = d != 0
    out[nz] = np.float32(1.0) / d[nz]
    return out


def _round_half_away(v: np.ndarray) -> np.ndarray:
    # roundf(): halves go away from zero. For |v| < 2**23 both trunc(v) and v - trunc(v) are
    # exact in float32, so comparing the fraction with 0.5 decides exactly as C does (adding
    # 0.5 first would round 0.49999997 up).
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= 0.5, np.sign(v), np.float32(0))


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 [..., n] -> uint8 [..., n/32*34]."""
    shape = x.shape
    b = _blocks(x)
    amax = np.abs(b).max(axis=1)  # [n_blocks]
    d = (amax / np.float32(127)).astype(np.float32)
    q = _round_half_away(b * _reciprocal(d)[:, None]).astype(np.int8)  # |q| <= 127
    out = np.empty((b.shape[0], BLOCK_BYTES["q8_0"]), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(*shape[:-1], shape[-1] // BLOCK * BLOCK_BYTES["q8_0"])


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """float32 [..., n] -> uint8 [..., n/32*18]."""
    shape = x.shape
    b = _blocks(x)
    # the signed value of the largest magnitude; argmax keeps the first of equal ones, as the
    # C loop's strict `amax < fabsf(v)` does. An all-zero block keeps C's initial max = +0.0
    # (so d = -0.0), even when it starts with -0.0 (where gguf.quants gives d = +0.0).
    m = b[np.arange(b.shape[0]), np.abs(b).argmax(axis=1)]
    m = np.where(m == 0, np.float32(0.0), m)
    d = (m / np.float32(-8)).astype(np.float32)
    v = (b * _reciprocal(d)[:, None]).astype(np.float32) + np.float32(8.5)  # float32 sum, as in C
    # (int8_t) truncates toward zero; v is in [0, 16.5] up to rounding, then MIN(15, .)
    q = np.minimum(np.trunc(v), 15).astype(np.uint8)
    out = np.empty((b.shape[0], BLOCK_BYTES["q4_0"]), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.reshape(*shape[:-1], shape[-1] // BLOCK * BLOCK_BYTES["q4_0"])


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    shape = data.shape
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES["q8_0"])
    d = b[:, :2].copy().view("<f2").astype(np.float32)  # [n_blocks, 1]
    q = b[:, 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(*shape[:-1], shape[-1] // BLOCK_BYTES["q8_0"] * BLOCK)


def dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    shape = data.shape
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES["q4_0"])
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    nib = b[:, 2:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.float32) - 8
    return (d * q).reshape(*shape[:-1], shape[-1] // BLOCK_BYTES["q4_0"] * BLOCK)


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    if qtype == "q8_0":
        return quantize_q8_0(x)
    if qtype == "q4_0":
        return quantize_q4_0(x)
    raise ValueError(f"unknown quantization {qtype!r}; known: {', '.join(QUANT_TYPES)}")


def dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    if qtype == "q8_0":
        return dequantize_q8_0(data)
    if qtype == "q4_0":
        return dequantize_q4_0(data)
    raise ValueError(f"unknown quantization {qtype!r}; known: {', '.join(QUANT_TYPES)}")

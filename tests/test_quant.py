"""q8_0 / q4_0 blocks: our numpy reference == gguf.quants == ggml's own C reference, byte for byte."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from smedjan.export import quant as Q

GGUF_TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


def _libggml():
    # llama-cpp-python ships the ggml it was built with; its quantize_row_*_ref are exported
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    for name in ("quantize_row_q8_0_ref", "quantize_row_q4_0_ref"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        getattr(lib, name).restype = None
    return lib


LIB = _libggml()


def ggml_c(x: np.ndarray, qtype: str) -> bytes:
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    out = np.zeros(x.size // Q.BLOCK * Q.BLOCK_BYTES[qtype], dtype=np.uint8)
    getattr(LIB, f"quantize_row_{qtype}_ref")(x.ctypes.data, out.ctypes.data, x.size)
    return out.tobytes()


def assert_all_equal(x: np.ndarray, qtype: str) -> np.ndarray:
    ours = Q.quantize(x, qtype)
    assert ours.dtype == np.uint8 and ours.shape == (*x.shape[:-1], x.shape[-1] // 32 * Q.BLOCK_BYTES[qtype])
    assert ours.tobytes() == ggml_c(x, qtype), "differs from ggml's C reference"
    theirs = gguf.quants.quantize(x, GGUF_TYPES[qtype]).reshape(-1, Q.BLOCK_BYTES[qtype])
    mine = ours.reshape(-1, Q.BLOCK_BYTES[qtype])
    # One known divergence of gguf.quants from C: a q4_0 block of zeros that starts with -0.0 gets
    # scale +0.0 there, -0.0 in C (C's running max starts at +0.0). Only d's sign bit differs.
    odd = np.zeros(len(mine), bool)
    if qtype == "q4_0":
        blocks = x.reshape(-1, 32)
        odd = (blocks == 0).all(axis=1) & np.signbit(blocks[:, 0])
        assert (theirs[odd, :2].view("<u2") ^ mine[odd, :2].view("<u2") == 0x8000).all()
        assert np.array_equal(theirs[odd, 2:], mine[odd, 2:])
    assert mine[~odd].tobytes() == theirs[~odd].tobytes(), "differs from gguf.quants"
    return ours


def adversarial() -> np.ndarray:
    rows = [
        np.zeros(32),                                    # all zero: d = 0, id = 0
        -np.zeros(32),                                   # -0.0: the sign of d follows C
        np.full(32, 1.0),                                # ties for the max: first one wins
        np.r_[-1.0, np.full(31, 1.0)],                   # |max| tie with opposite signs (q4_0 sign!)
        np.r_[1.0, np.full(31, -1.0)],
        np.linspace(-8, 8, 32),                          # q4_0: x/d lands on .5 boundaries
        np.arange(32) * 0.5 - 8,
        np.arange(-16, 16) * (127 / 16) / 2,             # q8_0 halves: round away from zero
        np.r_[127.0, np.arange(31) + 0.5],               # x/d exactly k + 0.5
        np.r_[1e30, np.ones(31)],                        # fp16 scale overflows to inf
        np.r_[-7e4, np.linspace(-1, 1, 31)],             # d beyond f16 range
        np.full(32, 1e-30),                              # tiny: fp16 scale underflows
        np.r_[np.full(16, 3.0), np.full(16, -3.0)],
        np.r_[0.49999997, np.zeros(30), 127.0],          # 0.49999997 must round to 0, not 1
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("qtype", Q.QUANT_TYPES)
def test_random_rows_bit_exact(qtype):
    rng = np.random.default_rng(0)
    for scale in (1e-3, 0.02, 1.0, 300.0):
        x = (rng.standard_normal((48, 256)) * scale).astype(np.float32)
        assert_all_equal(x, qtype)
    heavy = rng.standard_t(df=2, size=(16, 512)).astype(np.float32)  # outliers, like real weights
    assert_all_equal(heavy, qtype)


@pytest.mark.parametrize("qtype", Q.QUANT_TYPES)
def test_adversarial_rows_bit_exact(qtype):
    with np.errstate(all="ignore"):  # inf scales are the point of some rows
        assert_all_equal(adversarial(), qtype)


# Blocks whose largest magnitude is below ~1e-37 make 1/d overflow to inf, and C's (int8_t)inf is
# undefined behaviour: such inputs (never seen in weights) are outside the contract.
TINY = float(np.float32(1e-30))
value = st.one_of(st.just(0.0), st.just(-0.0), st.floats(TINY, 1e4, width=32), st.floats(-1e4, -TINY, width=32))


@settings(max_examples=150, deadline=None)
@given(x=hnp.arrays(np.float32, (2, 64), elements=value), qtype=st.sampled_from(Q.QUANT_TYPES))
def test_any_finite_rows_bit_exact(x, qtype):
    with np.errstate(all="ignore"):
        assert_all_equal(x, qtype)


@pytest.mark.parametrize("qtype,step,max_err_steps,qmax", [("q8_0", 1 / 127, 0.5, 127), ("q4_0", 1 / 8, 1.0, 8)])
def test_dequantized_error_bound(qtype, step, max_err_steps, qmax):
    # x - x_hat = (x/d - q) d + q (d - fp16(d)). q8_0 rounds: |x/d - q| <= 1/2; q4_0 rounds too, but
    # the clamp at 15 costs up to one whole step at the end opposite the block's max. fp16 keeps 11
    # significant bits, so |d - fp16(d)| <= d / 2048, times |q| <= qmax.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 128)).astype(np.float32)
    xh = Q.dequantize(Q.quantize(x, qtype), qtype)
    assert np.array_equal(xh, gguf.quants.dequantize(Q.quantize(x, qtype), GGUF_TYPES[qtype]))
    d = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) * step
    err = np.abs((x - xh).reshape(-1, 32))
    assert (err <= d * (max_err_steps + qmax / 2048) * (1 + 1e-6)).all()
    assert err.max() > d.min() * 0.1  # it does quantize


def test_layout_of_one_block():
    x = np.arange(32, dtype=np.float32) - 8  # max |x| = 23 at the end: d = -23/8
    b = Q.quantize_q4_0(x[None])[0]
    d = np.float16(-23 / 8)
    assert b[:2].tobytes() == d.tobytes()
    q = np.minimum(np.trunc(x / np.float32(-23 / 8) + 8.5), 15).astype(np.uint8)
    assert b[2] == q[0] | (q[16] << 4) and b[17] == q[15] | (q[31] << 4)
    b8 = Q.quantize_q8_0(x[None])[0]
    assert b8[:2].tobytes() == np.float16(23 / 127).tobytes() and b8[2:].view(np.int8)[-1] == 127


def test_rows_not_multiple_of_32_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.quantize(np.zeros((2, 48), np.float32), "q4_0")
    with pytest.raises(ValueError, match="unknown quantization"):
        Q.quantize(np.zeros((2, 32), np.float32), "q5_0")

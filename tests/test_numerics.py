"""numerics.lmul and numerics.bfp against hand-computed values and independent oracles."""

from __future__ import annotations

import numpy as np
import pytest

from winnow.errors import PassConfigError
from winnow.numerics import bfp_quantize, lmul, lmul_matmul, round_mantissa
from winnow.numerics.lmul import offset, offset_exponent

INF, NAN = np.inf, np.nan


def f32(*values) -> np.ndarray:
    return np.array(values, np.float32)


def test_offset_exponent_follows_the_paper():
    assert [offset_exponent(m) for m in range(1, 11)] == [1, 2, 3, 3, 4, 4, 4, 4, 4, 4]
    assert offset(3) == (127 << 23) - (1 << 20)


@pytest.mark.parametrize("m,x,y,expected", [
    (3, 1.0, 1.0, 1.125),          # 1 + 0 + 0 + 2^-3
    (3, 1.25, 1.25, 1.625),        # 1 + .25 + .25 + .125, no carry
    (2, 1.25, 1.25, 1.75),         # l(2) = 2: 1 + .25 + .25 + .25
    (3, 1.5, 1.5, 2.25),           # .5 + .5 + .125 >= 1 carries: 1.125 * 2^1
    (3, 3.0, -0.75, -2.25),        # 1.5*2^1 x -1.5*2^-1: carry, sign xor
    (3, -2.0, 3.0, -6.5),          # (1 + 0 + .5 + .125) * 2^2
    (4, 1.9375, 1.9375, 4.0),      # m=4, l=3: .9375*2 + .125 = 2 carries twice: 2^2
    (10, 1.9990234375, 1.9990234375, 4 * (1.998046875 + 0.0625 - 1)),  # m=10: two carries
    (3, 2.0 ** -63, 2.0 ** -63, 1.125 * 2.0 ** -126),   # smallest normal result
    (3, 2.0 ** -64, 2.0 ** -63, 0.0),                   # exponent underflow -> 0
    (3, 2.0 ** 100, 2.0 ** 100, INF),                   # exponent overflow -> inf
    (3, 1.5 * 2.0 ** 63, 1.5 * 2.0 ** 64, INF),         # the carry overflows
    (3, 0.0, 5.0, 0.0),
    (3, 1e-40, 5.0, 0.0),                               # subnormal input flushes
    (3, INF, 2.0, INF),
    (3, -INF, 2.0, -INF),
    (3, INF, 0.0, NAN),
    (3, NAN, 1.0, NAN),
])
def test_lmul_hand_computed(m, x, y, expected):
    got = lmul(f32(x), f32(y), m)[0]
    if np.isnan(expected):
        assert np.isnan(got)
    else:
        assert got == np.float32(expected)


def test_lmul_zero_sign_is_the_xor():
    got = lmul(f32(-0.0, 0.0, -1e-40, 2.0 ** -64), f32(3.0, -3.0, 2.0, -(2.0 ** -63)), 3)
    assert list(np.signbit(got)) == [True, True, True, True] and not got.any()


def test_round_mantissa_ties_to_even_and_carries():
    assert list(round_mantissa(f32(1.3, 1.375, 1.125, 1.625, -1.9375), 2)) == \
        [1.25, 1.5, 1.0, 1.5, -2.0]
    assert round_mantissa(f32(3.4e38), 3)[0] == INF


def test_lmul_against_an_independent_formula():
    """The integer add equals Mitchell's piecewise formula computed with frexp in float64."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4000) * 10.0 ** rng.uniform(-8, 8, 4000)).astype(np.float32)
    y = (rng.standard_normal(4000) * 10.0 ** rng.uniform(-8, 8, 4000)).astype(np.float32)
    for m in (1, 2, 3, 4, 6, 10):
        xr, yr = (round_mantissa(v, m).astype(np.float64) for v in (x, y))
        (fx, ex), (fy, ey) = np.frexp(np.abs(xr)), np.frexp(np.abs(yr))
        s = (2 * fx - 1) + (2 * fy - 1) + 2.0 ** -offset_exponent(m)
        f = np.where(s < 1, 1 + s, np.where(s < 2, 2 * s, 4 * (s - 1)))
        expected = np.sign(xr) * np.sign(yr) * f * np.exp2(ex + ey - 2.0)
        np.testing.assert_array_equal(lmul(x, y, m), expected.astype(np.float32))


def test_lmul_relative_error_is_bounded_and_shrinks_with_m():
    """Against the product of the rounded inputs, Mitchell's approximation loses at most 1/9
    (mantissas .5 and .5) and the correction adds at most 2^-l(m); against the exact product the
    mean error falls as m grows."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 20000)).astype(np.float32)
    means = []
    for m in (1, 2, 3, 4, 8):
        got = lmul(x, y, m).astype(np.float64)
        rounded = round_mantissa(x, m).astype(np.float64) * round_mantissa(y, m)
        rel = got / rounded - 1
        assert rel.min() >= -1 / 9 - 1e-6 and rel.max() <= 2.0 ** -offset_exponent(m) + 1e-6
        means.append(np.abs(got / (x.astype(np.float64) * y) - 1).mean())
    assert means == sorted(means, reverse=True) and means[-1] < 0.05


def test_lmul_matmul_equals_sequential_lmul_sums():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 3, 5)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    got = lmul_matmul(a, b, 3)
    expected = np.zeros((2, 3, 4), np.float32)
    for i in range(2):
        for r in range(3):
            for c in range(4):
                acc = np.float32(0)
                for k in range(5):
                    acc = np.float32(acc + lmul(a[i, r, k], b[k, c], 3))
                expected[i, r, c] = acc
    np.testing.assert_array_equal(got, expected)
    assert (np.abs(got - a @ b) <= 0.25 * (np.abs(a) @ np.abs(b))).all()


@pytest.mark.parametrize("m", [0, 11, 2.5, True])
def test_lmul_refuses_bad_m(m):
    with pytest.raises(PassConfigError, match="m \\(mantissa bits\\)"):
        lmul(f32(1.0), f32(1.0), m)


def test_bfp_hand_computed():
    # max 1.9: E = 0, BFP12 step 2^(0-2) = .25; 1.9/.25 = 7.6 -> 8 clips to 7
    got = bfp_quantize(f32(1.0, 0.3, -0.2, 1.9, 0, 0, 0, 0), "bfp12", 8)
    np.testing.assert_array_equal(got, f32(1.0, 0.25, -0.25, 1.75, 0, 0, 0, 0))
    # BFP16: step 2^(0-6) = 1/64; 0.3*64 = 19.2 -> 19
    got = bfp_quantize(f32(1.0, 0.3, -0.2, 1.9, 0, 0, 0, 0), "bfp16", 8)
    np.testing.assert_array_equal(got, f32(1.0, 19 / 64, -13 / 64, 1.90625, 0, 0, 0, 0))
    # ties to even: max 4 -> step 1 (BFP12); 2.5 -> 2, 3.5 -> 4, -0.5 -> -0
    got = bfp_quantize(f32(4.0, 2.5, 3.5, -0.5, 0, 0, 0, 0), "bfp12", 8)
    np.testing.assert_array_equal(got, f32(4.0, 2.0, 4.0, -0.0, 0, 0, 0, 0))


def test_bfp_blocks_are_independent_and_padded():
    x = f32(100.0, 3.0, 1.0, 0.3, 1.0, 0.3, 0.2, 0.1, 1.0, 0.3)  # 10: blocks of 8, then 2 padded
    got = bfp_quantize(x, "bfp12", 8)
    assert got[1] == 0.0 and got[2] == 0.0          # step 16 next to 100
    np.testing.assert_array_equal(got[8:], f32(1.0, 0.25))  # own exponent in the padded block
    np.testing.assert_array_equal(bfp_quantize(x, "bfp12", 128), bfp_quantize(x, "bfp12", 16))


def test_bfp_along_an_axis_and_special_values():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 5)).astype(np.float32)
    np.testing.assert_array_equal(bfp_quantize(w, "bfp16", 32, axis=0),
                                  bfp_quantize(w.T, "bfp16", 32, axis=-1).T)
    x = f32(NAN, INF, 1.0, 0.3, 0, 0, 0, 0)
    got = bfp_quantize(x, "bfp12", 8)
    assert np.isnan(got[0]) and got[1] == INF and got[2] == 1.0 and got[3] == 0.25


def test_bfp_error_is_bounded_by_half_a_step():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 256)).astype(np.float32) * np.exp(rng.normal(0, 2, (16, 1)))
    for fmt, p in (("bfp12", 4), ("bfp16", 8)):
        for block in (32, 64, 128):
            got = bfp_quantize(x, fmt, block)
            top = np.abs(x).reshape(16, -1, block).max(-1, keepdims=True)
            step = np.exp2(np.floor(np.log2(top)) - (p - 2))
            err = np.abs(got - x).reshape(16, -1, block)
            assert (err <= step / 2 + (np.abs(x).reshape(err.shape) > (2 ** (p - 1) - 1) * step) * step).all()
            assert (err <= step).all()


@pytest.mark.parametrize("fmt,block", [("bfp8", 32), ("bfp12", 24), ("bfp12", 0)])
def test_bfp_refuses_bad_format_or_block(fmt, block):
    with pytest.raises(PassConfigError, match="bfp: "):
        bfp_quantize(f32(1.0), fmt, block)

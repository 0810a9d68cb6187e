"""L-Mul, "Addition is All You Need" (Luo & Sun, 2024): a float product as one integer add.

For x = (1 + xm) 2^xe and y = (1 + ym) 2^ye with m mantissa bits,
`lmul(x, y) = (1 + xm + ym + 2^-l(m)) 2^(xe + ye)`, sign = xor of the signs,
`l(m) = m` for m <= 3, 3 for m = 4, 4 for m > 4. It is computed as the paper's hardware does:
the sign-stripped float32 bit patterns (mantissas first rounded to m bits, to nearest even) are
added as integers and `OFFSET(m) = (127 << 23) - (1 << (23 - l(m)))` is subtracted.

Carry: when `xm + ym + 2^-l >= 1` the mantissa field overflows and the integer add carries into
the exponent, so the product is `(xm + ym + 2^-l) 2^(xe + ye + 1)` (Mitchell's approximation),
not the literal `(1 + xm + ym + 2^-l) 2^(xe + ye)`; for m >= 5 the sum can reach 2 and carries
twice: `(xm + ym + 2^-l - 1) 2^(xe + ye + 2)`. Special values: zero and subnormal inputs
flush to zero, a result below 2^-126 (exponent underflow) is zero, a result past the largest
exponent (overflow) is inf, never saturated (as float multiplication does); inf times a nonzero
is inf, inf times zero and anything with NaN is NaN. A zero result carries the xor of the signs.
"""

from __future__ import annotations

import numpy as np

from winnow.errors import PassConfigError

M_MIN, M_MAX = 1, 10
SIGN = np.uint32(0x80000000)
INF_BITS = 0x7F800000
NAN_BITS = 0x7FC00000
MIN_NORMAL_BITS = 0x00800000
FRACTION_BITS = 23


def check_m(m: int) -> int:
    """`m` as an int when it is a mantissa width L-Mul supports (1..10), else PassConfigError."""
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not M_MIN <= m <= M_MAX:
        raise PassConfigError(f"lmul: m (mantissa bits) must be an integer from {M_MIN} to "
                              f"{M_MAX}, got {m!r}.")
    return int(m)


def offset_exponent(m: int) -> int:
    """l(m): the correction term is 2^-l(m)."""
    m = check_m(m)
    return m if m <= 3 else 3 if m == 4 else 4


def offset(m: int) -> int:
    """The integer subtracted from the sum of two bit patterns: the exponent bias minus 2^-l(m)."""
    return (127 << FRACTION_BITS) - (1 << (FRACTION_BITS - offset_exponent(m)))


def round_mantissa(x: np.ndarray, m: int) -> np.ndarray:
    """float32 `x` with its mantissa rounded to `m` bits, to nearest, ties to even (a carry
    raises the exponent, past the largest it gives inf); NaN, inf and subnormals pass through."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    mag = (bits & np.uint32(0x7FFFFFFF)).astype(np.int64)
    drop = FRACTION_BITS - check_m(m)
    lsb = (mag >> drop) & 1
    rounded = (mag + (1 << (drop - 1)) - 1 + lsb) & ~((1 << drop) - 1)
    rounded = np.minimum(rounded, INF_BITS)
    keep = (mag >= INF_BITS) | (mag < MIN_NORMAL_BITS)
    mag = np.where(keep, mag, rounded)
    return ((bits & SIGN) | mag.astype(np.uint32)).view(np.float32)


def lmul(x: np.ndarray, y: np.ndarray, m: int) -> np.ndarray:
    """Elementwise L-Mul of two float32 arrays (broadcast) with `m` mantissa bits."""
    x, y = np.broadcast_arrays(np.asarray(x, np.float32), np.asarray(y, np.float32))
    bx, by = x.view(np.uint32), y.view(np.uint32)
    sign = (bx ^ by) & SIGN
    mx = _magnitude(round_mantissa(x, m))
    my = _magnitude(round_mantissa(y, m))
    nan = (mx > INF_BITS) | (my > INF_BITS)
    inf = (mx == INF_BITS) | (my == INF_BITS)
    zero = (mx < MIN_NORMAL_BITS) | (my < MIN_NORMAL_BITS)
    total = mx + my - offset(m)
    exponent = total >> FRACTION_BITS
    mag = np.where(exponent <= 0, 0, np.where(exponent >= 255, INF_BITS, total))
    mag = np.where(zero, 0, mag)
    mag = np.where(inf, np.where(zero, NAN_BITS, INF_BITS), mag)
    bits = np.where(nan | (inf & zero), NAN_BITS, sign | mag.astype(np.uint32))
    return bits.astype(np.uint32).view(np.float32)


def _magnitude(x: np.ndarray) -> np.ndarray:
    """The sign-stripped bit pattern as int64; subnormals (and zeros) become 0."""
    mag = (x.view(np.uint32) & np.uint32(0x7FFFFFFF)).astype(np.int64)
    return np.where(mag < MIN_NORMAL_BITS, 0, mag)


def lmul_matmul(a: np.ndarray, b: np.ndarray, m: int) -> np.ndarray:
    """`a @ b` (numpy matmul broadcasting) with every product an L-Mul, accumulated in float32
    in order k = 0, 1, ..., K-1."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise PassConfigError(f"lmul_matmul: shapes {a.shape} and {b.shape} do not multiply.")
    out = np.zeros(np.broadcast_shapes(a.shape[:-1] + (1,), b.shape[:-2] + (1, b.shape[-1])),
                   np.float32)
    for k in range(a.shape[-1]):
        out += lmul(a[..., :, k:k + 1], b[..., k:k + 1, :], m)
    return out

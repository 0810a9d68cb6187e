"""Block floating point (BFP): blocks of n contiguous elements along an axis share one 8-bit
exponent; each element keeps a p-bit signed significand (sign and p-1 magnitude bits).

Quantize-dequantize of a block: M = the block's largest finite magnitude, shared exponent
E = floor(log2 M) clipped to the 8-bit range [-127, 127], step 2^(E - (p - 2)) (so M's leading
bit is the significand's top magnitude bit), significand = round(x / step) to nearest, ties to
even, clipped to +-(2^(p-1) - 1); the value is significand * step. BFP12 has 4-bit
significands, BFP16 8-bit. An axis whose length is not a multiple of n is padded with zeros to
the next multiple (zeros never raise a block's exponent), so a last block may be shorter and a
block longer than the axis covers the whole axis. NaN and inf pass through unchanged and do not
set the shared exponent.
"""

from __future__ import annotations

import numpy as np

from winnow.errors import PassConfigError

FORMATS = {"bfp12": 4, "bfp16": 8}  # format -> significand bits p (sign included)
BLOCK_SIZES = (4, 8, 16, 32, 64, 128)
EXPONENT_MIN, EXPONENT_MAX = -127, 127


def significand_bits(fmt: str) -> int:
    """p for a format name ('bfp12' or 'bfp16')."""
    if fmt not in FORMATS:
        raise PassConfigError(f"bfp: unknown format '{fmt}'; use one of {', '.join(FORMATS)}.")
    return FORMATS[fmt]


def check_block(block: int) -> int:
    """`block` as an int when it is a supported block size, else PassConfigError."""
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) \
            or int(block) not in BLOCK_SIZES:
        raise PassConfigError(f"bfp: block size must be one of "
                              f"{', '.join(map(str, BLOCK_SIZES))}, got {block!r}.")
    return int(block)


def shared_exponent(block_max: np.ndarray) -> np.ndarray:
    """floor(log2 M) per block, clipped to the 8-bit exponent range (0 blocks get the minimum)."""
    _, e = np.frexp(np.asarray(block_max, np.float64))
    return np.clip(np.where(block_max > 0, e - 1, EXPONENT_MIN), EXPONENT_MIN, EXPONENT_MAX)


def bfp_quantize(x: np.ndarray, fmt: str, block: int, axis: int = -1) -> np.ndarray:
    """`x` (float32) rounded to BFP format `fmt` with blocks of `block` along `axis`."""
    p, block = significand_bits(fmt), check_block(block)
    x = np.moveaxis(np.asarray(x, np.float32), axis, -1)
    length = x.shape[-1]
    padded = -(-length // block) * block
    wide = np.concatenate([x, np.zeros(x.shape[:-1] + (padded - length,), np.float32)], axis=-1)
    blocks = wide.reshape(x.shape[:-1] + (padded // block, block)).astype(np.float64)
    finite = np.isfinite(blocks)
    block_max = np.where(finite, np.abs(blocks), 0.0).max(axis=-1, keepdims=True)
    step = np.exp2(shared_exponent(block_max) - (p - 2))
    limit = 2.0 ** (p - 1) - 1
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(blocks / step), -limit, limit) * step
    out = np.where(finite, q, blocks).reshape(wide.shape)[..., :length].astype(np.float32)
    return np.moveaxis(out, -1, axis)

"""Make input feeds for a model from its input types and shapes (for differential checks)."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from winnow.errors import UnsupportedModelError
from winnow.frontend import example_feeds


def random_feeds(model: ir.Model, seed: int = 0, dim_values: dict[str, int] | None = None,
                 default_dim: int = 2) -> dict[str, np.ndarray]:
    """Random feeds matching each graph input; symbolic dims take `dim_values` or `default_dim`."""
    rng = np.random.default_rng(seed)
    dim_values = dim_values or {}
    feeds = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        shape = _checked_shape(value, [d if isinstance(d, int) else
                                       dim_values.get(str(d), default_dim)
                                       for d in (value.shape or [])])
        dtype = _numpy_dtype(value)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[value.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def _checked_shape(value: ir.Value, shape: list[int]) -> list[int]:
    """A shape random check data can be made for: no negative dims, not too many elements."""
    from winnow.ir.user_inputs import MAX_RANDOM_ELEMENTS

    if any(d < 0 for d in shape):
        raise UnsupportedModelError(f"input '{value.name}' declares the negative dims {shape}; "
                                    "re-export the model with valid shapes.")
    if math.prod(shape) > MAX_RANDOM_ELEMENTS:
        raise UnsupportedModelError(f"input '{value.name}' of shape {shape} has "
                                    f"{math.prod(shape):,} elements, too many for random check "
                                    "data; give smaller ones with --input-shapes or "
                                    "--example-inputs, or pass --no-check.")
    return shape


def _numpy_dtype(value: ir.Value) -> np.dtype:
    """The numpy dtype of an input (float32 when it has none); UnsupportedModelError when
    numpy has no such type (random check data cannot be made for it)."""
    if value.dtype is None:
        return np.dtype(np.float32)
    try:
        return np.dtype(value.dtype.numpy())
    except (TypeError, ValueError):
        raise UnsupportedModelError(f"input '{value.name}' has element type "
                                    f"{value.dtype.name}, which winnow cannot make check data "
                                    "for; give the inputs with --example-inputs, or pass "
                                    "--no-check.") from None


def feeds_for(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """The frontend's example feeds when it attached some, otherwise random feeds."""
    feeds = example_feeds(model)
    return dict(feeds) if feeds is not None else random_feeds(model, seed)


def feeds_origin(model: ir.Model) -> str:
    """Where `feeds_for(model)` takes its feeds from, in words."""
    from winnow.ir.user_inputs import user_inputs_record

    record = user_inputs_record(model)
    if record is not None:
        return record["origin"]
    return "example" if example_feeds(model) is not None else "random (seed 0)"

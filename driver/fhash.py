"""Functional hashing of candidate models ("Unified Functional Hashing in Automatic Machine
Learning"): a candidate is identified by what it computes on fixed inputs plus the shape of the
work it does, so two pipelines that yield the same graph are measured once."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from winnow.ir.execute import run

LEVELS = 2 ** 16  # output resolution: values are hashed at 1/65536 of each output's range


def structure_signature(model: ir.Model) -> str:
    """Op histogram (with domains and element types of initializers) and parameter bytes: two
    graphs that compute the same values with different kernels (fused or not, int8 or float)
    must not share a hash, since they cost differently."""
    ops = Counter(f"{n.domain}:{n.op_type}" for n in ir.traversal.RecursiveGraphIterator(model.graph))
    params = Counter()
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            params[str(value.const_value.dtype)] += value.const_value.nbytes
    return repr(sorted(ops.items())) + repr(sorted(params.items()))


def output_signature(outputs: Mapping[str, np.ndarray]) -> bytes:
    """Outputs (by position) quantized to LEVELS steps of their own range, as bytes."""
    parts = []
    for value in outputs.values():
        arr = np.asarray(value)
        parts.append(f"{arr.dtype}{arr.shape}".encode())
        if arr.dtype.kind == "f":
            scale = float(np.nanmax(np.abs(arr))) if arr.size else 0.0
            scale = scale if np.isfinite(scale) and scale > 0 else 1.0
            arr = np.nan_to_num(np.round(arr.astype(np.float64) / scale * LEVELS),
                                nan=-1e18, posinf=1e18, neginf=-1e17).astype(np.int64)
        parts.append(np.ascontiguousarray(arr).tobytes())
    return b"".join(parts)


def functional_hash(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> str:
    """The candidate's hash: structure signature plus outputs on `feeds`."""
    digest = hashlib.sha256(structure_signature(model).encode())
    digest.update(output_signature(run(model, feeds)))
    return digest.hexdigest()[:24]

"""A training-free linear adapter: ridge regression of a dropped branch's contribution Y - X on X,
optionally truncated to rank r by SVD (DAS's lightweight skip module, fitted in closed form)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass
class LinearAdapter:
    """`y ≈ x + x @ weight + bias`, fitted on calibration vectors."""

    weight: np.ndarray  # [d, d]
    bias: np.ndarray  # [d]
    r2: float  # fraction of Var(Y - X) the adapter explains on the fitting data

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Apply to row vectors."""
        return x + x @ self.weight + self.bias


def fit_adapter(x: np.ndarray, y: np.ndarray, ridge: float = 1e-2, rank: int = 0) -> LinearAdapter:
    """Closed-form ridge fit of (y - x) on [x, 1]; `ridge` is relative to the mean feature variance."""
    delta = y - x
    mean_x, mean_d = x.mean(axis=0), delta.mean(axis=0)
    xc, dc = x - mean_x, delta - mean_d
    gram = xc.T @ xc
    lam = ridge * max(np.trace(gram) / gram.shape[0], 1e-12)
    weight = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ dc)
    if 0 < rank < weight.shape[0]:
        u, s, vt = np.linalg.svd(weight, full_matrices=False)
        weight = (u[:, :rank] * s[:rank]) @ vt[:rank]
    bias = mean_d - mean_x @ weight
    resid = dc - xc @ weight
    r2 = 1.0 - float((resid**2).sum() / max((dc**2).sum(), 1e-12))
    return LinearAdapter(weight, bias, r2)


def fit_region_adapters(model: ir.Model, regions: Sequence[Any], batches: Sequence[Mapping],
                        ridge: float = 1e-2) -> dict[str, LinearAdapter]:
    """One adapter per region, each fitted on the unmodified model's (entry, exit) vectors."""
    from winnow.ir.activations import collect_pairs

    pairs = collect_pairs(model, batches, [(r.entry.name, r.exit.name) for r in regions])
    return {r.name: fit_adapter(*pairs[(r.entry.name, r.exit.name)], ridge=ridge) for r in regions}


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def insert_after_value(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    """Insert nodes right after the producer of `value` (at the start for graph inputs)."""
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, nodes)
    else:
        graph.insert_before(next(iter(graph)), nodes)


def adapter_nodes(graph: ir.Graph, entry: ir.Value, adapter: LinearAdapter, name: str
                  ) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing `entry + adapter(entry)` (MatMul on the last axis, or a 1x1 Conv for
    NCHW), not yet inserted, and their output; the weights are registered as initializers."""
    dtype = entry.dtype.numpy() if entry.dtype is not None else np.float32
    bias = _initializer(graph, f"{name}.bias", adapter.bias.astype(dtype))
    if entry.shape is not None and len(entry.shape) == 4:
        weight = _initializer(graph, f"{name}.weight", adapter.weight.T[:, :, None, None].astype(dtype))
        nodes = [ir.node("Conv", [entry, weight, bias], name=f"{name}.conv")]
    else:
        weight = _initializer(graph, f"{name}.weight", adapter.weight.astype(dtype))
        matmul = ir.node("MatMul", [entry, weight], name=f"{name}.matmul")
        nodes = [matmul, ir.node("Add", [matmul.outputs[0], bias], name=f"{name}.add_bias")]
    nodes.append(ir.node("Add", [entry, nodes[-1].outputs[0]], name=f"{name}.residual"))
    value = nodes[-1].outputs[0]
    value.name = f"{name}.out"
    value.dtype, value.shape = entry.dtype, entry.shape
    return nodes, value


def insert_adapter(graph: ir.Graph, entry: ir.Value, adapter: LinearAdapter, name: str) -> ir.Value:
    """Insert `entry + adapter(entry)` right after the entry and return the new value."""
    nodes, value = adapter_nodes(graph, entry, adapter, name)
    insert_after_value(graph, entry, nodes)
    return value

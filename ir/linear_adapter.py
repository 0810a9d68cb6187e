"""A training-free adapter: ridge regression of a dropped branch's contribution Y - X on X,
optionally truncated to rank r by SVD (DAS's lightweight skip module, fitted in closed form).

The `context` form also regresses on the mean of X over the sequence (over real tokens only
when the model takes an attention mask; a prefix mean when the model is causal) or over the
spatial positions of NCHW maps: one extra matrix applied once per sequence, the cheapest token
mixing there is, which a per-token map cannot do at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.errors import PassConfigError
from winnow.ir.activations import collect_pairs
from winnow.ir.execute import run

MASK_HINT = "attention_mask"


@dataclasses.dataclass(frozen=True)
class ContextSpec:
    """How an adapter's context vector is taken from its input."""

    layout: str  # "sequence" ([B, S, D]: mean over S) or "spatial" (NCHW: mean over H, W)
    mask_input: str | None = None  # a [B, S] graph input of 1 = real token, 0 = padding
    causal: bool = False  # prefix mean (position t sees positions <= t)


@dataclasses.dataclass
class LinearAdapter:
    """`y ≈ x + x @ weight + context(x) @ context_weight + bias`, fitted on calibration vectors."""

    weight: np.ndarray  # [d, d]
    bias: np.ndarray  # [d]
    r2: float  # fraction of Var(Y - X) the adapter explains on the fitting data
    context_weight: np.ndarray | None = None  # [d, d], with `context`
    context: ContextSpec | None = None

    def apply(self, x: np.ndarray, ctx: np.ndarray | None = None) -> np.ndarray:
        """Apply to row vectors (and their context vectors, for a context adapter)."""
        out = x + x @ self.weight + self.bias
        if self.context_weight is not None:
            out = out + ctx @ self.context_weight
        return out


def fit_adapter(x: np.ndarray, y: np.ndarray, ridge: float = 1e-2, rank: int = 0,
                ctx: np.ndarray | None = None, context: ContextSpec | None = None) -> LinearAdapter:
    """Closed-form ridge fit of (y - x) on [x, ctx, 1]; `ridge` is relative to the mean feature
    variance; `rank` > 0 truncates the stacked weights by SVD."""
    delta = y - x
    feats = x if ctx is None else np.concatenate([x, ctx], axis=1)
    mean_f, mean_d = feats.mean(axis=0), delta.mean(axis=0)
    fc, dc = feats - mean_f, delta - mean_d
    weight = _ridge(fc, dc, ridge)
    if 0 < rank < weight.shape[1]:
        u, s, vt = np.linalg.svd(weight, full_matrices=False)
        weight = (u[:, :rank] * s[:rank]) @ vt[:rank]
    bias = mean_d - mean_f @ weight
    resid = dc - fc @ weight
    r2 = 1.0 - float((resid**2).sum() / max((dc**2).sum(), 1e-12))
    d = x.shape[1]
    if ctx is None:
        return LinearAdapter(weight, bias, r2)
    return LinearAdapter(weight[:d], bias, r2, weight[d:], context)


def fit_and_apply(x: np.ndarray, y: np.ndarray, x_new: np.ndarray,
                  ridge: float = 1e-2) -> np.ndarray:
    """`fit_adapter(x, y, ridge).apply(x_new)`; with fewer fitting vectors n than features p
    the p x p weight is never formed (x_new's kernel against x times the n x n solution), so
    scoring a wide model's regions costs n^2 p each, not p^2."""
    n, p = x.shape
    if n >= p:
        return fit_adapter(x, y, ridge).apply(x_new)
    mean_x, mean_d = x.mean(axis=0), (y - x).mean(axis=0)
    fc = x - mean_x
    lam = ridge * max(float(np.einsum("ij,ij->", fc, fc)) / p, 1e-12)
    kernel = fc @ fc.T
    kernel[np.diag_indices(n)] += lam
    alpha = np.linalg.solve(kernel, (y - x) - mean_d)
    return x_new + ((x_new - mean_x) @ fc.T) @ alpha + mean_d


def _ridge(fc: np.ndarray, dc: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W |fc W - dc|^2 + lam |W|^2, lam = `ridge` x the mean feature variance: from the
    p x p Gram matrix, or with fewer samples n than features p from the n x n one (the same W:
    (A'A + lam I)^-1 A' = A' (AA' + lam I)^-1), so a wide model's few calibration vectors cost
    n^2 p instead of p^3."""
    n, p = fc.shape
    lam = ridge * max(float(np.einsum("ij,ij->", fc, fc)) / p, 1e-12)
    if n < p:
        kernel = fc @ fc.T
        kernel[np.diag_indices(n)] += lam
        return fc.T @ np.linalg.solve(kernel, dc)
    gram = fc.T @ fc
    gram[np.diag_indices(p)] += lam
    return np.linalg.solve(gram, fc.T @ dc)


def context_spec(model: ir.Model, value: ir.Value, feeds: Mapping[str, np.ndarray]) -> ContextSpec:
    """How to take the context of `value` in `model`: sequence or spatial mean, the attention
    mask input if there is one, and whether the model is causal (measured on `feeds`)."""
    rank = len(value.shape) if value.shape is not None else None
    if rank == 4:
        return ContextSpec("spatial")
    if rank != 3:
        raise PassConfigError(f"a context adapter needs [batch, seq, dim] or NCHW activations; "
                              f"'{value.name}' has shape {value.shape}.")
    mask = next((v.name for v in model.graph.inputs
                 if MASK_HINT in (v.name or "") and v.shape is not None and len(v.shape) == 2), None)
    return ContextSpec("sequence", mask, is_causal(model, value.name, feeds, mask))


def is_causal(model: ir.Model, name: str, feeds: Mapping[str, np.ndarray], mask: str | None) -> bool:
    """Whether position t of value `name` ([B, S, ...]) ignores input positions after t: changing
    the last position of every sequence input leaves all earlier positions unchanged."""
    base = run(model, feeds, capture=[name])[name]
    if base.ndim < 2 or base.shape[1] < 2:
        return False
    altered, changed = dict(feeds), False
    for key, array in feeds.items():
        if key != mask and array.ndim >= 2 and array.shape[1] == base.shape[1]:
            copy = array.copy()
            copy[:, -1] = array[:, 0]
            altered[key], changed = copy, changed or not np.array_equal(copy, array)
    if not changed:
        return False
    after = run(model, altered, capture=[name])[name]
    return bool(np.allclose(after[:, :-1], base[:, :-1], atol=1e-5, rtol=1e-4))


def context_of(array: np.ndarray, spec: ContextSpec, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """The context of an activation, broadcast to its shape (numpy twin of the graph's nodes)."""
    a = np.asarray(array, dtype=np.float64)
    if spec.layout == "spatial":
        return np.broadcast_to(a.mean(axis=(2, 3), keepdims=True), a.shape)
    m = (feeds[spec.mask_input].astype(np.float64) if spec.mask_input in feeds
         else np.ones(a.shape[:2]))[..., None]
    if spec.causal:
        num, den = np.cumsum(a * m, axis=1), np.cumsum(m, axis=1)
    else:
        num, den = (a * m).sum(axis=1, keepdims=True), m.sum(axis=1, keepdims=True)
    return np.broadcast_to(num / np.maximum(den, 1.0), a.shape)


def fit_region_adapters(model: ir.Model, regions: Sequence[Any], batches: Sequence[Mapping],
                        ridge: float = 1e-2) -> dict[str, LinearAdapter]:
    """One adapter per region, each fitted on the unmodified model's (entry, exit) vectors."""
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
    nchw = entry.shape is not None and len(entry.shape) == 4
    nodes = _project(graph, entry, adapter.weight, name, dtype, nchw, bias)
    if adapter.context_weight is not None:
        branch = nodes[-1].outputs[0]
        ctx_nodes, ctx = _context_nodes(graph, entry, adapter.context, f"{name}.context", dtype)
        nodes += ctx_nodes + _project(graph, ctx, adapter.context_weight, f"{name}.context",
                                      dtype, nchw)
        nodes.append(ir.node("Add", [branch, nodes[-1].outputs[0]], name=f"{name}.add_context"))
    nodes.append(ir.node("Add", [entry, nodes[-1].outputs[0]], name=f"{name}.residual"))
    value = nodes[-1].outputs[0]
    value.name = f"{name}.out"
    value.dtype, value.shape = entry.dtype, entry.shape
    return nodes, value


def _project(graph: ir.Graph, x: ir.Value, weight: np.ndarray, name: str, dtype: Any,
             nchw: bool, bias: ir.Value | None = None) -> list[ir.Node]:
    """Nodes of x @ weight (+ bias) on the last axis, or the same as a 1x1 Conv for NCHW."""
    if nchw:
        w = _initializer(graph, f"{name}.weight", weight.T[:, :, None, None].astype(dtype))
        return [ir.node("Conv", [x, w] + ([bias] if bias is not None else []), name=f"{name}.conv")]
    w = _initializer(graph, f"{name}.weight", weight.astype(dtype))
    matmul = ir.node("MatMul", [x, w], name=f"{name}.matmul")
    if bias is None:
        return [matmul]
    return [matmul, ir.node("Add", [matmul.outputs[0], bias], name=f"{name}.add_bias")]


def _axes(graph: ir.Graph, name: str, axes: list[int]) -> ir.Value:
    return _initializer(graph, name, np.array(axes, dtype=np.int64))


def _context_nodes(graph: ir.Graph, x: ir.Value, spec: ContextSpec, name: str, dtype: Any
                   ) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing the context mean of `x` as `spec` says (shape broadcastable to x)."""
    opset = graph.opset_imports.get("", 18)

    def reduce(op: str, value: ir.Value, axes: list[int], suffix: str) -> ir.Node:
        if op == "ReduceMean" and opset < 18:
            return ir.node(op, [value], {"axes": axes, "keepdims": 1}, name=f"{name}.{suffix}")
        return ir.node(op, [value, _axes(graph, f"{name}.{suffix}.axes", axes)], {"keepdims": 1},
                       name=f"{name}.{suffix}")

    if spec.layout == "spatial":
        node = reduce("ReduceMean", x, [2, 3], "mean")
        return [node], node.outputs[0]
    if spec.mask_input is None and not spec.causal:
        node = reduce("ReduceMean", x, [1], "mean")
        return [node], node.outputs[0]
    nodes = []
    if spec.mask_input is not None:
        mask = next(v for v in graph.inputs if v.name == spec.mask_input)
        nodes.append(ir.node("Cast", [mask], {"to": ir.DataType.from_numpy(np.dtype(dtype))},
                             name=f"{name}.cast"))
        nodes.append(ir.node("Unsqueeze", [nodes[-1].outputs[0], _axes(graph, f"{name}.unsq", [-1])],
                             name=f"{name}.unsqueeze"))
    else:  # ones of shape [B, S, 1]
        nodes.append(reduce("ReduceMean", x, [-1], "ones_src"))
        zero = _initializer(graph, f"{name}.zero", np.array(0, dtype=dtype))
        one = _initializer(graph, f"{name}.one", np.array(1, dtype=dtype))
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0], zero], name=f"{name}.zeros"))
        nodes.append(ir.node("Add", [nodes[-1].outputs[0], one], name=f"{name}.ones"))
    weights = nodes[-1].outputs[0]
    nodes.append(ir.node("Mul", [x, weights], name=f"{name}.masked"))
    masked = nodes[-1].outputs[0]
    if spec.causal:
        axis = _initializer(graph, f"{name}.axis", np.array(1, dtype=np.int64))
        nodes.append(ir.node("CumSum", [masked, axis], name=f"{name}.num"))
        num = nodes[-1].outputs[0]
        nodes.append(ir.node("CumSum", [weights, axis], name=f"{name}.den"))
    else:
        nodes.append(reduce("ReduceSum", masked, [1], "num"))
        num = nodes[-1].outputs[0]
        nodes.append(reduce("ReduceSum", weights, [1], "den"))
    floor = _initializer(graph, f"{name}.floor", np.array(1, dtype=dtype))
    nodes.append(ir.node("Max", [nodes[-1].outputs[0], floor], name=f"{name}.den_floor"))
    nodes.append(ir.node("Div", [num, nodes[-1].outputs[0]], name=f"{name}.mean"))
    return nodes, nodes[-1].outputs[0]


def insert_adapter(graph: ir.Graph, entry: ir.Value, adapter: LinearAdapter, name: str) -> ir.Value:
    """Insert `entry + adapter(entry)` right after the entry and return the new value."""
    nodes, value = adapter_nodes(graph, entry, adapter, name)
    insert_after_value(graph, entry, nodes)
    return value

"""`smooth-activations`: SmoothQuant (Xiao et al. 2023) in closed form on calibration activations.

For every activation X read by MatMuls with constant weights W, per input channel j:
`s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)`; then X W = (X / s)(s W). The weights' rows are
scaled by s and 1/s is folded into the LayerNormalization that makes X (its scale and bias) when
X feeds nothing else, so it is free at run time; elsewhere (post-norm residual streams, GELU
outputs) a Mul by 1/s is inserted. Lossless in exact arithmetic: it only moves activation
outliers into the weights so a later int8 quantization of X loses less.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import onnx_ir as ir

from winnow.ir.activations import as_vectors, padding_mask
from winnow.ir.execute import run
from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext

NORMS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
         "SkipSimplifiedLayerNormalization")


@register_pass
class SmoothActivationsPass(Pass):
    """Migrate per-channel activation scale into the following MatMul weights (SmoothQuant)."""

    name = "smooth-activations"
    description = ("SmoothQuant: divide each MatMul input channel by s, multiply the weight row by "
                   "s; 1/s folded into the preceding LayerNorm when it feeds only MatMuls.")

    @dataclass(frozen=True)
    class Config:
        """Options of smooth-activations."""

        alpha: float = option(0.5, "migration strength: 0 keeps activations, 1 moves it all "
                              "into the weights", min=0.0, max=1.0)
        samples: int = option(32, "calibration samples the channel maxima come from", min=1)

    def call(self, model: ir.Model) -> PassResult:
        """Smooth every activation read by constant-weight MatMuls, in place."""
        from winnow.passes.rewrite.quantize import calibration

        ctx = PassContext.current()
        groups = matmul_groups(model)
        if not groups:
            ctx.report[self.name] = {"smoothed": 0, "note": "no MatMul with a constant weight"}
            return PassResult(model, False)
        amax = channel_maxima(model, list(groups), calibration(model, ctx, self.config.samples))
        folded, inserted, ratios = 0, 0, {}
        for value_name, nodes in groups.items():
            value = nodes[0].inputs[0]
            wmax = np.max([np.abs(_weight(n)).max(axis=1) for n in nodes], axis=0)
            a = amax[value_name]
            s = np.where((a > 0) & (wmax > 0), a ** self.config.alpha
                         / np.maximum(wmax, 1e-8) ** (1 - self.config.alpha), 1.0)
            s = np.clip(s, 1e-3, 1e3).astype(np.float32)
            for node in nodes:
                _set_weight(node, _weight(node) * s[:, None])
            if _fold_into_norm(value, nodes, 1.0 / s):
                folded += 1
            else:
                _insert_scale(model.graph, value, nodes, 1.0 / s)
                inserted += 1
            ratios[value_name] = float(a.max() / max(np.median(a), 1e-12))
        ctx.report[self.name] = {"smoothed": len(groups), "folded_into_norm": folded,
                                 "inserted_mul": inserted, "alpha": self.config.alpha,
                                 "max_over_median_before": ratios}
        return PassResult(model, True)


def _weight(node: ir.Node) -> np.ndarray:
    value = node.inputs[1]
    return np.asarray(value.const_value.numpy(), dtype=np.float32)


def _set_weight(node: ir.Node, array: np.ndarray) -> None:
    """Give the node its own (new) weight initializer holding `array`."""
    old = node.inputs[1]
    graph = node.graph
    new = ir.Value(name=f"{old.name}.smoothed", const_value=ir.tensor(array.astype(np.float32)),
                   shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph.register_initializer(new)
    node.replace_input_with(1, new)


def matmul_groups(model: ir.Model) -> dict[str, list[ir.Node]]:
    """Activation name -> the MatMuls reading it as input 0 with a constant 2-D float weight."""
    groups: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2:
            continue
        x, w = node.inputs
        if x is None or w is None or w.const_value is None or x.const_value is not None:
            continue
        if len(w.const_value.shape) != 2 or w.const_value.dtype != ir.DataType.FLOAT:
            continue
        groups.setdefault(x.name, []).append(node)
    return groups


def channel_maxima(model: ir.Model, names: list[str], batches: list[dict],
                   skip_padding: bool = True) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each named value over the batches (padding tokens left out unless
    `skip_padding` is False: a dynamic int8 range is taken over padding tokens too)."""
    out: dict[str, np.ndarray] = {}
    for feeds in batches:
        captured = run(model, feeds, capture=names)
        mask = padding_mask(feeds) if skip_padding else None
        for name in names:
            m = np.abs(as_vectors(captured[name], mask)).max(axis=0)
            out[name] = m if name not in out else np.maximum(out[name], m)
    return out


def _fold_into_norm(value: ir.Value, nodes: list[ir.Node], inv: np.ndarray) -> bool:
    """Scale the producing norm's gamma (and beta) by `inv` when `value` feeds only `nodes`."""
    norm = value.producer()
    if norm is None or norm.op_type not in NORMS or value.is_graph_output():
        return False
    if norm.outputs[0] is not value or {id(u.node) for u in value.uses()} != {id(n) for n in nodes}:
        return False
    if any(len(o.uses()) or o.is_graph_output() for o in norm.outputs[1:] if o is not None):
        return False
    first = 2 if norm.op_type.startswith("Skip") else 1
    params = [i for i in (first, first + 1) if i < len(norm.inputs) and norm.inputs[i] is not None]
    if any(norm.inputs[i].const_value is None for i in params):
        return False
    for i in params:
        p = norm.inputs[i]
        array = np.asarray(p.const_value.numpy(), np.float32) * inv
        new = ir.Value(name=f"{p.name}.smoothed", const_value=ir.tensor(array.astype(np.float32)),
                       shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
        norm.graph.register_initializer(new)
        norm.replace_input_with(i, new)
    return True


def _insert_scale(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node], inv: np.ndarray) -> ir.Node:
    """x' = x * inv, read by `nodes` instead of x."""
    scale = ir.Value(name=f"{value.name}.smooth_scale", const_value=ir.tensor(inv.astype(np.float32)),
                     shape=ir.Shape(inv.shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph.register_initializer(scale)
    mul = ir.node("Mul", [value, scale], name=f"{value.name}.smooth")
    mul.outputs[0].name = f"{value.name}.smoothed"
    mul.outputs[0].shape, mul.outputs[0].type = value.shape, value.type
    graph.insert_before(_first(graph, nodes), mul)
    for node in nodes:
        node.replace_input_with(0, mul.outputs[0])
    return mul


def _first(graph: ir.Graph, nodes: list[ir.Node]) -> ir.Node:
    members = {id(n) for n in nodes}
    return next(n for n in graph if id(n) in members)

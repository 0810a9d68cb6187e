"""`split-outliers`: LLM.int8()-style mixed-precision decomposition (Dettmers et al. 2022) of the
MatMuls whose input has outlier channels, so a later int8 quantization keeps every MatMul in int8.

For an activation X read by MatMuls with constant weights W, the channels whose calibration max
|x| is `factor` times the median channel's are the outliers O. Then
`X W = (X * m) W' + X[:, O] W[O, :]` where m zeroes O and W' has O's rows zeroed: the big
MatMul no longer sees the outliers (its per-tensor int8 range is set by the ordinary channels)
and the few outlier channels go through a small float MatMul (named `*.outliers`, which
`quantize` leaves in float). When X = Gelu(h W1 + b1) (also as ORT's fused BiasGelu) the mask costs nothing: the outlier
channels' bias becomes -1e4 (Gelu gives exactly 0) and Gelu(h W1[:, O] + b1[O]) is computed
beside it. Lossless in exact arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext
from winnow.passes.rewrite.smooth_activations import (_first, _set_weight, _weight, channel_maxima,
                                                      matmul_groups)

OUTLIER_SUFFIX = ".outliers"
CONTRIB = "com.microsoft"
GELUS = ("Gelu", "BiasGelu")


@register_pass
class SplitOutliersPass(Pass):
    """Route outlier input channels of MatMuls through a small float MatMul."""

    name = "split-outliers"
    description = ("LLM.int8() decomposition: input channels with outlier ranges go through a "
                   "small float MatMul so the main MatMul quantizes without them.")

    @dataclass(frozen=True)
    class Config:
        """Options of split-outliers."""

        factor: float = option(6.0, "an outlier channel's max |x| is this many times the median "
                               "channel's", min=1.0)
        max_channels: int = option(16, "most outlier channels split off one activation", min=1)
        samples: int = option(32, "calibration samples the channel maxima come from", min=1)
        free_only: bool = option(False, "split only activations whose mask folds into the Gelu "
                                 "making them (no extra pass over the activation at run time)")

    def call(self, model: ir.Model) -> PassResult:
        """Split every activation with outlier channels, in place."""
        from winnow.passes.rewrite.quantize import calibration

        ctx = PassContext.current()
        groups = matmul_groups(model)
        groups = {k: v for k, v in groups.items()
                  if not any(n.name.endswith(OUTLIER_SUFFIX) for n in v)}
        # Padding tokens count: int8-dynamic takes its range over the whole tensor, and in
        # MiniLM the padding positions carry outliers of their own.
        amax = channel_maxima(model, list(groups), calibration(model, ctx, self.config.samples),
                              skip_padding=False)
        split = {}
        # GELU outputs first: their fold reads the MatMul before it, which a split of that
        # MatMul's own input would rewrite.
        order = sorted(groups.items(), key=lambda kv: _producer_op(kv[1][0].inputs[0]) not in GELUS)
        for name, nodes in order:
            a = amax[name]
            outliers = np.flatnonzero(a > self.config.factor * max(float(np.median(a)), 1e-12))
            if 0 < len(outliers):
                outliers = np.sort(outliers[np.argsort(-a[outliers])][: self.config.max_channels])
                if _split(model.graph, nodes, outliers, self.config.free_only):
                    split[name] = [int(i) for i in outliers]
        ctx.report[self.name] = {"activations": len(split),
                                 "channels": sum(len(v) for v in split.values()), "split": split}
        return PassResult(model, bool(split))


def _producer_op(value: ir.Value) -> str | None:
    node = value.producer()
    return None if node is None else node.op_type


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(value)
    return value


def _split(graph: ir.Graph, nodes: list[ir.Node], outliers: np.ndarray, free_only: bool) -> bool:
    """Rewrite the MatMuls reading one activation: masked main path plus a float outlier path;
    False (nothing changed) when `free_only` and the mask would cost a pass over the activation."""
    x = nodes[0].inputs[0]
    folded = _fold_through_gelu(graph, x, nodes, outliers)
    if folded is not None:
        inliers, columns = x, folded
    elif free_only:
        return False
    else:
        keep = np.ones(_weight(nodes[0]).shape[0], np.float32)
        keep[outliers] = 0.0
        mask = _const(graph, f"{x.name}.inlier_mask", keep)
        index = _const(graph, f"{x.name}.outlier_index", outliers.astype(np.int64))
        masked = ir.node("Mul", [x, mask], name=f"{x.name}.inliers")
        picked = ir.node("Gather", [x, index], {"axis": -1}, name=f"{x.name}.outlier_columns")
        masked.outputs[0].name = f"{x.name}.inliers"
        picked.outputs[0].name = f"{x.name}.outlier_columns"
        masked.outputs[0].type = picked.outputs[0].type = x.type
        graph.insert_before(_first(graph, nodes), [masked, picked])
        inliers, columns = masked.outputs[0], picked.outputs[0]
    for node in nodes:
        w = _weight(node)
        rows = _const(graph, f"{node.inputs[1].name}.outlier_rows", w[outliers].copy())
        main = w.copy()
        main[outliers] = 0.0
        _set_weight(node, main)
        node.replace_input_with(0, inliers)
        y = node.outputs[0]
        side = ir.node("MatMul", [columns, rows], name=f"{node.name}{OUTLIER_SUFFIX}")
        total = ir.node("Add", [y, side.outputs[0]], name=f"{node.name}.with_outliers")
        side.outputs[0].name = f"{y.name}.outliers"
        total.outputs[0].type, total.outputs[0].shape = y.type, y.shape
        uses = [u for u in y.uses() if u.node is not total]
        outputs = [i for i, v in enumerate(graph.outputs) if v is y]
        graph.insert_after(node, [side, total])
        for use in uses:
            use.node.replace_input_with(use.idx, total.outputs[0])
        name = y.name
        y.name = f"{name}.inliers"
        total.outputs[0].name = name
        for i in outputs:
            graph.outputs[i] = total.outputs[0]
    return True


def _gelu_input(gelu: ir.Node) -> tuple[ir.Node, ir.Value, Any] | None:
    """(MatMul, bias, rebind) when the Gelu computes Gelu(h W1 + b1) with constant W1 and b1 and
    nothing else reads h W1 (+ b1): as Gelu(Add(MatMul, b1)) or as ORT's fused BiasGelu(MatMul, b1).
    `rebind(value)` puts another bias in place of b1."""
    if gelu.op_type == "BiasGelu" and gelu.domain == CONTRIB and len(gelu.inputs) == 2:
        add, pre = gelu, gelu.inputs
    elif gelu.op_type == "Gelu" and gelu.inputs[0] is not None:
        add = gelu.inputs[0].producer()
        if add is None or add.op_type != "Add" or len(gelu.inputs[0].uses()) != 1:
            return None
        pre = add.inputs
    else:
        return None
    for m_index in (0, 1):
        matmul, bias = pre[m_index].producer(), pre[1 - m_index]
        if (matmul is not None and matmul.op_type == "MatMul" and bias is not None
                and bias.const_value is not None and matmul.inputs[1].const_value is not None
                and len(pre[m_index].uses()) == 1
                and bias.const_value.shape == (matmul.inputs[1].const_value.shape[-1],)):
            return matmul, bias, (lambda v, i=1 - m_index: add.replace_input_with(i, v))
    return None


def _fold_through_gelu(graph: ir.Graph, x: ir.Value, nodes: list[ir.Node],
                       outliers: np.ndarray) -> ir.Value | None:
    """When x = Gelu(h W1 + b1) feeds only `nodes`, silence the outlier channels inside it (their
    bias becomes -1e4, so Gelu gives exactly 0 and the int8 MatMul producing them is unchanged)
    and recompute them beside it in float: Gelu(h W1[:, O] + b1[O]). No pass over x is added.
    Returns the outlier columns, or None when the pattern is not there."""
    gelu = x.producer()
    if gelu is None or x.is_graph_output() or \
            {id(u.node) for u in x.uses()} != {id(n) for n in nodes}:
        return None
    found = _gelu_input(gelu)
    if found is None:
        return None
    matmul, bias, rebind = found
    b = np.asarray(bias.const_value.numpy(), np.float32)
    w1 = np.asarray(matmul.inputs[1].const_value.numpy(), np.float32)
    silenced = b.copy()
    silenced[outliers] = -1e4
    rebind(_const(graph, f"{bias.name}.silenced", silenced))
    cols = ir.node("MatMul", [matmul.inputs[0], _const(graph, f"{x.name}.outlier_w",
                                                        w1[:, outliers].copy())],
                   name=f"{x.name}.outlier_matmul{OUTLIER_SUFFIX}")
    outlier_bias = _const(graph, f"{x.name}.outlier_b", b[outliers].copy())
    if gelu.op_type == "BiasGelu":
        act = ir.node("BiasGelu", [cols.outputs[0], outlier_bias], domain=CONTRIB,
                      name=f"{x.name}.outlier_gelu")
        added = [cols, act]
    else:
        shifted = ir.node("Add", [cols.outputs[0], outlier_bias])
        act = ir.node("Gelu", [shifted.outputs[0]], dict(gelu.attributes.items()) or None,
                      domain=gelu.domain, name=f"{x.name}.outlier_gelu")
        added = [cols, shifted, act]
    act.outputs[0].name = f"{x.name}.outlier_columns"
    act.outputs[0].type = x.type
    graph.insert_after(gelu, added)
    return act.outputs[0]

"""`smooth-activations`: SmoothQuant (Xiao et al. 2023) in closed form on calibration activations.

For every activation X read by MatMuls with constant weights W, per input channel j:
`s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)`; then X W = (X / s)(s W). The weights' rows are
scaled by s and 1/s is folded into the LayerNormalization that makes X (its scale and bias) when
X feeds nothing else, so it is free at run time; elsewhere (post-norm residual streams, GELU
outputs) a Mul by 1/s is inserted. With `convs`, Conv inputs and outputs (NCHW channels) are
equalized too, each scale folded into the constant Mul/Add/BatchNormalization/Conv next to it
(PP-LCNet's learnable affine blocks), never inserted. Lossless in exact arithmetic: it only moves activation
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
                   "s; 1/s folded into the preceding LayerNorm when it feeds only MatMuls; convs=true "
                   "equalizes Conv channels through the constant affine ops around them.")

    @dataclass(frozen=True)
    class Config:
        """Options of smooth-activations."""

        alpha: float = option(0.5, "migration strength: 0 keeps activations, 1 moves it all "
                              "into the weights", min=0.0, max=1.0)
        samples: int = option(32, "calibration samples the channel maxima come from", min=1)
        convs: bool = option(False, "also equalize Conv inputs (depthwise fully, others with "
                             "alpha) and outputs, scales folded into the constant Mul/Add/"
                             "BatchNormalization/Conv around them (skipped where none folds)")
        matmuls: bool = option(True, "smooth MatMul inputs (off: only Convs, with `convs`)")

    def call(self, model: ir.Model) -> PassResult:
        """Smooth every activation read by constant-weight MatMuls (and Convs), in place."""
        from winnow.passes.rewrite.quantize import calibration, lift_constants

        ctx = PassContext.current()
        conv_counts = {}
        if self.config.convs:
            lift_constants(model, size_limit=1)  # scalar affine constants too: scales fold there
            conv_counts = smooth_convolutions(model, calibration(model, ctx, self.config.samples),
                                              self.config.alpha)
        groups = matmul_groups(model) if self.config.matmuls else {}
        if not groups:
            changed = any(conv_counts.values())
            ctx.report[self.name] = {"smoothed": 0, **conv_counts,
                                     "note": "no MatMul smoothed"}
            return PassResult(model, changed)
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
        ctx.report[self.name] = {"smoothed": len(groups), **conv_counts, "folded_into_norm": folded,
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


# --- Convolutions: per-channel scales folded into the neighbouring affine ops ------------------

AFFINE = ("Mul", "Add")


def smooth_convolutions(model: ir.Model, batches: list[dict], alpha: float) -> dict[str, int]:
    """Equalize the channel ranges of Conv inputs and outputs (the per-tensor activation scales of
    static int8), folding every scale into the constant weights around them; returns counts."""
    inputs = conv_input_groups(model)
    outputs = conv_output_scalers(model)
    amax = conv_channel_maxima(model, [*inputs, *outputs], batches)
    done = {"conv_inputs": 0, "conv_outputs": 0}
    for value_name, convs in inputs.items():
        value = convs[0].inputs[0]
        s = conv_input_scale(convs, amax[value_name], alpha)
        if _fold_channel_scale(value, 1.0 / s, apply=False):
            _fold_channel_scale(value, 1.0 / s, apply=True)
            for conv in convs:
                _scale_conv_input(conv, s)
            done["conv_inputs"] += 1
    for value_name, (conv, mul) in outputs.items():
        t = equalizing_scale(amax[value_name])
        _scale_conv_output(conv, 1.0 / t)
        k = _const_input(mul)
        _set_const(mul, k, _per_channel(_array(mul.inputs[k]), len(t)) * t[:, None, None])
        done["conv_outputs"] += 1
    return done


def equalizing_scale(amax: np.ndarray) -> np.ndarray:
    """s = max_c / max over channels, clipped to [1e-3, 1]: x / s has every live channel's range
    at the widest one (dead channels keep 1)."""
    top = float(amax.max()) if amax.size else 0.0
    if top <= 0:
        return np.ones_like(amax, dtype=np.float32)
    return np.where(amax > 0, np.clip(amax / top, 1e-3, 1.0), 1.0).astype(np.float32)


def conv_input_scale(convs: list[ir.Node], amax: np.ndarray, alpha: float) -> np.ndarray:
    """Per input channel: fully equalizing where each channel has its own output channels (depth-
    wise: per-output-channel weight scales absorb it exactly), SmoothQuant's a^alpha / w^(1-alpha)
    elsewhere."""
    if all(_group_width(c) == 1 for c in convs):
        return equalizing_scale(amax)
    wmax = np.max([_input_channel_max(c) for c in convs], axis=0)
    s = np.where((amax > 0) & (wmax > 0),
                 amax ** alpha / np.maximum(wmax, 1e-8) ** (1 - alpha), 1.0)
    return np.clip(s, 1e-3, 1e3).astype(np.float32)


def _conv_weight(node: ir.Node) -> np.ndarray | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None or w.const_value.dtype != ir.DataType.FLOAT:
        return None
    array = np.asarray(w.const_value.numpy(), np.float32)
    return array if array.ndim == 4 else None


def _plain_conv(node: ir.Node) -> bool:
    return (node.op_type == "Conv" and node.domain == "" and node.inputs[0] is not None
            and node.inputs[0].const_value is None and _conv_weight(node) is not None
            and (len(node.inputs) < 3 or node.inputs[2] is None
                 or node.inputs[2].const_value is not None))


def _group_width(node: ir.Node) -> int:
    """Input channels per group (1 for a depthwise conv)."""
    return _conv_weight(node).shape[1]


def _groups(node: ir.Node) -> int:
    attr = node.attributes.get("group")
    return int(attr.value) if attr is not None else 1


def _sole_reader(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(u.node is node for u in value.uses())


def conv_input_groups(model: ir.Model) -> dict[str, list[ir.Node]]:
    """Activation name -> the plain Convs reading it, where nothing else reads it."""
    out: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        if _plain_conv(node):
            out.setdefault(node.inputs[0].name, []).append(node)
    return {name: convs for name, convs in out.items()
            if not convs[0].inputs[0].is_graph_output()
            and {id(u.node) for u in convs[0].inputs[0].uses()} == {id(c) for c in convs}}


def conv_output_scalers(model: ir.Model) -> dict[str, tuple[ir.Node, ir.Node]]:
    """Conv output name -> (the Conv, the Mul by a constant that alone reads it)."""
    out = {}
    for node in model.graph:
        if not _plain_conv(node):
            continue
        y = node.outputs[0]
        readers = [u.node for u in y.uses()]
        if len(readers) == 1 and _sole_reader(y, readers[0]) and readers[0].op_type == "Mul" \
                and _const_input(readers[0]) is not None \
                and _broadcasts_per_channel(readers[0].inputs[_const_input(readers[0])],
                                            _conv_weight(node).shape[0]):
            out[y.name] = (node, readers[0])
    return out


def conv_channel_maxima(model: ir.Model, names: list[str], batches: list[dict]
                        ) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) max |x| of each named NCHW value over the batches."""
    out: dict[str, np.ndarray] = {}
    for feeds in batches:
        captured = run(model, feeds, capture=names)
        for name in names:
            x = np.abs(np.asarray(captured[name], np.float32))
            m = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]).max(axis=0)
            out[name] = m if name not in out else np.maximum(out[name], m)
    return out


def _input_channel_max(node: ir.Node) -> np.ndarray:
    """max |W| over everything input channel c multiplies, per input channel."""
    w = np.abs(_conv_weight(node))
    groups, width = _groups(node), w.shape[1]
    per_group = w.reshape(groups, w.shape[0] // groups, width, -1).max(axis=(1, 3))
    return per_group.reshape(-1)


def _scale_conv_input(node: ir.Node, s: np.ndarray) -> None:
    """W' so that Conv(x / s, W') == Conv(x, W)."""
    w = _conv_weight(node)
    groups, width = _groups(node), w.shape[1]
    scale = s.reshape(groups, 1, width).repeat(w.shape[0] // groups, axis=1).reshape(w.shape[0], width)
    _set_const(node, 1, w * scale[:, :, None, None])


def _scale_conv_output(node: ir.Node, inv: np.ndarray) -> None:
    """Conv rows (and bias) times `inv`: the output channel c comes out times inv_c."""
    _set_const(node, 1, _conv_weight(node) * inv[:, None, None, None])
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        _set_const(node, 2, _array(node.inputs[2]) * inv)


def _fold_channel_scale(value: ir.Value, inv: np.ndarray, apply: bool) -> bool:
    """Make `value` come out times `inv` (> 0) per channel by changing only constants upstream: a Mul or
    Add by a constant, a BatchNormalization, a Conv, through a Relu (positive scales commute
    with it). With apply=False only say whether it can."""
    node = value.producer()
    if node is None or value.is_graph_output() or node.outputs[0] is not value:
        return False
    if node.op_type == "Relu" and node.domain == "":
        return _sole_reader(node.inputs[0], node) and _fold_channel_scale(node.inputs[0], inv, apply)
    if node.op_type == "BatchNormalization" and len(node.outputs) == 1 and all(
            i is not None and i.const_value is not None for i in node.inputs[1:3]):
        if apply:
            for i in (1, 2):
                _set_const(node, i, _array(node.inputs[i]) * inv)
        return True
    if _plain_conv(node):
        if apply:
            _scale_conv_output(node, inv)
        return True
    k = _const_input(node) if node.op_type in AFFINE else None
    if k is None or not _broadcasts_per_channel(node.inputs[k], len(inv)):
        return False
    if node.op_type == "Add":
        other = node.inputs[1 - k]
        if not _sole_reader(other, node) or not _fold_channel_scale(other, inv, apply):
            return False
    if apply:
        _set_const(node, k, _per_channel(_array(node.inputs[k]), len(inv)) * inv[:, None, None])
    return True


def _const_input(node: ir.Node) -> int | None:
    """Which of a binary node's two inputs is a constant (the other one not)."""
    if len(node.inputs) != 2 or node.domain != "" or any(i is None for i in node.inputs):
        return None
    flags = [i.const_value is not None for i in node.inputs]
    return flags.index(True) if flags.count(True) == 1 else None


def _broadcasts_per_channel(value: ir.Value, channels: int) -> bool:
    """A float constant that is a scalar or one value per channel of an NCHW tensor."""
    if value.const_value is None or value.const_value.dtype != ir.DataType.FLOAT:
        return False
    shape = tuple(value.const_value.shape)
    return int(np.prod(shape)) == 1 or shape in ((channels, 1, 1), (1, channels, 1, 1))


def _per_channel(array: np.ndarray, channels: int) -> np.ndarray:
    """A scalar or per-channel constant as a [C, 1, 1] array."""
    return np.broadcast_to(array.reshape(-1, 1, 1), (channels, 1, 1)).astype(np.float32)


def _array(value: ir.Value) -> np.ndarray:
    return np.asarray(value.const_value.numpy(), np.float32)


def _set_const(node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give input `index` of `node` a new initializer of its own holding `array`."""
    old = node.inputs[index]
    graph = node.graph
    name = f"{old.name}.smoothed"
    while name in graph.initializers:
        name += "_"
    new = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array, np.float32)),
                   shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph.register_initializer(new)
    node.replace_input_with(index, new)

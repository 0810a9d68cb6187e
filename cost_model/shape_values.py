"""Evaluate the small integer tensors that compute shapes (Shape -> Gather -> Concat -> Slice
bounds ...) with numpy, once the input shapes are concrete, and fold them into a proto so a
second ONNX shape inference sees them as constants (ONNX's data propagation does not reach
Slice bounds, Range limits or Expand shapes computed this way)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

MAX_ELEMS = 64  # only shape-sized tensors are evaluated

Shape = tuple[int, ...]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _shape(node, ins, attrs, types):
    shape = types.get(node.input[0], (None, 0))[0]
    if shape is None:
        return None
    return np.array(shape[attrs.get("start", 0):attrs.get("end", len(shape))], np.int64)


def _slice(node, ins, attrs, types):
    data, starts, ends = ins[0], ins[1], ins[2]
    axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(starts))
    steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a)] = slice(int(s), int(e), int(st))
    return data[tuple(index)]


def _axes(ins, attrs):
    if len(ins) > 1 and ins[1] is not None:
        return [int(a) for a in ins[1]]
    return list(attrs.get("axes", []))


def _unsqueeze(node, ins, attrs, types):
    out = ins[0]
    for a in sorted(a % (out.ndim + len(_axes(ins, attrs)) + 1) if a < 0 else a
                    for a in _axes(ins, attrs)):
        out = np.expand_dims(out, a)
    return out


def _squeeze(node, ins, attrs, types):
    axes = _axes(ins, attrs)
    return np.squeeze(ins[0], axis=tuple(axes) if axes else None)


def _cast(node, ins, attrs, types):
    return ins[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))


def _div(node, ins, attrs, types):
    a, b = ins
    return a // b if np.issubdtype(a.dtype, np.integer) else a / b


def _constant_of_shape(node, ins, attrs, types):
    value = attrs.get("value")
    fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    return np.full([int(d) for d in ins[0]], fill.reshape(-1)[0], fill.dtype)


def _reshape(node, ins, attrs, types):
    target = [int(d) for d in ins[1]]
    target = [ins[0].shape[i] if d == 0 else d for i, d in enumerate(target)]
    return ins[0].reshape(target)


OPS: dict[str, Callable[..., Any]] = {
    "Shape": _shape, "Slice": _slice, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Cast": _cast, "Div": _div, "ConstantOfShape": _constant_of_shape, "Reshape": _reshape,
    "Gather": lambda n, i, a, t: np.take(i[0], i[1], axis=a.get("axis", 0)),
    "Concat": lambda n, i, a, t: np.concatenate([np.atleast_1d(x) for x in i], axis=a["axis"]),
    "Add": lambda n, i, a, t: i[0] + i[1], "Sub": lambda n, i, a, t: i[0] - i[1],
    "Mul": lambda n, i, a, t: i[0] * i[1], "Min": lambda n, i, a, t: np.minimum.reduce(i),
    "Max": lambda n, i, a, t: np.maximum.reduce(i), "Neg": lambda n, i, a, t: -i[0],
    "Equal": lambda n, i, a, t: i[0] == i[1], "Less": lambda n, i, a, t: i[0] < i[1],
    "Greater": lambda n, i, a, t: i[0] > i[1], "Not": lambda n, i, a, t: ~i[0],
    "Where": lambda n, i, a, t: np.where(i[0], i[1], i[2]), "Identity": lambda n, i, a, t: i[0],
    "Range": lambda n, i, a, t: np.arange(i[0], i[1], i[2]).astype(np.asarray(i[0]).dtype),
    "Expand": lambda n, i, a, t: i[0] * np.ones([int(d) for d in i[1]], i[0].dtype),
    "ReduceProd": lambda n, i, a, t: np.prod(i[0], keepdims=bool(a.get("keepdims", 1))),
    "Abs": lambda n, i, a, t: np.abs(i[0]),
}


def _known_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    known = {}
    for init in graph.initializer:
        if np.prod(init.dims, dtype=np.int64) <= MAX_ELEMS:
            known[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.size <= MAX_ELEMS:
                known[node.output[0]] = value
    return known


def _evaluate(node: onnx.NodeProto, known: dict, types: dict) -> list[np.ndarray] | None:
    fn = OPS.get(node.op_type)
    if fn is None or node.domain not in ("", "ai.onnx"):
        return None
    inputs = list(node.input)
    if node.op_type != "Shape" and not all(n == "" or n in known for n in inputs):
        return None
    ins = [known.get(n) if n else None for n in inputs]
    try:
        out = np.asarray(fn(node, ins, _attrs(node), types))
    except Exception:  # noqa: BLE001 - an op we cannot evaluate is simply left to inference
        return None
    return [out] if out.size <= MAX_ELEMS and out.dtype != object else None


def fold_shape_values(proto: onnx.ModelProto, types: dict[str, tuple[Shape | None, int]]) -> bool:
    """Replace the nodes that compute small tensors by constants in `proto`; True if any."""
    graph = proto.graph
    known = _known_constants(graph)
    folded = []
    for node in graph.node:
        if node.op_type == "Constant" or len(node.output) != 1:
            continue
        out = _evaluate(node, known, types)
        if out is not None:
            known[node.output[0]] = out[0]
            folded.append(node)
    if not folded:
        return False
    graph_outputs = {o.name for o in graph.output}
    folded = [n for n in folded if n.output[0] not in graph_outputs]
    for node in folded:
        graph.node.remove(node)
        graph.initializer.append(numpy_helper.from_array(known[node.output[0]], node.output[0]))
    return bool(folded)

"""Attention heads of an attention region: head count, head dim, KV heads, Q/K/V/O weights."""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.ir.regions import is_const

PASS_THROUGH_LIMIT = 200  # producer steps searched from the score matmul back to a projection


@dataclasses.dataclass
class AttentionHeads:
    """Head layout of one attention sub-layer (weights named by their initializers)."""

    num_heads: int | None
    head_dim: int | None
    num_kv_heads: int | None
    q: str | None
    k: str | None
    v: str | None
    o: str | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary."""
        return dataclasses.asdict(self)


def _weight(node: ir.Node) -> ir.Value | None:
    if node.op_type not in ("MatMul", "Gemm"):
        return None
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return w if w is not None and is_const(w) else None


def _weight_shape(w: ir.Value) -> tuple | None:
    if w.const_value is not None:
        return tuple(w.const_value.shape)
    producer = w.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return tuple(producer.attributes["value"].as_tensor().shape)
    return tuple(w.shape) if w.shape is not None else None


def _search_up(value: ir.Value, allowed: set[int], accept) -> ir.Node | None:
    """Breadth-first up the producers of `value`, inside the region, to the first accepted node."""
    queue, seen = deque([value]), set()
    for _ in range(PASS_THROUGH_LIMIT):
        if not queue:
            return None
        v = queue.popleft()
        node = v.producer()
        if node is None or id(node) in seen or id(node) not in allowed:
            continue
        seen.add(id(node))
        if accept(node):
            return node
        queue.extend(i for i in node.inputs if i is not None and not is_const(i))
    return None


def _projection_above(value: ir.Value, allowed: set[int]) -> ir.Node | None:
    """The nearest weight matmul above `value` in the region."""
    return _search_up(value, allowed, lambda n: _weight(n) is not None)


def _projection_below(value: ir.Value, allowed: set[int]) -> ir.Node | None:
    queue, seen = deque([value]), set()
    for _ in range(PASS_THROUGH_LIMIT):
        if not queue:
            return None
        v = queue.popleft()
        for user, _ in v.uses():
            if id(user) in seen or id(user) not in allowed:
                continue
            seen.add(id(user))
            if _weight(user) is not None:
                return user
            queue.extend(user.outputs)
    return None


def _out_features(node: ir.Node | None) -> int | None:
    if node is None:
        return None
    w = _weight(node)
    shape = _weight_shape(w) if w is not None else None
    if shape is None or len(shape) != 2:
        return None
    trans_b = node.attributes.get("transB")
    return int(shape[0] if (trans_b is not None and trans_b.as_int()) else shape[1])


def _head_dim(node: ir.Node, allowed: set[int]) -> int | None:
    """Head dim from the first 4-D reshape below a projection (static shape or constant)."""
    queue = deque(node.outputs)
    for _ in range(PASS_THROUGH_LIMIT):
        if not queue:
            return None
        v = queue.popleft()
        for user, _ in v.uses():
            if id(user) not in allowed:
                continue
            if user.op_type == "Reshape":
                dim = _last_dim(user)
                if dim:
                    return dim
            queue.extend(user.outputs)
    return None


def _last_dim(reshape: ir.Node) -> int | None:
    """Head dim of a [b, s, heads, dim] (or fused-QKV [b, s, 3, heads, dim]) reshape."""
    out_shape = reshape.outputs[0].shape
    if out_shape is not None and len(out_shape) in (4, 5) and isinstance(out_shape[-1], int):
        return out_shape[-1]
    target = reshape.inputs[1]
    if target is not None and target.const_value is not None:
        dims = np.asarray(target.const_value.numpy()).reshape(-1)
        if dims.size in (4, 5) and dims[-1] > 0:
            return int(dims[-1])
    return None


def find_heads(region: Any) -> AttentionHeads:
    """Locate Q/K/V/O projections around the region's softmax and derive the head layout."""
    allowed = {id(n) for n in region.nodes}
    softmax = next((n for n in region.nodes if n.op_type == "Softmax"), None)
    q = k = v = o = None
    if softmax is not None:
        scores = _score_matmul(softmax, allowed)
        if scores is not None:
            q = _projection_above(scores.inputs[0], allowed)
            k = _projection_above(scores.inputs[1], allowed)
        context = next((u for u, _ in softmax.outputs[0].uses() if u.op_type == "MatMul"), None)
        if context is not None:
            v = _projection_above(context.inputs[1], allowed)
            o = _projection_below(context.outputs[0], allowed)
    head_dim = _head_dim(q, allowed) if q is not None else None
    q_out, k_out = _out_features(q), _out_features(k)
    if q is not None and q is k and q is v and q_out:
        q_out = k_out = q_out // 3  # one fused QKV projection
    heads = q_out // head_dim if head_dim and q_out else None
    kv_heads = k_out // head_dim if head_dim and k_out else None
    name = lambda node: _weight(node).name if node is not None else None  # noqa: E731
    return AttentionHeads(heads, head_dim, kv_heads, name(q), name(k), name(v), name(o))


def _score_matmul(softmax: ir.Node, allowed: set[int]) -> ir.Node | None:
    """The activation x activation matmul (Q K^T) feeding the softmax."""
    return _search_up(softmax.inputs[0], allowed,
                      lambda n: n.op_type == "MatMul" and _weight(n) is None)

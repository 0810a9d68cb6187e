"""`bfp`: block floating point ("Accurate Block Quantization in LLMs with Outliers", Trukhanov &
Soloveychik 2024) on MatMul/Gemm weights and on the K operand of attention, with K-sort.

Weights are rounded at compile time (`numerics.bfp_quantize` along the contraction axis), so the
artifact holds the BFP values. The K operand (input 1 of each attention's score MatMul, blocks
along its contraction axis: the head dimension) gets an exact quantize-dequantize in the graph
with standard ONNX ops: the shared exponent from a Log2 estimate corrected against exact powers
of two, steps of 2^(E - (p - 2)), Round (ties to even) and Clip, bit for bit the numpy
reference. A length that is not a multiple of the block is padded with zeros (the last block is
shorter; a block longer than the axis covers it whole). K-sort permutes, in every head, the
output channels of W_k by their L2 norm and applies the same permutation to W_q (and both
biases): Q K^T is unchanged (up to float summation order) while channels of similar size share
blocks. With a half-split rotary embedding (rotate_half), whole pairs (c, c + d/2) move together
and the cos/sin tables become per-head tables permuted the same way. The pass checks on one
calibration batch that the scores did not move and refuses otherwise. K-sort changes K's blocks
only when a block is shorter than the head dimension (shorter than d/2 with rotary pairs, since
a pair's halves sit in different halves of the head).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.errors import PassConfigError, UnsupportedModelError
from winnow.numerics import mark
from winnow.numerics.bfp import BLOCK_SIZES, EXPONENT_MIN, FORMATS, bfp_quantize
from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext
from winnow.passes.rewrite.lmul import MIN_NORMAL, Emitter, exponent_of, powers_of_two

# Ops that keep a channel where it is between the K (Q) projection and the score MatMul.
CHANNEL_PRESERVING = {"Reshape", "Transpose", "Add", "Mul", "Div", "Expand", "Unsqueeze",
                      "Squeeze", "Identity", "Cast", "Tile"}
ROTARY = {"Slice", "Neg", "Concat"}
SCORE_TOLERANCE = 1e-5  # K-sort may move scores by float summation order only (relative to max)  # rotate_half of a half-split rotary embedding


@register_pass
class BfpPass(Pass):
    """Round MatMul/Gemm weights (and attention's K operand, in the graph) to block floating point."""

    name = "bfp"
    description = ("Block floating point (BFP12/BFP16, shared 8-bit exponent per block along the "
                   "contraction axis) on weights at compile time and on attention's K in the "
                   "graph; k_sort permutes Q/K channels by norm first.")
    lossless = False

    @dataclass(frozen=True)
    class Config:
        """Options of bfp."""

        format: str = option("bfp16", "bfp12: 4-bit significands, bfp16: 8-bit",
                             choices=tuple(FORMATS))
        block: int = option(32, "elements per shared exponent along the contraction axis "
                            "(a partial last block is zero-padded)", choices=BLOCK_SIZES)
        weights: bool = option(True, "round MatMul/Gemm constant weights")
        keys: bool = option(False, "quantize-dequantize the K operand of every attention")
        k_sort: bool = option(False, "permute W_k/W_q channels in each head by W_k's L2 norm "
                              "(needs keys=true)")

    def call(self, model: ir.Model) -> PassResult:
        """Round the weights and insert K's quantize-dequantize in place."""
        c = self.config
        if not (c.weights or c.keys):
            raise PassConfigError("bfp: weights and keys are both false; nothing to round.")
        if c.k_sort and not c.keys:
            raise PassConfigError("bfp: k_sort=true needs keys=true (it only changes how K's "
                                  "channels fall into blocks).")
        ctx = PassContext.current()
        weights = weight_nodes(model) if c.weights else []
        attention = attention_scores(model) if c.keys else []
        if c.weights and not weights and not attention:
            raise UnsupportedModelError("bfp: the model has no MatMul or Gemm with a constant "
                                        "float32 weight.")
        if c.keys and not attention:
            raise UnsupportedModelError("bfp: keys=true but no attention (softmax over a Q K^T "
                                        "MatMul) was found.")
        report: dict[str, Any] = {"format": c.format, "block": c.block}
        if c.k_sort:
            report["k_sort"] = sort_checked(model, attention, ctx)
        if c.weights:
            report["weights"] = round_weights(model.graph, weights, c.format, c.block)
        if c.keys:
            report["keys"] = [quantize_keys(model, score, c.format, c.block) for _, score in attention]
        ctx.report[self.name] = report
        return PassResult(model, True)


def contraction_axis(node: ir.Node, rank: int) -> int:
    """The axis of the weight (input 1) that a MatMul/Gemm sums over."""
    if node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int():
        return 1
    return rank - 2


def weight_nodes(model: ir.Model) -> list[ir.Node]:
    """MatMul/Gemm nodes whose weight (input 1) is a float32 initializer of rank >= 2."""
    out = []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain != "" or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is not None and w.const_value is not None and w.const_value.dtype == ir.DataType.FLOAT \
                and len(w.const_value.shape) >= 2:
            out.append(node)
    return out


def round_weights(graph: ir.Graph, nodes: list[ir.Node], fmt: str, block: int) -> dict[str, Any]:
    """Give each node its weight rounded to BFP (shared weights are rounded once)."""
    done: dict[tuple[int, int], ir.Value] = {}
    padded = []
    for node in nodes:
        w = node.inputs[1]
        array = np.asarray(w.const_value.numpy(), np.float32)
        axis = contraction_axis(node, array.ndim)
        key = (id(w), axis)
        if key not in done:
            rounded = bfp_quantize(array, fmt, block, axis=axis)
            done[key] = _initializer(graph, f"{w.name}.{fmt}", rounded)
            if array.shape[axis] % block:
                padded.append(f"{w.name} ({array.shape[axis]})")
        node.replace_input_with(1, done[key])
        if not w.uses() and not w.is_graph_input() and not w.is_graph_output():
            graph.initializers.pop(w.name, None)  # the float weights leave the artifact
        mark(node, format=fmt, block=block, operand="weight", significand_bits=FORMATS[fmt],
             exponent_bits=8)
    return {"nodes": len(nodes), "tensors": len(done), "padded": padded}


def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name = base
    while name in graph.initializers:
        name += "_"
    value = ir.Value(name=name, const_value=ir.tensor(array), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.FLOAT))
    graph.register_initializer(value)
    return value


def attention_scores(model: ir.Model) -> list[tuple[Any, ir.Node]]:
    """(attention region, its score MatMul Q K^T) for every attention region with a softmax."""
    from winnow.ir.attention import _score_matmul
    from winnow.ir.regions import find_regions

    out = []
    for region in find_regions(model).all():
        if region.kind != "attention":
            continue
        allowed = {id(n) for n in region.nodes}
        for softmax in (n for n in region.nodes if n.op_type == "Softmax"):
            score = _score_matmul(softmax, allowed)
            if score is not None:
                out.append((region, score))
    return out


def quantize_keys(model: ir.Model, score: ir.Node, fmt: str, block: int) -> dict[str, Any]:
    """Insert an exact BFP quantize-dequantize of the score MatMul's K operand (axis -2)."""
    k = score.inputs[1]
    if k.shape is None or len(k.shape) < 2 or not isinstance(k.shape[-2], int):
        raise UnsupportedModelError(f"bfp: the K operand '{k.name}' of '{score.name}' has no static "
                                    "head dimension (run shape-inference first).")
    em = Emitter(model.graph, score, tag="bfp")
    rounded = bfp_graph(em, k, len(k.shape), k.shape[-2], FORMATS[fmt], block,
                        model.opset_imports.get("", 13))
    rounded.type, rounded.shape = k.type, k.shape
    score.replace_input_with(1, rounded)
    for node in em.nodes:
        mark(node, op="bfp-qdq", format=fmt, block=block)
    mark(score, format=fmt, block=block, operand="k", significand_bits=FORMATS[fmt], exponent_bits=8)
    return {"node": score.name, "head_dim": k.shape[-2], "padded": bool(k.shape[-2] % block)}


def bfp_graph(em: Emitter, x: ir.Value, rank: int, length: int, p: int, block: int,
              opset: int) -> ir.Value:
    """BFP quantize-dequantize of `x` (rank `rank`) along axis -2 of static `length`, as ONNX ops."""
    perm = [*range(rank - 2), rank - 1, rank - 2]
    t = em.op("Transpose", x, perm=perm)
    pad = -length % block
    if pad:
        t = em.op("Pad", t, em.const([0] * rank + [0] * (rank - 1) + [pad], np.int64))
    shape = em.op("Shape", t)
    blocks = em.op("Reshape", t, em.const([-1, block], np.int64))
    nonfinite = em.op("Or", em.op("IsInf", blocks), em.op("IsNaN", blocks))
    magnitude = em.op("Where", nonfinite, em.const(0.0), em.op("Abs", blocks))
    if opset >= 18:
        top = em.op("ReduceMax", magnitude, em.const([-1], np.int64), keepdims=1)
    else:
        top = em.op("ReduceMax", magnitude, axes=[-1], keepdims=1)
    exponent = exponent_of(em, em.op("Max", top, em.const(MIN_NORMAL)))
    exponent = em.op("Where", em.op("Less", top, em.const(MIN_NORMAL)),
                     em.const(EXPONENT_MIN, np.int64), exponent)
    power = em.op("Gather", em.const(powers_of_two()), em.op("Add", exponent, em.const(127, np.int64)))
    step = em.op("Mul", power, em.const(2.0 ** -(p - 2)))
    limit = float(2 ** (p - 1) - 1)
    q = em.op("Clip", em.op("Round", em.op("Div", blocks, step)), em.const(-limit), em.const(limit))
    # ORT's Where turns a -0 taken from its first branch into +0: the rounded values go second.
    out = em.op("Where", nonfinite, blocks, em.op("Mul", q, step))
    out = em.op("Reshape", out, shape)
    if pad:
        out = em.op("Slice", out, em.const([0], np.int64), em.const([length], np.int64),
                    em.const([-1], np.int64))
    return em.op("Transpose", out, perm=perm)


def sort_checked(model: ir.Model, attention: list[tuple[Any, ir.Node]],
                 ctx: PassContext) -> dict[str, Any]:
    """K-sort every attention region, then check on one calibration batch that the scores did
    not change (beyond float summation order); refuse otherwise."""
    from winnow.ir.execute import run
    from winnow.passes.analysis.calibration import calibration_batches

    feeds = calibration_batches(model, ctx)[0]
    names = [score.outputs[0].name for _, score in attention]
    before = run(model, feeds, capture=names)
    regions = {region.name: region for region, _ in attention}
    report = {name: k_sort(model.graph, region) for name, region in regions.items()}
    after = run(model, feeds, capture=names)
    for name in names:
        scale = max(float(np.abs(before[name]).max()), 1e-30)
        change = float(np.abs(after[name] - before[name]).max()) / scale
        if not change <= SCORE_TOLERANCE:
            raise UnsupportedModelError(f"bfp: k_sort changed the attention scores '{name}' by "
                                        f"{change:.2e} of their largest value; the model's Q/K "
                                        "layout is not one k_sort understands.")
    return report


def k_sort(graph: ir.Graph, region: Any) -> dict[str, Any]:
    """Permute each head's W_k (and W_q) output channels by W_k's column L2 norm, largest first;
    with rotary embeddings (half-split), whole rotary pairs (c, c + d/2) move together and the
    cos/sin tables are permuted per head with them."""
    from winnow.ir.pruning import const_array, slice_projection, weight_node

    heads = region.heads
    if heads is None or not (heads.q and heads.k and heads.head_dim and heads.num_heads
                             and heads.num_kv_heads) or heads.q == heads.k:
        raise UnsupportedModelError(f"bfp: k_sort cannot find separate Q and K projections and "
                                    f"the head layout of '{region.name}'.")
    q_node, k_node = weight_node(region, heads.q), weight_node(region, heads.k)
    q_tables, k_tables = _rotary_tables(q_node, region), _rotary_tables(k_node, region)
    rotary = bool(q_tables or k_tables)
    d, group = heads.head_dim, heads.num_heads // heads.num_kv_heads
    w = const_array(k_node.inputs[1]).astype(np.float64)
    trans = k_node.op_type == "Gemm" and "transB" in k_node.attributes \
        and k_node.attributes["transB"].as_int()
    norms = np.linalg.norm(w, axis=1 if trans else 0).reshape(heads.num_kv_heads, d)
    per_kv = [_head_order(n, rotary) for n in norms]
    k_perm = np.concatenate([g * d + per_kv[g] for g in range(heads.num_kv_heads)])
    q_perm = np.concatenate([h * d + per_kv[h // group] for h in range(heads.num_heads)])
    for node, perm in ((k_node, k_perm), (q_node, q_perm)):
        slice_projection(graph, node, perm, "out")
        _permute_bias_add(graph, node, perm)
    for tables, orders in ((k_tables, per_kv), (q_tables, [per_kv[h // group]
                                                           for h in range(heads.num_heads)])):
        for mul, index in tables:
            _permute_table(graph, mul, index, orders, region.name)
    moved = int(np.sum(k_perm != np.arange(len(k_perm))))
    return {"heads": heads.num_heads, "kv_heads": heads.num_kv_heads, "rotary": rotary,
            "channels_moved": moved}


def _head_order(norms: np.ndarray, rotary: bool) -> np.ndarray:
    """One head's channel order, largest norm first; rotary pairs (c, c + d/2) by their joint
    norm, kept together."""
    if not rotary:
        return np.argsort(-norms, kind="stable")
    half = len(norms) // 2
    pairs = np.argsort(-(norms[:half] ** 2 + norms[half:] ** 2), kind="stable")
    return np.concatenate([pairs, pairs + half])


def _rotary_tables(projection: ir.Node, region: Any) -> list[tuple[ir.Node, int]]:
    """(Mul, input index) of the rotary cos/sin tables between a projection and the scores;
    refuses when another op there mixes channels."""
    allowed = {id(n) for n in region.nodes}
    on_path = {id(v) for v in projection.outputs}
    queue, seen, tables, ops = deque(projection.outputs), set(), [], set()
    while queue:
        for user, _ in queue.popleft().uses():
            if id(user) in seen or id(user) not in allowed or user.op_type == "Shape":
                continue
            seen.add(id(user))
            if user.op_type == "MatMul" and all(i.const_value is None for i in user.inputs):
                continue  # the score MatMul
            ops.add(user.op_type)
            if user.op_type not in CHANNEL_PRESERVING | ROTARY:
                raise UnsupportedModelError(
                    f"bfp: k_sort needs the Q and K projections of '{region.name}' to reach the "
                    f"scores through reshapes, transposes, bias/scale ops and half-split rotary "
                    f"embeddings only; '{user.name}' ({user.op_type}) sits between them.")
            if user.op_type == "Mul":
                tables += [(user, i) for i, v in enumerate(user.inputs)
                           if id(v) not in on_path and not _scalar(v)]
            on_path.update(id(o) for o in user.outputs)
            queue.extend(user.outputs)
    if ops & ROTARY and not tables:
        raise UnsupportedModelError(f"bfp: k_sort found {', '.join(sorted(ops & ROTARY))} between "
                                    f"the projections and the scores of '{region.name}' but no "
                                    "rotary cos/sin table.")
    return tables


def _scalar(value: ir.Value) -> bool:
    return value.const_value is not None and value.const_value.size == 1


def _permute_table(graph: ir.Graph, mul: ir.Node, index: int, orders: list[np.ndarray],
                   region: str) -> None:
    """Replace a [seq, d] rotary table read by `mul` with [heads, seq, d]: head h's columns in
    `orders[h]`."""
    table = mul.inputs[index]
    if table.shape is None or len(table.shape) != 2:
        raise UnsupportedModelError(f"bfp: k_sort supports rotary tables of shape [seq, head_dim]; "
                                    f"'{table.name}' in '{region}' has shape {table.shape}.")
    em = Emitter(graph, mul, tag="k_sort")
    picked = em.op("Gather", table, em.const(np.stack(orders), np.int64), axis=-1)
    mul.replace_input_with(index, em.op("Transpose", picked, perm=[1, 0, 2]))


def _permute_bias_add(graph: ir.Graph, node: ir.Node, perm: np.ndarray) -> None:
    """Permute the constant bias of an Add right after a MatMul projection."""
    from winnow.ir.pruning import const_array, set_const_input

    for user, _ in node.outputs[0].uses():
        if user.op_type != "Add":
            continue
        for index, value in enumerate(user.inputs):
            bias = const_array(value)
            if bias is not None and bias.ndim >= 1 and bias.shape[-1] == len(perm):
                set_const_input(graph, user, index, np.take(bias, perm, axis=-1))

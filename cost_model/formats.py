"""Numerics formats as the rewrites mark them (`winnow.numerics.mark`): priced as the format,
not as the float graph that emulates it in ONNX Runtime.

- BFP on an operand (`format=bfpNN, block=n, operand=weight|k`): each element of that operand
  takes p significand bits plus its share of one 8-bit exponent per block of n along the
  contraction axis (a last, shorter block has an exponent of its own). The other operand stays
  float, so the products stay fp32 multiply-adds; decoding each BFP element (its block's
  exponent added to the significand's) is one 8-bit integer add.
- L-Mul (`op=lmul, bits=b, terms=t`, on the node that ends the rewritten MatMul/Gemm/Mul):
  every product is one integer add of width b, and a MatMul's products are accumulated with
  fp32 adds. The node stands for the original op: its products are one term MatMul's MACs
  (the rewrite forms t = 2^m of them, each with all the products), its bytes are those of the
  original operands (the values its emulation reads that no emulation node makes, less the
  rewrite's own constants) and its output. Integer adds run at the target's int8 rate.
- The nodes that only emulate a format (`op=lmul-emulation`, `op=bfp-qdq`) cost nothing.
- int8 and int4 need no mark: the quantized ops' tensors carry their dtypes (MatMulInteger,
  ConvInteger, MatMulNBits' packed blocks), so op_costs prices their bytes as stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from winnow.cost_model.op_costs import OpCost, Shape

EMULATION = ("lmul-emulation", "bfp-qdq")
EXPONENT_BITS = 8


def bfp_bytes(shape: Shape, significand_bits: int, block: int, axis: int) -> float:
    """Bytes of a tensor stored in BFP: p bits per element, one 8-bit exponent per block of
    `block` elements along `axis` (the axis padded up to whole blocks)."""
    length = shape[axis]
    blocks = math.prod(shape) // length * math.ceil(length / block)
    return (math.prod(shape) * significand_bits + blocks * EXPONENT_BITS) / 8.0


def _contraction_axis(cost: OpCost, operand: str, rank: int, trans_b: bool) -> int:
    if operand == "k" or cost.op_type != "Gemm":
        return rank - 2
    return 1 if trans_b else 0


def _price_bfp(cost: OpCost, ins: Sequence[Shape | None], trans_b: bool) -> None:
    m = cost.marks
    shape = ins[1] if len(ins) > 1 else None
    if shape is None or len(shape) < 2:
        cost.note = cost.note or "BFP operand of unknown shape: priced as float"
        return
    axis = _contraction_axis(cost, m.get("operand", "weight"), len(shape), trans_b)
    stored = bfp_bytes(shape, int(m["significand_bits"]), int(m["block"]), axis)
    floats = math.prod(shape) * 4.0
    if m.get("operand") == "weight":
        cost.weight_bytes += stored - floats
    else:
        cost.act_read += stored - floats
    macs = cost.flops / 2.0
    cost.ops = {"fp32_mult": macs, "fp32_add": macs, "int8_add": float(math.prod(shape))}


def _price_lmul(cost: OpCost, group: list[OpCost], sizes: dict[str, float],
                weights: set[str], out_shape: Shape | None) -> None:
    m = cost.marks
    of = str(m.get("of", ""))
    produced = {o for c in group for o in c.outputs}
    own_consts = f"{of}.lmul."
    originals = {n for c in group for n in c.inputs
                 if n and n not in produced and not n.startswith(own_consts)}
    terms = [c for c in group if c.op_type == "MatMul"]
    matmul = m.get("of_op") in ("MatMul", "Gemm")
    products = (terms[0].flops / 2.0 if terms else 0.0) if matmul else float(math.prod(out_shape or (0,)))
    cost.kind = "matmul" if matmul else "elementwise"
    cost.dtype = "lmul"
    cost.flops = 2.0 * products if matmul else products
    cost.weight_bytes = sum(sizes.get(n, 0.0) for n in originals if n in weights)
    cost.act_read = sum(sizes.get(n, 0.0) for n in originals if n not in weights)
    cost.ops = {f"int{int(m['bits'])}_add": products}
    if matmul:
        cost.ops["fp32_add"] = products
    cost.note = (f"L-Mul of {of} ({m.get('of_op')}, m={m.get('m')}): {products:.0f} products as "
                 f"{int(m['bits'])}-bit integer adds")


def price_formats(costs: list[OpCost], shapes: dict[str, Shape | None], sizes: dict[str, float],
                  weights: set[str], trans_b: dict[int, bool]) -> None:
    """Reprice, in place, the nodes a numerics rewrite marked (see the module docstring).

    `shapes` and `sizes` give each value's shape and bytes, `weights` the initializers,
    `trans_b` the transB attribute of each Gemm (by index in `costs`)."""
    groups: dict[str, list[OpCost]] = {}
    for c in costs:
        if c.marks.get("op") in ("lmul", "lmul-emulation"):
            groups.setdefault(str(c.marks.get("of", "")), []).append(c)
    for c in costs:  # before the emulation, whose term MatMuls count the products, is zeroed
        if c.marks.get("op") == "lmul":
            _price_lmul(c, groups[str(c.marks.get("of", ""))], sizes, weights,
                        shapes.get(c.outputs[0]) if c.outputs else None)
    for i, c in enumerate(costs):
        op = c.marks.get("op")
        if op in EMULATION:
            c.kind, c.flops, c.weight_bytes, c.act_read, c.act_write = "emulated", 0.0, 0.0, 0.0, 0.0
            c.ops, c.note = {}, f"emulates a numerics format ({op}); priced on the node it marks"
        elif op is None and "significand_bits" in c.marks:
            _price_bfp(c, [shapes.get(n) if n else None for n in c.inputs], trans_b.get(i, False))

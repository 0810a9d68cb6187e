"""`lmul`: the multiplies inside chosen MatMul/Gemm/Mul nodes become L-Mul products
(`winnow.numerics.lmul`), accumulated in float, executed in the ONNX Runtime artifact.

How it runs in ORT, with standard ONNX ops (no custom op, any opset >= 13): ONNX's BitCast exists
only from opset 26 (ORT 1.31 runs it only there, also not inside a function of another opset),
and the zoo models are opset 20, so instead of raising every node's opset the bit patterns are
never formed. Each operand is split exactly into P = +-2^e (exponent from a Log2 estimate
corrected by comparisons against a table of exact powers of two) and the index i of its mantissa
rounded to m bits (an exact division by P, Round: ties to even, a carry moves to the exponent).
An L-Mul product is then `Px Py f(ix, iy)` with `f = 1 + s` when `s = (ix + iy) 2^-m + 2^-l(m)`
is below 1, `2 s` when it carries once and `4 (s - 1)` twice (s >= 2); f has at most m + 2 significant bits, so the float multiply
that forms it is exact: the same bits as the integer add. A Mul node becomes that expression
(bit-exact, with the underflow flush). A MatMul becomes 2^m float MatMuls, one per mantissa
index j of the right operand: `sum_j (PA f(iA, j)) @ where(iB == j, PB, 0)`; every product the
kernels form is an exact L-Mul product, and they are summed in float (the kernels' order, not
the reference's). Differences from `numerics.lmul` in MatMuls, at the ends of the float range
only: a product below 2^-126 adds its float value instead of being flushed, an operand from
2^126 up may overflow before the product does, and an inf operand gives NaN (its products with the
other indices' zeros). Gemm: alpha and beta stay float multiplies (they are 1 in practice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from winnow.errors import PassConfigError, UnsupportedModelError
from winnow.numerics import mark
from winnow.numerics.lmul import M_MAX, M_MIN, offset_exponent
from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext

OP_TYPES = ("MatMul", "Gemm", "Mul")
ALL, ATTENTION = "all", "attention"
MIN_NORMAL = 2.0 ** -126


@register_pass
class LMulPass(Pass):
    """Replace the multiplies of chosen MatMul/Gemm/Mul nodes with L-Mul products."""

    name = "lmul"
    description = ("L-Mul (Addition is All You Need): products of chosen MatMul/Gemm/Mul nodes "
                   "become an add of exponents and mantissas with m mantissa bits, summed in "
                   "float; exact in ORT with standard ops.")
    lossless = False

    @dataclass(frozen=True)
    class Config:
        """Options of lmul."""

        m: int = option(3, "mantissa bits of the operands (the product's correction is 2^-l(m))",
                        min=M_MIN, max=M_MAX)
        nodes: tuple[str, ...] = option((ALL,), "which multiplies: [all] (every float MatMul, "
                                        "Gemm and Mul), [attention] (score and context MatMuls "
                                        "of every attention), or region and node names")

    def call(self, model: ir.Model) -> PassResult:
        """Rewrite the selected nodes in place; the report lists them."""
        ctx = PassContext.current()
        eligible = eligible_nodes(model)
        if not eligible:
            raise UnsupportedModelError("lmul: the model has no MatMul, Gemm or Mul node with two "
                                        "float32 inputs to rewrite.")
        chosen = select(model, eligible, self.config.nodes)
        counts: dict[str, int] = {}
        for node in chosen:
            rewrite(model.graph, node, self.config.m)
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        ctx.report[self.name] = {"m": self.config.m, "l": offset_exponent(self.config.m),
                                 "rewritten": counts, "nodes": [n.name for n in chosen],
                                 "matmul_terms": 2 ** self.config.m}
        return PassResult(model, True)


def eligible_nodes(model: ir.Model) -> list[ir.Node]:
    """Main-graph MatMul/Gemm/Mul nodes (default domain) whose two operands are float32."""
    out = []
    for node in model.graph:
        if node.op_type not in OP_TYPES or node.domain != "" or len(node.inputs) < 2:
            continue
        if all(v is not None and v.dtype == ir.DataType.FLOAT for v in node.inputs[:2]):
            out.append(node)
    return out


def select(model: ir.Model, eligible: list[ir.Node], selectors: Sequence[str]) -> list[ir.Node]:
    """The eligible nodes picked by the selectors, in graph order; one that picks none is an
    error naming valid choices."""
    if not selectors:
        raise PassConfigError("lmul: nodes is empty; give [all], [attention] or region/node names.")
    from winnow.ir.regions import find_regions

    regions = {r.name: r for r in find_regions(model).all()}
    by_id = {id(n): n for n in eligible}
    picked: set[int] = set()
    for sel in selectors:
        if sel == ALL:
            ids = set(by_id)
        elif sel == ATTENTION:
            ids = {id(n) for n in attention_matmuls(regions.values()) if id(n) in by_id}
        elif sel in regions:
            ids = {id(n) for n in regions[sel].nodes if id(n) in by_id}
        else:
            ids = {id(n) for n in eligible if n.name == sel}
        if not ids:
            names = [ALL, ATTENTION, *list(regions)[:4], *[n.name for n in eligible[:4]]]
            raise PassConfigError(f"lmul: nodes selector '{sel}' matches no float MatMul, Gemm or "
                                  f"Mul node; valid names include: {', '.join(names)}.")
        picked |= ids
    return [n for n in eligible if id(n) in picked]


def attention_matmuls(regions) -> list[ir.Node]:
    """The score (Q K^T) and context (P V) MatMuls of every attention region."""
    from winnow.ir.attention import _score_matmul

    out = []
    for region in regions:
        if region.kind != "attention":
            continue
        allowed = {id(n) for n in region.nodes}
        for softmax in (n for n in region.nodes if n.op_type == "Softmax"):
            score = _score_matmul(softmax, allowed)
            context = [u for u, _ in softmax.outputs[0].uses() if u.op_type == "MatMul"]
            out += [n for n in [score, *context] if n is not None and n not in out]
    return out


class Emitter:
    """Adds nodes in front of an anchor node, named after it; constants become initializers."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, tag: str = "lmul") -> None:
        self.graph, self.anchor = graph, anchor
        self.prefix = f"{anchor.name or anchor.op_type}.{tag}"
        self.nodes: list[ir.Node] = []
        self._consts: dict[tuple, ir.Value] = {}

    def op(self, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        """One output of a new node `op_type(inputs)`."""
        name = f"{self.prefix}.{len(self.nodes)}.{op_type}"
        node = ir.node(op_type, list(inputs), attributes or None, name=name)
        node.outputs[0].name = name
        self.graph.insert_before(self.anchor, node)
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array, dtype=np.float32) -> ir.Value:
        """An initializer holding `array`."""
        array = np.asarray(array, dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key in self._consts:
            return self._consts[key]
        name = f"{self.prefix}.c{len(self.graph.initializers)}"
        while name in self.graph.initializers:
            name += "_"
        value = ir.Value(name=name, const_value=ir.tensor(array), shape=ir.Shape(array.shape),
                         type=ir.TensorType(ir.tensor(array).dtype))
        self.graph.register_initializer(value)
        self._consts[key] = value
        return value


def powers_of_two() -> np.ndarray:
    """2^k for k = -127..128 as float32 (2^-127 subnormal, 2^128 = inf): exact table entries."""
    table = np.zeros(256, np.float32)
    table[:255] = np.ldexp(np.float32(1.0), np.arange(-127, 128)).astype(np.float32)
    table[255] = np.inf
    return table


def exponent_of(em: Emitter, a: ir.Value) -> ir.Value:
    """floor(log2 a) as int64 for finite a >= 2^-126 (the Log estimate corrected both ways)."""
    table = em.const(powers_of_two())
    guess = em.op("Cast", em.op("Floor", em.op("Mul", em.op("Log", a), em.const(1 / math.log(2)))),
                  to=ir.DataType.INT64)
    guess = em.op("Clip", guess, em.const(-126, np.int64), em.const(127, np.int64))
    power = em.op("Gather", table, em.op("Add", guess, em.const(127, np.int64)))
    below = em.op("Cast", em.op("Less", a, power), to=ir.DataType.INT64)
    above = em.op("Cast", em.op("GreaterOrEqual", a, em.op("Mul", power, em.const(2.0))),
                  to=ir.DataType.INT64)
    return em.op("Add", em.op("Sub", guess, below), above)


def split(em: Emitter, x: ir.Value, m: int) -> tuple[ir.Value, ir.Value]:
    """(P, i): x's mantissa rounded to m bits is 1 + i 2^-m and P = +-2^e its signed power of
    two; subnormals and zeros give P = +-0, inf and NaN give P = x (i = 0 for all three)."""
    table = em.const(powers_of_two())
    a = em.op("Abs", x)
    tiny = em.op("Less", a, em.const(MIN_NORMAL))
    nonfinite = em.op("Or", em.op("IsInf", x), em.op("IsNaN", x))
    safe = em.op("Where", em.op("Or", tiny, nonfinite), em.const(1.0), a)
    power = em.op("Gather", table, em.op("Add", exponent_of(em, safe), em.const(127, np.int64)))
    scaled = em.op("Mul", em.op("Sub", em.op("Div", safe, power), em.const(1.0)),
                   em.const(2.0 ** m))
    index = em.op("Round", scaled)
    carry = em.op("Equal", index, em.const(2.0 ** m))
    power = em.op("Where", carry, em.op("Mul", power, em.const(2.0)), power)
    index = em.op("Where", carry, em.const(0.0), index)
    signed = em.op("Where", em.op("Less", x, em.const(0.0)), em.op("Neg", power), power)
    # ORT's Where turns a -0 taken from its first branch into +0: signed zeros go second.
    signed = em.op("Where", em.op("Not", tiny), signed, em.op("Mul", x, em.const(0.0)))
    return em.op("Where", nonfinite, x, signed), index


def mantissa_factor(em: Emitter, i: ir.Value, j: ir.Value, m: int) -> ir.Value:
    """f(i, j) for s = (i + j) 2^-m + 2^-l(m): 1 + s without a carry, 2 s with one, 4 (s - 1)
    with two (s >= 2, possible for m >= 4)."""
    s = em.op("Add", em.op("Mul", em.op("Add", i, j), em.const(2.0 ** -m)),
              em.const(2.0 ** -offset_exponent(m)))
    carried = em.op("Where", em.op("Less", s, em.const(2.0)), em.op("Mul", s, em.const(2.0)),
                    em.op("Mul", em.op("Sub", s, em.const(1.0)), em.const(4.0)))
    return em.op("Where", em.op("Less", s, em.const(1.0)), em.op("Add", s, em.const(1.0)), carried)


def lmul_elementwise(em: Emitter, x: ir.Value, y: ir.Value, m: int) -> ir.Value:
    """x * y as L-Mul, bit for bit numerics.lmul (results below 2^-126 flushed to signed 0)."""
    (px, ix), (py, iy) = split(em, x, m), split(em, y, m)
    product = em.op("Mul", em.op("Mul", px, py), mantissa_factor(em, ix, iy, m))
    tiny = em.op("Less", em.op("Abs", product), em.const(MIN_NORMAL))
    return em.op("Where", em.op("Not", tiny), product, em.op("Mul", product, em.const(0.0)))


def lmul_matmul(em: Emitter, a: ir.Value, b: ir.Value, m: int) -> ir.Value:
    """a @ b with L-Mul products: one float MatMul per mantissa index of b, summed."""
    (pa, ia), (pb, ib) = split(em, a, m), split(em, b, m)
    total = None
    for j in range(2 ** m):
        left = em.op("Mul", pa, mantissa_factor(em, ia, em.const(float(j)), m))
        right = em.op("Where", em.op("Equal", ib, em.const(float(j))), pb, em.const(0.0))
        term = em.op("MatMul", left, right)
        total = term if total is None else em.op("Add", total, term)
    return total


def rewrite(graph: ir.Graph, node: ir.Node, m: int) -> None:
    """Replace `node` by its L-Mul form; every new node is marked for the cost model."""
    em = Emitter(graph, node)
    a, b = node.inputs[0], node.inputs[1]
    if node.op_type == "Mul":
        out = lmul_elementwise(em, a, b, m)
    elif node.op_type == "MatMul":
        out = lmul_matmul(em, a, b, m)
    else:
        out = _gemm(em, node, m)
    result = node.outputs[0]
    out.type, out.shape = result.type, result.shape
    result.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    name, result.name = result.name, None
    out.name = name
    for new in em.nodes:
        mark(new, op="lmul-emulation", m=m, of=node.name)
    mark(out.producer(), op="lmul", m=m, bits=m + 9, of=node.name, of_op=node.op_type,
         terms=2 ** m if node.op_type != "Mul" else 1)


def _gemm(em: Emitter, node: ir.Node, m: int) -> ir.Value:
    """alpha op(A) @ op(B) + beta C with the matrix product as L-Mul."""
    attr = lambda k, d: node.attributes[k].value if k in node.attributes else d  # noqa: E731
    a, b = node.inputs[0], node.inputs[1]
    if attr("transA", 0):
        a = em.op("Transpose", a, perm=[1, 0])
    if attr("transB", 0):
        b = em.op("Transpose", b, perm=[1, 0])
    out = lmul_matmul(em, a, b, m)
    if attr("alpha", 1.0) != 1.0:
        out = em.op("Mul", out, em.const(attr("alpha", 1.0)))
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is not None:
        if attr("beta", 1.0) != 1.0:
            c = em.op("Mul", c, em.const(attr("beta", 1.0)))
        out = em.op("Add", out, c)
    return out

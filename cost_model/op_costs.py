"""Per-node costs: FLOPs, bytes read (weights, activations) and written, op kind and dtype.

Shapes come from ONNX shape inference run on a copy of the graph whose symbolic dims are set
to concrete sizes (`resolve_dims`); ORT's contrib ops, which ONNX does not know, get their
output shapes from the small rules in `_contrib_shape`. A multiply-add counts as 2 FLOPs.
An op without a rule is priced by its bytes alone and flagged (`priced=False`), never zero.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_ir as ir

from winnow.errors import WinnowError
from winnow.numerics import NODE_KEY, marks

MS = "com.microsoft"
DEFAULT_BATCH = 1
DEFAULT_DIM = 64  # other symbolic dims, as `winnow bench` fills them
FOLD_ROUNDS = 4  # rounds of shape folding and inference at most
BIG_TENSOR = 1024  # initializers above this many bytes are left out of shape inference

Shape = tuple[int, ...]


class ShapeSpecError(WinnowError):
    """Input shapes given to the cost model do not fit the model's inputs."""


@dataclass
class OpCost:
    """The cost of one node: work, traffic, kind and compute dtype."""

    name: str
    op_type: str
    domain: str
    kind: str
    dtype: str
    flops: float
    weight_bytes: float
    act_read: float
    act_write: float
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    priced: bool = True
    note: str = ""
    marks: dict[str, Any] = field(default_factory=dict)  # what a numerics rewrite recorded
    ops: dict[str, float] = field(default_factory=dict)  # energy-table op counts of a format
    rank: int = 0  # rank of input 0 (ORT fuses a MatMul's bias and activation only in 2-D)
    perm: tuple[int, ...] = ()  # a Transpose's permutation

    @property
    def bytes(self) -> float:
        """All bytes read and written."""
        return self.weight_bytes + self.act_read + self.act_write

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte."""
        return self.flops / self.bytes if self.bytes else 0.0


# ---------------------------------------------------------------- kinds and per-element FLOPs

VIEW = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Dropout"}
FREE = {"Constant", "Shape", "Size", "ConstantOfShape"}
DATA = {"Transpose", "Gather", "GatherElements", "GatherND", "Concat", "Slice", "Split", "Expand",
        "Tile", "Pad", "ScatterND", "ScatterElements", "Range", "DepthToSpace", "SpaceToDepth",
        "Resize", "Upsample", "Cast", "CastLike", "NonZero", "TopK", "Trilu", "OneHot",
        "EyeLike", "Compress", "CumSum"}
# elementwise ops and their FLOPs per output element
ELEMENTWISE = {
    "Add": 1, "Sub": 1, "Mul": 1, "Div": 1, "Neg": 1, "Abs": 1, "Relu": 1, "LeakyRelu": 2,
    "PRelu": 2, "Max": 1, "Min": 1, "Mod": 1, "Where": 1, "Equal": 1, "Less": 1,
    "LessOrEqual": 1, "Greater": 1, "GreaterOrEqual": 1, "And": 1, "Or": 1, "Xor": 1, "Not": 1,
    "Clip": 2, "Floor": 1, "Ceil": 1, "Round": 1, "Sign": 1, "Reciprocal": 1, "Sqrt": 4,
    "Pow": 8, "Exp": 8, "Log": 8, "Erf": 8, "Tanh": 8, "Sigmoid": 8, "HardSigmoid": 3,
    "HardSwish": 4, "Gelu": 10, "Elu": 8, "Selu": 8, "Softplus": 8, "Mish": 12, "Sin": 8,
    "Cos": 8, "IsNaN": 1, "IsInf": 1, "BitShift": 1, "Sum": 1, "Mean": 2, "ThresholdedRelu": 1,
    "QuickGelu": 9, "FastGelu": 10, "BiasGelu": 11, "BiasAdd": 2,
}
REDUCE = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
          "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin",
          "GlobalAveragePool", "GlobalMaxPool"}
POOL = {"MaxPool", "AveragePool", "LpPool"}
NORM = {"LayerNormalization": 8, "SimplifiedLayerNormalization": 5, "BatchNormalization": 2,
        "InstanceNormalization": 8, "GroupNormalization": 8, "SkipLayerNormalization": 9,
        "SkipSimplifiedLayerNormalization": 6, "LpNormalization": 3, "EmbedLayerNormalization": 9}
SOFTMAX = {"Softmax": 5, "LogSoftmax": 6}
QUANT = {"QuantizeLinear": 3, "DequantizeLinear": 2, "DynamicQuantizeLinear": 5}
MATMUL = {"MatMul", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
          "MatMulIntegerToFloat"}
CONV = {"Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv"}
ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
SOFTMAX_PER_SCORE = 5


# ---------------------------------------------------------------- shapes


def _dtype_name(elem: int | None) -> str:
    if elem in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
        return "int8"
    if elem in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return "int4"
    if elem in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        return "fp16"
    if elem == onnx.TensorProto.DOUBLE:
        return "fp64"
    if elem == onnx.TensorProto.FLOAT:
        return "fp32"
    return "int"


@functools.cache
def _elem_size(elem: int) -> float:
    if elem in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return 0.5
    if elem in (0, onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 4.0
    return float(onnx.helper.tensor_dtype_to_np_dtype(elem).itemsize)


def resolve_dims(model: ir.Model,
                 input_shapes: Mapping[str, int | Sequence[int]] | None) -> tuple[dict[str, Shape], dict[str, int]]:
    """Concrete shapes of the graph inputs, and the symbolic dims that took a default.

    `input_shapes` maps an input name to its full shape, or a symbolic dim name to its size
    (`{"batch": 8, "seq": 64}`). Other symbolic dims default to 1 on the first axis and to
    64 elsewhere (as `winnow bench` fills them); those are returned as the second value.
    """
    given = dict(input_shapes or {})
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    names = {v.name for v in inputs}
    dims = {k: int(v) for k, v in given.items() if k not in names and not isinstance(v, (list, tuple))}
    known_syms = {str(d) for v in inputs for d in (v.shape or ()) if not isinstance(d, int)}
    unknown = [k for k in given if k not in names and k not in known_syms]
    if unknown:
        raise ShapeSpecError(f"'{unknown[0]}' is neither an input nor a symbolic dim of the model; "
                             f"inputs: {', '.join(sorted(names)) or 'none'}; symbolic dims: "
                             f"{', '.join(sorted(known_syms)) or 'none'}.")
    shapes, defaulted = {}, {}
    for value in inputs:
        if value.name in given and isinstance(given[value.name], (list, tuple)):
            shape = tuple(int(d) for d in given[value.name])
            if value.shape is not None and len(shape) != len(value.shape):
                raise ShapeSpecError(f"input '{value.name}' has rank {len(value.shape)}, but the "
                                     f"shape given for it, {list(shape)}, has rank {len(shape)}.")
            shapes[value.name] = shape
            continue
        if value.shape is None:
            raise ShapeSpecError(f"input '{value.name}' has no known rank; give its full shape.")
        out = []
        for axis, d in enumerate(value.shape):
            if isinstance(d, int):
                out.append(d)
                continue
            key = str(d)
            if key not in dims:
                dims[key] = defaulted[key] = DEFAULT_BATCH if axis == 0 else DEFAULT_DIM
            out.append(dims[key])
        shapes[value.name] = tuple(out)
    return shapes, defaulted


def _set_input_shapes(proto: onnx.ModelProto, shapes: Mapping[str, Shape]) -> None:
    for vi in proto.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[vi.name]:
                dims.add().dim_value = int(d)


def _value_types(proto: onnx.ModelProto) -> dict[str, tuple[Shape | None, int]]:
    out: dict[str, tuple[Shape | None, int]] = {}
    graph = proto.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tt = vi.type.tensor_type
        shape: Shape | None = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            shape = None if any(d is None for d in dims) else tuple(dims)
        previous = out.get(vi.name)
        if previous is None or previous[0] is None:
            out[vi.name] = (shape, tt.elem_type)
    for init in graph.initializer:
        if init.name not in out or out[init.name][0] is None:
            out[init.name] = (tuple(int(d) for d in init.dims), init.data_type)
    return out


def _inference_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto for shape inference, its large initializers turned into inputs.

    Small initializers (shape constants, slice bounds) stay initializers only, so ONNX's data
    propagation can read them (an initializer that is also an input could be overridden and is
    not treated as a constant). Intermediate values are written without their (possibly
    symbolic, stale) types and shapes: inference starts from the inputs, and serializing them
    was a third of `predict`'s time. The model is restored as it was, initializer order included.
    """
    graph = model.graph
    order = list(graph.initializers.values())
    big = [v for v in order if v.const_value is None or v.const_value.nbytes > BIG_TENSOR]
    saved = {v.name: v.const_value for v in big}
    ends = {id(v) for v in graph.outputs}
    hidden = [(v, v.type, v.shape) for node in graph for v in node.outputs
              if id(v) not in ends and (v.type is not None or v.shape is not None)]
    added = []
    try:
        for v, _, _ in hidden:
            v.shape, v.type = None, None
        for v in big:
            if v.const_value is not None:
                v.shape = v.shape or ir.Shape(v.const_value.shape)
                v.dtype = v.dtype or v.const_value.dtype
            graph.initializers.pop(v.name)
            v.const_value = None
            if v not in graph.inputs:
                graph.inputs.append(v)
                added.append(v)
        return _topological(ir.serde.serialize_model(model))
    finally:
        for v, type_, shape in hidden:
            v.type, v.shape = type_, shape
        for v in added:
            graph.inputs.remove(v)
        for v in big:
            v.const_value = saved[v.name]
        graph.initializers.clear()
        for v in order:
            graph.initializers[v.name] = v


def _topological(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with its main-graph nodes in an order where producers come first (keeping the
    given order where it already does): ONNX shape inference reads nodes in file order, and ORT's
    fp16 converter appends the input Casts at the end (every shape of an fp16 digits-vit was
    unknown)."""
    import heapq

    nodes = list(proto.graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    needs = [{producer[x] for x in n.input if x in producer and producer[x] != i}
             for i, n in enumerate(nodes)]
    users: dict[int, list[int]] = {}
    for i, deps in enumerate(needs):
        for d in deps:
            users.setdefault(d, []).append(i)
    waiting = [len(d) for d in needs]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes) or order == sorted(order):  # a cycle, or already sorted
        return proto
    del proto.graph.node[:]
    proto.graph.node.extend(nodes[i] for i in order)
    return proto


def _infer(proto: onnx.ModelProto, data_prop: bool) -> onnx.ModelProto:
    """ONNX shape inference; `data_prop` only where needed: ONNX propagates the values of every
    rank-1 tensor, one proto dim per element (an Add of two 1-D tensors of 10^8 floats takes
    gigabytes)."""
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False,
                                                 data_prop=data_prop)
    except Exception:  # noqa: BLE001 - onnx raises several types; fall back to our own rules
        return proto


def infer_shapes(model: ir.Model, shapes: Mapping[str, Shape]) -> dict[str, tuple[Shape | None, int]]:
    """Concrete (shape, elem type) of every value, by ONNX shape inference on the given inputs.

    Where a shape depends on computed shape data (a Slice whose end is a Shape), the small
    integer tensors are evaluated with numpy (shape_values.py), written into the proto as
    constants, and inference runs once more, with ONNX's data propagation.
    """
    from winnow.cost_model.shape_values import fold_shape_values

    proto = _inference_proto(model)
    _set_input_shapes(proto, shapes)
    inferred = _infer(proto, data_prop=False)
    types = _value_types(inferred)
    for _ in range(FOLD_ROUNDS):  # a folded shape can make the next shape computable
        if all(shape is not None for shape, _ in types.values()):
            break
        before = sum(shape is None for shape, _ in types.values())
        fold_shape_values(proto, types)
        inferred = _infer(proto, data_prop=True)
        types = _value_types(inferred)
        if sum(shape is None for shape, _ in types.values()) >= before:
            break
    for value in model.graph.initializers.values():
        if value.name not in types or types[value.name][0] is None:
            cv = value.const_value
            if cv is not None:
                types[value.name] = (tuple(int(d) for d in cv.shape), int(cv.dtype.value))
    return types


# ---------------------------------------------------------------- contrib-op shapes


def _broadcast(shapes: list[Shape]) -> Shape | None:
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0}
        dims.discard(1)
        if len(dims) > 1:
            return None
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _matmul_shape(a: Shape, b: Shape) -> Shape | None:
    if len(a) < 1 or len(b) < 1:
        return None
    a2, b2 = (a if len(a) > 1 else (1, *a)), (b if len(b) > 1 else (*b, 1))
    batch = _broadcast([a2[:-2] or (1,), b2[:-2] or (1,)]) if len(a2) > 2 or len(b2) > 2 else ()
    if batch is None:
        return None
    out = (*(batch if max(len(a2), len(b2)) > 2 else ()), a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def _contrib_shape(node: ir.Node, ins: list[Shape | None]) -> Shape | None:
    """Output 0 shape for ops ONNX shape inference does not know (ORT contrib ops)."""
    op, a = node.op_type, ins[0] if ins else None
    if a is None:
        return None
    if op in ("MatMulNBits",):
        return (*a[:-1], _attr(node, "N", a[-1]))
    if op in MATMUL and len(ins) > 1 and ins[1]:
        a2 = a[:-2] + (a[-1], a[-2]) if _attr(node, "transA", 0) and len(a) > 1 else a
        b = ins[1]
        b2 = b[:-2] + (b[-1], b[-2]) if _attr(node, "transB", 0) and len(b) > 1 else b
        return _matmul_shape(a2, b2)
    if op == "Attention" and len(ins) > 1 and ins[1]:
        return (*a[:-1], ins[1][-1] // 3)
    if op in ("MultiHeadAttention", "GroupQueryAttention"):
        return a
    if op in ELEMENTWISE or op in NORM or op in QUANT or op in SOFTMAX or op in ("Gelu",):
        known = [s for s in ins if s is not None]
        return _broadcast(known) if known else None
    return None


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


# ---------------------------------------------------------------- per-node FLOPs


def _numel(shape: Shape | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _matmul_flops(a: Shape | None, out: Shape | None) -> float:
    if a is None or out is None:
        return 0.0
    k = a[-1] if len(a) else 1
    return 2.0 * _numel(out) * k


def _conv_flops(node: ir.Node, ins: list, outs: list) -> float:
    w, out = ins[1] if len(ins) > 1 else None, outs[0]
    if w is None or out is None:
        return 0.0
    per_out = 2.0 * math.prod(w[1:])  # (C_in / groups) * kernel positions
    bias = _numel(out) if len(ins) > 2 and ins[2] is not None else 0
    return per_out * _numel(out) + bias


def _conv_transpose_flops(node: ir.Node, ins: list, outs: list) -> float:
    x, w = ins[0], ins[1] if len(ins) > 1 else None
    if x is None or w is None:
        return 0.0
    # every input element is multiplied into a (C_out / groups) x kernel window
    return 2.0 * _numel(x) * math.prod(w[1:])


def _attention_flops(node: ir.Node, ins: list, outs: list) -> float:
    x = ins[0]
    if x is None or len(x) < 3:
        return 0.0
    heads = _attr(node, "num_heads", 1)
    if node.op_type == "Attention":
        b, s, d_in = x
        w = ins[1]
        d = w[-1] // 3 if w else d_in
        proj = 2.0 * b * s * d_in * 3 * d
        length = s
    else:
        b, s, d = x
        k = ins[1] if len(ins) > 1 and ins[1] is not None else x
        length = k[1] if len(k) >= 3 else s
        proj = 0.0
    scores = b * heads * s * length
    return proj + 4.0 * b * s * length * d + SOFTMAX_PER_SCORE * scores


def _classify(node: ir.Node) -> tuple[str, float | None]:
    """(kind, FLOPs per output element or None when a dedicated rule applies)."""
    op = node.op_type
    if op in FREE:
        return "free", 0.0
    if op in VIEW:
        return "view", 0.0
    if op in ATTENTION:
        return "attention", None
    if op in MATMUL or op in ("Gemm", "MatMulNBits"):
        return "matmul", None
    if op in CONV:
        return "conv", None
    if op == "ConvTranspose":
        return "conv", None
    if op in NORM:
        return "norm", NORM[op]
    if op in SOFTMAX:
        return "softmax", SOFTMAX[op]
    if op in REDUCE:
        return "reduce", None
    if op in POOL:
        return "pool", None
    if op in QUANT:
        return "quantize", QUANT[op]
    if op in ELEMENTWISE:
        return "elementwise", ELEMENTWISE[op]
    if op in DATA:
        return "data", 0.0
    return "unknown", 0.0


def _flops(node: ir.Node, kind: str, per_elem: float | None, ins: list, outs: list) -> float:
    op, out = node.op_type, outs[0] if outs else None
    if kind in ("matmul",):
        if op == "Gemm":
            a = ins[0]
            k = a[0] if a is not None and _attr(node, "transA", 0) else (a[-1] if a else 0)
            bias = _numel(out) if len(ins) > 2 and ins[2] is not None else 0
            return 2.0 * _numel(out) * k + bias
        if op == "MatMulNBits":
            return 2.0 * _numel(out) * _attr(node, "K", ins[0][-1] if ins[0] else 0)
        a = ins[0]
        if op in ("FusedMatMul",) and a is not None and _attr(node, "transA", 0):
            a = a[:-2] + (a[-1], a[-2])
        return _matmul_flops(a, out)
    if kind == "conv":
        return (_conv_transpose_flops if op == "ConvTranspose" else _conv_flops)(node, ins, outs)
    if kind == "attention":
        return _attention_flops(node, ins, outs)
    if kind == "reduce":
        return float(_numel(ins[0]))
    if kind == "pool":
        kernel = _attr(node, "kernel_shape", [1])
        return float(_numel(out) * math.prod(kernel))
    if kind == "norm":
        return float(per_elem * _numel(ins[0]))
    return float((per_elem or 0.0) * _numel(out))


# ---------------------------------------------------------------- the pricing loop


def _compute_dtype(kind: str, node: ir.Node, elems: list[int]) -> str:
    if kind in ("matmul", "conv", "bmm", "dwconv") and node.op_type in ("MatMulInteger", "QLinearMatMul",
                                                       "DynamicQuantizeMatMul", "ConvInteger",
                                                       "QLinearConv", "MatMulIntegerToFloat"):
        return "int8"
    if node.op_type == "MatMulNBits":
        return "int8" if _attr(node, "accuracy_level", 0) == 4 else "fp32"
    names = [_dtype_name(e) for e in elems if e]
    for wanted in ("fp32", "fp16", "int8", "fp64"):
        if wanted in names:
            return wanted
    return names[0] if names else "fp32"


def node_costs(model: ir.Model, input_shapes: Mapping[str, int | Sequence[int]] | None = None,
               formats: bool = True) -> tuple[list[OpCost], dict[str, int]]:
    """Costs of every node of the main graph, in graph order, and the dims that took defaults.

    With `formats`, nodes marked by a numerics rewrite are priced as their format (BFP,
    L-Mul; formats.py); without, as the float graph ORT runs."""
    shapes, defaulted = resolve_dims(model, input_shapes)
    types = infer_shapes(model, shapes)
    consts = set(model.graph.initializers)
    nodes = list(model.graph)
    costs = [_price(node, types, consts, formats) for node in nodes]
    if formats and any(c.marks for c in costs):
        from winnow.cost_model.formats import price_formats

        sizes = {n: _numel(s) * _elem_size(e) for n, (s, e) in types.items() if s is not None}
        trans_b = {i: bool(_attr(n, "transB", 0)) for i, n in enumerate(nodes) if n.op_type == "Gemm"}
        price_formats(costs, {n: s for n, (s, _) in types.items()}, sizes, consts, trans_b)
    return costs, defaulted


def _subkind(node: ir.Node, kind: str, in_names: list[str], ins: list, consts: set[str]) -> str:
    """`dwconv` for grouped convolutions, `bmm` for MatMuls of two activations with batch dims:
    ORT runs both far from the GEMM rate, so they get corrections of their own."""
    if kind == "conv" and _attr(node, "group", 1) > 1:
        return "dwconv"
    if (kind == "matmul" and node.op_type in ("MatMul", "FusedMatMul", "MatMulInteger")
            and len(in_names) > 1 and in_names[1] not in consts
            and ins[1] is not None and len(ins[1]) > 2):
        return "bmm"
    return kind


def _marks(node: ir.Node) -> dict[str, Any]:
    return marks(node) if NODE_KEY in node.metadata_props else {}


def _price(node: ir.Node, types: dict, consts: set[str], formats: bool = True) -> OpCost:
    in_names = [v.name if v is not None else "" for v in node.inputs]
    out_names = [v.name for v in node.outputs]
    ins = [types.get(n, (None, 0))[0] if n else None for n in in_names]
    elems = [types.get(n, (None, 0))[1] for n in in_names if n]
    kind, per_elem = _classify(node)
    outs = [types.get(n, (None, 0))[0] for n in out_names]
    kind = _subkind(node, kind, in_names, ins, consts)
    note = ""
    if outs and outs[0] is None and kind not in ("free",):
        guess = _contrib_shape(node, ins)
        if guess is not None:
            outs[0] = guess
            elem = elems[0] if elems else onnx.TensorProto.FLOAT
            types[out_names[0]] = (guess, types.get(out_names[0], (None, 0))[1] or elem)
    if node.op_type == "Constant":
        consts.update(out_names)
    if kind == "free":
        return OpCost(node.name or "", node.op_type, node.domain, kind, "int", 0.0, 0.0, 0.0, 0.0,
                      in_names, out_names)
    w_bytes = a_bytes = w_bytes_out = 0.0
    for name, shape in zip(in_names, ins):
        if not name:
            continue
        size = _numel(shape) * _elem_size(types.get(name, (None, 0))[1])
        if name in consts:
            w_bytes += size
        else:
            a_bytes += size
    for name, shape in zip(out_names, outs):
        w_bytes_out += _numel(shape) * _elem_size(types.get(name, (None, 0))[1])
    if kind == "view":
        a_bytes = w_bytes_out = w_bytes = 0.0  # ORT aliases the input buffer: no copy
    flops = _flops(node, {"dwconv": "conv", "bmm": "matmul"}.get(kind, kind), per_elem, ins, outs)
    missing = [n for n, s in zip(in_names, ins) if n and s is None] + \
              [n for n, s in zip(out_names, outs) if s is None]
    priced = kind != "unknown" and not (missing and kind not in ("view",))
    if kind == "unknown":
        note = (f"no cost rule for {node.domain or 'ai.onnx'}::{node.op_type}; priced as "
                "memory-bound by its bytes")
    elif missing and kind != "view":
        note = f"shape unknown for {', '.join(missing[:3])}; priced by the known bytes only"
    return OpCost(node.name or "", node.op_type, node.domain, kind,
                  _compute_dtype(kind, node, elems), flops, w_bytes, a_bytes, w_bytes_out,
                  in_names, out_names, priced, note, _marks(node) if formats else {}, {},
                  len(ins[0]) if ins and ins[0] is not None else 0,
                  tuple(_attr(node, "perm", ())) if node.op_type == "Transpose" else ())

"""Structured pruning on the IR: remove attention heads (Q/K/V rows, O columns and every constant
that encodes the head count) and MLP intermediate channels, and refit a projection in closed form.

Heads are followed through the attention region by their *layout* on each value: `flat` (heads x
head_dim flattened on one axis), `heads` (one axis of heads) or `grouped` (GQA: a KV-head axis
followed by a repeat axis). A Reshape, Expand or elementwise constant that touches that axis is
edited at that position only, so a literal that merely equals the head count elsewhere is left
alone. Edited constants are copied per node: exporters share one shape tensor across layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from winnow.errors import UnsupportedModelError
from winnow.ir.attention import _weight
from winnow.ir.regions import Region, RegionMap, is_const

ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Cast", "Neg", "Sqrt", "Tanh", "Erf",
    "Exp", "Relu", "Sigmoid", "Identity", "Gelu", "FastGelu", "Silu", "Softmax", "Dropout",
    "Reciprocal", "Abs", "Clip", "HardSigmoid", "HardSwish", "LeakyRelu", "Log", "Equal",
})
PER_HEAD_AXIS_OPS = frozenset({"Slice", "Concat", "Split"})  # allowed when off the head axis


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the heads of a value are: kind 'flat' | 'heads' | 'grouped', its axis, its group."""

    kind: str
    axis: int
    group: str  # "q" or "kv"


@dataclasses.dataclass
class HeadPlan:
    """What stays of one attention layer: kept query heads and kept KV heads (sorted indices)."""

    region: Region
    keep_q: list[int]
    keep_kv: list[int]

    @property
    def heads(self):
        """The layer's AttentionHeads."""
        return self.region.heads


def prunable_attention(regions: RegionMap) -> list[Region]:
    """Attention sub-layers whose head count, head dim and Q/K/V/O weights were all found."""
    out = []
    for region in regions.sublayers():
        h = region.heads
        if region.kind == "attention" and h is not None and h.num_heads and h.head_dim \
                and h.num_kv_heads and all((h.q, h.k, h.v, h.o)) and len({h.q, h.k, h.v}) == 3:
            out.append(region)
    return out


def head_names(region: Region) -> list[str]:
    """The names of a layer's query heads: '<region>.head<i>'."""
    return [f"{region.name}.head{i}" for i in range(region.heads.num_heads)]


def weight_node(region: Region, weight: str) -> ir.Node:
    """The MatMul/Gemm of the region that reads the named weight."""
    for node in region.nodes:
        w = _weight(node)
        if w is not None and w.name == weight:
            return node
    raise UnsupportedModelError(f"region '{region.name}': no projection reads weight '{weight}'.")


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or Constant output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return np.asarray(producer.attributes["value"].as_tensor().numpy())
    return None


def set_const_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give `node` a new constant at input `index` (edited in place when nothing else reads it)."""
    old = node.inputs[index]
    array = np.ascontiguousarray(array)
    if old is not None and old.is_initializer() and len(old.uses()) == 1 \
            and not old.is_graph_input():
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        return
    base = (old.name if old is not None and old.name else "const") + ".pruned"
    name, k = base, 0
    while name in graph.initializers:
        k += 1
        name = f"{base}{k}"
    new = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                   type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(new)
    node.replace_input_with(index, new)


def _channels(keep: Sequence[int], size: int) -> np.ndarray:
    return np.concatenate([np.arange(h * size, (h + 1) * size) for h in keep]).astype(np.int64)


def slice_projection(graph: ir.Graph, node: ir.Node, keep: np.ndarray, side: str) -> None:
    """Keep output features (`side='out'`) or input features ('in') `keep` of a MatMul/Gemm."""
    w = const_array(node.inputs[1])
    trans = node.op_type == "Gemm" and node.attributes.get("transB") is not None \
        and node.attributes["transB"].as_int() == 1
    out_axis = 0 if trans else w.ndim - 1
    axis = out_axis if side == "out" else (1 if trans else w.ndim - 2)
    set_const_input(graph, node, 1, np.take(w, keep, axis=axis))
    if side == "out" and node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = const_array(node.inputs[2])
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] > 1:
            set_const_input(graph, node, 2, np.take(bias, keep, axis=-1))


class _HeadRewriter:
    """Follows the head layout from Q/K/V to O in one attention region and edits what it meets."""

    def __init__(self, graph: ir.Graph, plan: HeadPlan) -> None:
        h = plan.heads
        self.graph, self.plan, self.hd = graph, plan, h.head_dim
        self.region = plan.region
        self.allowed = {id(n) for n in plan.region.nodes}
        self.count = {"q": h.num_heads, "kv": h.num_kv_heads}
        self.new = {"q": len(plan.keep_q), "kv": len(plan.keep_kv)}
        self.keep = {"q": plan.keep_q, "kv": plan.keep_kv}
        self.rep = h.num_heads // h.num_kv_heads
        self.new_rep = self.new["q"] // self.new["kv"]
        self.o_node = weight_node(self.region, h.o)
        self.done: set[int] = set()
        self.layouts: dict[int, Layout] = {}

    def fail(self, node: ir.Node, why: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"cannot prune heads of '{self.region.name}': {node.op_type} node '{node.name}' {why}.")

    def run(self) -> None:
        h = self.plan.heads
        kv = "kv" if self.rep > 1 else "q"  # without GQA, K and V heads are the query heads
        for weight, group in ((h.q, "q"), (h.k, kv), (h.v, kv)):
            node = weight_node(self.region, weight)
            slice_projection(self.graph, node, _channels(self.keep[group], self.hd), "out")
            out = node.outputs[0]
            self._set(out, Layout("flat", self._rank(out, node) - 1, group))
            self.done.add(id(node))
        for node in self.region.nodes:  # in graph order: every tracked input is known first
            if id(node) not in self.done and self._tracked(node):
                self.done.add(id(node))
                self._visit(node)
        if id(self.o_node) not in self.done:
            raise UnsupportedModelError(f"cannot prune heads of '{self.region.name}': the head "
                                        "layout was lost before the output projection.")

    def _rank(self, value: ir.Value, node: ir.Node) -> int:
        if value.shape is None:
            raise self.fail(node, f"has an output '{value.name}' of unknown shape (run "
                            "shape-inference first)")
        return len(value.shape)

    def _set(self, value: ir.Value, layout: Layout) -> None:
        """Record the layout of a value and shrink its static shape on the head axis."""
        self.layouts[id(value)] = layout
        if value.shape is None:
            return
        dims = list(value.shape)
        n = self.new[layout.group]
        if layout.kind == "flat":
            dims[layout.axis] = n * self.hd
        elif layout.kind == "heads":
            dims[layout.axis] = n
        else:
            dims[layout.axis], dims[layout.axis + 1] = n, self.new_rep
        value.shape = ir.Shape(dims)

    def _tracked(self, node: ir.Node) -> list[tuple[int, Layout]]:
        return [(i, self.layouts[id(v)]) for i, v in enumerate(node.inputs)
                if v is not None and id(v) in self.layouts]

    def _visit(self, node: ir.Node) -> None:
        tracked = self._tracked(node)
        index, layout = tracked[0]
        if node is self.o_node:
            if layout != Layout("flat", layout.axis, "q") or index != 0:
                raise self.fail(node, "reads the heads in a layout other than flattened query heads")
            slice_projection(self.graph, node, _channels(self.keep["q"], self.hd), "in")
            return
        if node.op_type in ("Shape", "Size"):
            return  # a shape read at run time follows the pruned data by itself
        out = node.outputs[0]
        rank_out = self._rank(out, node)
        op = node.op_type
        if op in ELEMENTWISE or op in PER_HEAD_AXIS_OPS:
            new = self._elementwise(node, layout, index, rank_out)
        elif op == "Transpose":
            perm = list(node.attributes["perm"].as_ints())
            new = Layout(layout.kind, perm.index(layout.axis), layout.group)
            if layout.kind == "grouped" and perm.index(layout.axis + 1) != new.axis + 1:
                raise self.fail(node, "separates the KV-head axis from its repeat axis")
        elif op == "Reshape":
            new = self._reshape(node, layout)
        elif op == "Unsqueeze":
            new = self._unsqueeze(node, layout, rank_out)
        elif op == "Expand":
            new = self._expand(node, layout, rank_out)
        elif op == "MatMul" and not any(is_const(v) for v in node.inputs):
            new = self._matmul(node, tracked, rank_out)
        else:
            raise self.fail(node, "is not an op head pruning knows how to follow")
        for o in node.outputs:
            if o.shape is not None and len(o.shape) == rank_out:
                self._set(o, new)

    def _aligned(self, layout: Layout, shift: int) -> Layout:
        return Layout(layout.kind, layout.axis + shift, layout.group)

    def _elementwise(self, node: ir.Node, layout: Layout, index: int, rank_out: int) -> Layout:
        rank_in = len(node.inputs[index].shape)
        new = self._aligned(layout, rank_out - rank_in)
        axis_attr = node.attributes.get("axis")
        if node.op_type in PER_HEAD_AXIS_OPS | {"Softmax"} and axis_attr is not None:
            axis = axis_attr.as_int() % rank_out
            if axis in (new.axis, new.axis + (new.kind == "grouped")):
                raise self.fail(node, "works along the head axis")
        if node.op_type == "Slice":
            axes = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
            if axes is None or new.axis in {int(a) % rank_out for a in axes.reshape(-1)}:
                raise self.fail(node, "may slice the head axis")
            return new
        for i, v in enumerate(node.inputs):
            if v is None or id(v) in self.layouts or node.op_type in PER_HEAD_AXIS_OPS:
                continue
            array = const_array(v)
            if array is None:
                if v.shape is not None and self._size_on_axis(v.shape, new, rank_out) not in (1, None):
                    raise self.fail(node, f"mixes the heads with '{v.name}', which has them too")
                continue
            self._slice_const(node, i, array, new, rank_out)
        return new

    def _size_on_axis(self, shape, layout: Layout, rank_out: int):
        axis = layout.axis - (rank_out - len(shape))
        if axis < 0:
            return 1
        dim = shape[axis]
        return dim if isinstance(dim, int) else None

    def _slice_const(self, node: ir.Node, index: int, array: np.ndarray, layout: Layout,
                     rank_out: int) -> None:
        axis = layout.axis - (rank_out - array.ndim)
        if axis < 0 or array.shape[axis] == 1:
            return
        if layout.kind == "grouped":
            raise self.fail(node, "has a per-head constant on grouped KV heads")
        n = self.count[layout.group]
        size = n * self.hd if layout.kind == "flat" else n
        if array.shape[axis] != size:
            raise self.fail(node, f"has a constant of size {array.shape[axis]} on the head axis")
        keep = (_channels(self.keep[layout.group], self.hd) if layout.kind == "flat"
                else np.asarray(self.keep[layout.group]))
        set_const_input(self.graph, node, index, np.take(array, keep, axis=axis))

    def _shape_literal(self, node: ir.Node, index: int, position: int, old: int, value: int) -> None:
        """Set element `position` of the node's shape input from `old` to `value` where it is that
        literal (-1, 0 and broadcast 1s follow the data by themselves)."""
        shape = node.inputs[index]
        array = const_array(shape)
        if array is not None:
            if array[position] == old:
                edited = array.copy()
                edited[position] = value
                set_const_input(self.graph, node, index, edited)
            return
        producer = shape.producer() if shape is not None else None
        if producer is None or producer.op_type != "Concat":
            raise self.fail(node, "takes a computed shape winnow cannot edit")
        offset = 0
        for k, part in enumerate(producer.inputs):
            part_array = const_array(part)
            width = part_array.size if part_array is not None else (
                part.shape[0] if part.shape is not None and isinstance(part.shape[0], int) else None)
            if width is None:
                raise self.fail(node, "takes a shape of unknown length")
            if offset <= position < offset + width:
                if part_array is not None and part_array.reshape(-1)[position - offset] == old:
                    edited = part_array.copy().reshape(-1)
                    edited[position - offset] = value
                    set_const_input(self.graph, self._own_concat(node, index, producer), k,
                                    edited.reshape(part_array.shape))
                return
            offset += width

    def _own_concat(self, node: ir.Node, index: int, concat: ir.Node) -> ir.Node:
        """A copy of a shared shape Concat that only `node` reads (the original is left alone)."""
        if len(concat.outputs[0].uses()) == 1:
            return concat
        copy = ir.node("Concat", list(concat.inputs), {"axis": 0}, name=f"{concat.name}.for.{node.name}")
        copy.outputs[0].dtype, copy.outputs[0].shape = concat.outputs[0].dtype, concat.outputs[0].shape
        self.graph.insert_after(concat, copy)
        node.replace_input_with(index, copy.outputs[0])
        return copy

    def _reshape(self, node: ir.Node, layout: Layout) -> Layout:
        before, after = node.inputs[0].shape, node.outputs[0].shape
        a = layout.axis
        n, g = self.count[layout.group], self.new[layout.group]
        if layout.kind == "flat" and len(after) == len(before) + 1 and after[a + 1] == self.hd:
            self._shape_literal(node, 1, a, n, g)
            return Layout("heads", a, layout.group)
        if layout.kind == "heads" and len(after) == len(before) - 1 and before[a + 1] == self.hd:
            self._shape_literal(node, 1, a, n * self.hd, g * self.hd)
            return Layout("flat", a, layout.group)
        if layout.kind == "grouped" and len(after) == len(before) - 1:
            self._shape_literal(node, 1, a, self.count["q"], self.new["q"])
            return Layout("heads", a, "q")
        if len(after) == len(before) and after[a] == before[a]:
            width = self.hd if layout.kind == "flat" else 1
            self._shape_literal(node, 1, a, n * width, g * width)
            return layout
        raise self.fail(node, "reshapes the head axis in a way winnow does not follow")

    def _unsqueeze(self, node: ir.Node, layout: Layout, rank_out: int) -> Layout:
        axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None and "axes" in node.attributes:
            axes = np.asarray(node.attributes["axes"].as_ints())
        if axes is None:
            raise self.fail(node, "has axes that are not constant")
        inserted = sorted(int(x) % rank_out for x in axes.reshape(-1))
        kept = [i for i in range(rank_out) if i not in inserted]
        return Layout(layout.kind, kept[layout.axis], layout.group)

    def _expand(self, node: ir.Node, layout: Layout, rank_out: int) -> Layout:
        rank_in = len(node.inputs[0].shape)
        new = self._aligned(layout, rank_out - rank_in)
        after = node.outputs[0].shape
        self._shape_literal(node, 1, new.axis, self.count[layout.group], self.new[layout.group])
        if layout.kind == "heads" and layout.group == "kv" and new.axis + 1 < rank_out \
                and node.inputs[0].shape[layout.axis + 1] == 1 and after[new.axis + 1] == self.rep:
            self._shape_literal(node, 1, new.axis + 1, self.rep, self.new_rep)
            return Layout("grouped", new.axis, "kv")
        return new

    def _matmul(self, node: ir.Node, tracked: list, rank_out: int) -> Layout:
        layouts = {lay for _, lay in tracked}
        _, layout = tracked[0]
        rank_in = len(node.inputs[tracked[0][0]].shape)
        new = self._aligned(layout, rank_out - rank_in)
        if len(layouts) != 1 or layout.kind != "heads" or new.axis >= rank_out - 2:
            raise self.fail(node, "multiplies activations whose heads are not on one batch axis")
        return new


def prune_heads(graph: ir.Graph, plan: HeadPlan) -> None:
    """Remove the heads `plan` drops from its attention region, in place."""
    h = plan.heads
    if not plan.keep_q or not plan.keep_kv:
        raise UnsupportedModelError(f"pruning would leave '{plan.region.name}' without heads.")
    if len(plan.keep_q) % len(plan.keep_kv):
        raise UnsupportedModelError(f"'{plan.region.name}': {len(plan.keep_q)} query heads do not "
                                    f"divide evenly over {len(plan.keep_kv)} KV heads.")
    if len(plan.keep_q) == h.num_heads and len(plan.keep_kv) == h.num_kv_heads:
        return
    _HeadRewriter(graph, plan).run()
    h.num_heads, h.num_kv_heads = len(plan.keep_q), len(plan.keep_kv)


def refit_linear(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge fit `y ≈ x @ W + b` (ridge relative to the mean feature variance)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    lam = ridge * max(np.trace(gram) / gram.shape[0], 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ yc)
    return w, my - mx @ w


def projection_bias(node: ir.Node) -> tuple[ir.Node, int] | None:
    """The Add right after a projection that adds a constant bias: (node, bias input index)."""
    users = node.outputs[0].uses()
    if len(users) != 1 or users[0][0].op_type != "Add":
        return None
    add = users[0][0]
    other = 1 - users[0][1]
    return (add, other) if const_array(add.inputs[other]) is not None else None


def projection_output(node: ir.Node) -> ir.Value:
    """A projection's output after its bias Add (the value a refit targets)."""
    bias = projection_bias(node)
    return bias[0].outputs[0] if bias is not None else node.outputs[0]


def set_projection(graph: ir.Graph, node: ir.Node, weight: np.ndarray, bias: np.ndarray) -> None:
    """Give a MatMul projection new weights [in, out] and bias [out] (adding a bias Add if none)."""
    if node.op_type != "MatMul":
        raise UnsupportedModelError(f"refit supports MatMul projections, not {node.op_type} "
                                    f"'{node.name}'.")
    dtype = const_array(node.inputs[1]).dtype
    set_const_input(graph, node, 1, weight.astype(dtype))
    found = projection_bias(node)
    if found is not None:
        add, index = found
        old = const_array(add.inputs[index])
        set_const_input(graph, add, index, bias.astype(dtype).reshape(old.shape))
        return
    out = node.outputs[0]
    name = f"{node.name}.refit_bias"
    value = ir.Value(name=name, const_value=ir.tensor(bias.astype(dtype), name=name),
                     shape=ir.Shape(bias.shape), type=ir.TensorType(ir.DataType.from_numpy(dtype)))
    graph.register_initializer(value)
    add = ir.node("Add", [out, value], name=f"{node.name}.refit_add")
    add.outputs[0].type, add.outputs[0].shape = out.type, out.shape
    for user, index in list(out.uses()):
        if user is not add:
            user.replace_input_with(index, add.outputs[0])
    for k, o in enumerate(graph.outputs):
        if o is out:
            graph.outputs[k] = add.outputs[0]
    graph.insert_after(node, [add])


@dataclasses.dataclass
class MlpChannels:
    """The intermediate channels of an MLP sub-layer: the projections that write them (up / gate),
    the one that reads them (down), the elementwise constants on the way, and their count."""

    region: Region
    ups: list[ir.Node]
    down: ir.Node
    width: int
    consts: list[tuple[ir.Node, int]]  # elementwise inputs sliced with the channels
    values: list[ir.Value]  # values carrying the channels on their last axis


def _param_nodes(region: Region) -> list[ir.Node]:
    return [n for n in region.nodes if _weight(n) is not None]


def mlp_channels(region: Region) -> MlpChannels:
    """Trace an MLP's intermediate channels from its down projection back to its up projections."""
    params = _param_nodes(region)
    if len(params) < 2:
        raise UnsupportedModelError(f"'{region.name}' has no up and down projection to prune.")
    down = params[-1]
    allowed = {id(n) for n in region.nodes}
    ups, consts, values, seen = [], [], [], set()
    queue = [down.inputs[0]]
    while queue:
        value = queue.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        values.append(value)
        node = value.producer()
        if node is None or id(node) not in allowed:
            raise UnsupportedModelError(f"'{region.name}': the input of the down projection does "
                                        "not come from projections inside the MLP.")
        if _weight(node) is not None:
            ups.append(node)
            continue
        if node.op_type not in ELEMENTWISE or node.op_type == "Softmax":
            raise UnsupportedModelError(f"'{region.name}': {node.op_type} node '{node.name}' sits "
                                        "between the projections; only elementwise ops can.")
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if const_array(v) is not None:
                consts.append((node, i))
            else:
                queue.append(v)
    width = down.inputs[0].shape[-1] if down.inputs[0].shape is not None else None
    if not isinstance(width, int):
        raise UnsupportedModelError(f"'{region.name}': the intermediate width is not static.")
    return MlpChannels(region, ups, down, width, consts, values)


def mlp_regions(regions: RegionMap) -> list[Region]:
    """MLP sub-layers of a transformer (with an up and a down projection)."""
    return [r for r in regions.sublayers() if r.kind == "mlp" and len(_param_nodes(r)) >= 2]


def prune_channels(graph: ir.Graph, mlp: MlpChannels, keep: Sequence[int]) -> None:
    """Keep only the intermediate channels `keep` of an MLP, in place."""
    keep = np.asarray(sorted(keep), dtype=np.int64)
    if keep.size == 0:
        raise UnsupportedModelError(f"pruning would leave '{mlp.region.name}' without channels.")
    for node in mlp.ups:
        slice_projection(graph, node, keep, "out")
    for node, index in mlp.consts:
        array = const_array(node.inputs[index])
        if array.ndim >= 1 and array.shape[-1] == mlp.width:
            set_const_input(graph, node, index, np.take(array, keep, axis=-1))
        elif array.size != 1 and (array.ndim == 0 or array.shape[-1] != 1):
            raise UnsupportedModelError(f"'{mlp.region.name}': constant '{node.inputs[index].name}'"
                                        " does not broadcast over the channels.")
    slice_projection(graph, mlp.down, keep, "in")
    for value in mlp.values + [n.outputs[0] for n in mlp.ups]:
        if value.shape is not None:
            value.shape = ir.Shape([*list(value.shape)[:-1], int(keep.size)])
    mlp.width = int(keep.size)

"""Conv filter groups for structured pruning, in the spirit of Torch-Pruning's DepGraph.

Every tensor whose channel axis must shrink together with a convolution's filters is a node of a
networkx graph; the ops between them (BatchNorm, activations, pooling, Resize, Pad, reductions
off the channel axis, residual Adds, SE gates, depthwise convs) are its edges, and each connected
component is one group, pruned with one set of kept indices. The group's *members* are what is
edited: the filters that write the channels (Conv / ConvTranspose outputs), the weights that read
them (Conv / ConvTranspose inputs, Gemm / MatMul rows), depthwise filters, BatchNorm parameters
and per-channel constants. Transpose moves the channel axis, and Concat / Split / Slice off the
channel axis keep it, so they link tensors like the ops above.

Concat, Split and Slice *on* the channel axis are index maps (`ir/channel_maps.py`): each side is
a group of its own, and an edge says which channel of one sits at which position of the other (an
offset range). A group nothing maps into is a *root*; the others *follow* (a Concat output follows
its inputs, Split and Slice outputs follow their input) and are pruned at the mapped positions
whenever a root is (the Split sizes and Slice bounds rewritten). A group that reaches a graph
input or output, a Reshape, a grouped (non-depthwise) conv or any op not understood on the channel
axis is *fixed*: it is left whole, and `reason` says why; a fixed follower fixes every root that
maps into it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import networkx as nx
import numpy as np
import onnx_ir as ir

from winnow.ir.channel_maps import IndexMap, IndexMaps, Select, cut_axis, cut_counts, recut
from winnow.ir.pruning import const_array, set_const_input

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Identity", "Dropout",
    "Neg", "Abs", "Elu", "Selu", "Softplus", "Softsign", "Erf", "Exp", "Sqrt", "Mish", "Gelu",
    "Silu", "Celu", "ThresholdedRelu", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"})
REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1"})


@dataclasses.dataclass(frozen=True)
class Member:
    """One edit of a group: `role` says what is sliced on `node` (input `index`, along `axis`)."""

    node: ir.Node
    role: str  # source | sink | depthwise | norm | const
    index: int
    axis: int


@dataclasses.dataclass
class ChannelGroup:
    """Channels pruned together: the values that carry them, what is edited, their count."""

    name: str
    channels: int
    values: list[ir.Value]
    axes: list[int]
    members: list[Member]
    reason: str | None = None  # why the group must stay whole (None: prunable)
    maps: list[IndexMap] = dataclasses.field(default_factory=list)  # followers it reaches
    selects: list[Select] = dataclasses.field(default_factory=list)  # Split / Slice cuts of it
    follows: bool = False  # its channels are mapped from root groups (pruned with them)

    @property
    def prunable(self) -> bool:
        """True when the group can lose channels."""
        return self.reason is None

    def readers(self) -> list[tuple[Member, np.ndarray, np.ndarray]]:
        """Every weight that reads the channels, its own sinks and its followers' ones:
        (sink, the group's channels it reads, their positions on the sink's input)."""
        own = np.arange(self.channels)
        out = [(m, own, own) for m in self.sinks()]
        for link in self.maps:
            out += [(m, link.channels, link.positions) for m in link.target.sinks()]
        return out

    def sources(self) -> list[Member]:
        """The filters that write the channels."""
        return [m for m in self.members if m.role == "source"]

    def sinks(self) -> list[Member]:
        """The weights that read the channels."""
        return [m for m in self.members if m.role == "sink"]


class _Finder:
    """Walks the channel axis from every conv output, forward through users and backward through
    producers, recording links (graph edges), index-map cuts, members and reasons to keep
    channels whole."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.links = nx.Graph()
        self.axis: dict[ir.Value, int] = {}
        self.members: dict[ir.Value, set[Member]] = {}
        self.fixed: dict[ir.Value, str] = {}
        self.cuts: dict[ir.Node, int] = {}  # Concat / Split / Slice on the channel axis: its axis
        self.todo: list[ir.Value] = []

    def visit(self, value: ir.Value, axis: int) -> None:
        if value in self.axis:
            if self.axis[value] != axis:
                self.fixed[value] = f"'{value.name}' carries the channels on two axes"
            return
        self.axis[value] = axis
        self.links.add_node(value)
        self.members.setdefault(value, set())
        self.todo.append(value)

    def link(self, a: ir.Value, b: ir.Value, axis_b: int) -> None:
        self.visit(b, axis_b)
        self.links.add_edge(a, b)

    def run(self) -> None:
        for node in self.graph:
            if _is_source(node):
                self.visit(node.outputs[0], 1)
        while self.todo:
            value = self.todo.pop()
            self._backward(value)
            for user, index in list(value.uses()):
                self._forward(value, user, index)
            if value in self.graph.outputs:
                self.fixed[value] = f"'{value.name}' is a graph output"

    def _backward(self, value: ir.Value) -> None:
        node, axis = value.producer(), self.axis[value]
        if node is None:
            self.fixed[value] = f"'{value.name}' is a graph input or a constant"
        elif node.graph is not self.graph:
            self.fixed[value] = f"'{value.name}' is written inside a subgraph"
        elif _is_source(node):
            self.members[value].add(Member(node, "source", 1, _source_axis(node)))
        elif _is_depthwise(node) or node.op_type in UNARY | POOLS | {"BatchNormalization", "Clip",
                                                                       "Resize", "Upsample", "Pad",
                                                                       "Split", "Slice"}:
            self.visit(node.inputs[0], axis)  # its forward rule adds the member and the link
        elif node.op_type == "Concat":
            for operand in node.inputs:
                self.visit(operand, axis)
        elif node.op_type == "Transpose" and _perm(node, value) is not None:
            self.visit(node.inputs[0], _perm(node, value)[axis])
        elif node.op_type in BINARY and value.shape is None:
            self.fixed[value] = f"{node.op_type} '{node.name}' has unknown shapes"
        elif node.op_type in BINARY:
            for operand in node.inputs:
                if operand is not None and const_array(operand) is None:
                    size = _aligned_size(operand, value, axis)
                    if size is not None and size > 1:
                        self.visit(operand, axis - len(value.shape) + _rank(operand))
        elif node.op_type in REDUCE:
            inner = _reduce_input_axis(node, axis)
            if inner is None:
                self.fixed[value] = f"{node.op_type} '{node.name}' reduces the channel axis"
            else:
                self.visit(node.inputs[0], inner)
        else:
            self.fixed[value] = f"{node.op_type} '{node.name}' writes the channels"

    def _forward(self, value: ir.Value, user: ir.Node, index: int) -> None:
        axis, op = self.axis[value], user.op_type
        members = self.members[value]
        if user.graph is not self.graph:
            self.fixed[value] = f"'{value.name}' is read inside a subgraph"
        elif op in ("Conv", "ConvTranspose") and index == 0 and axis == 1:
            self._conv_input(value, user)
        elif op == "BatchNormalization" and index == 0 and axis == 1:
            members.add(Member(user, "norm", 1, 0))
            self.link(value, user.outputs[0], axis)
        elif (op in UNARY | POOLS or (op == "Clip" and index == 0)) and index == 0:
            self.link(value, user.outputs[0], axis)
        elif op in ("Resize", "Upsample") and index == 0 and _resize_keeps_channels(user, axis):
            self.link(value, user.outputs[0], axis)
        elif op == "Pad" and index == 0 and _pad_keeps_channels(user, axis, len(value.shape)):
            self.link(value, user.outputs[0], axis)
        elif op == "Transpose" and _perm(user, value) is not None:
            self.link(value, user.outputs[0], _perm(user, value).index(axis))
        elif op in ("Concat", "Split", "Slice") and (op == "Concat" or index == 0):
            self._cut(value, user)
        elif op in BINARY:
            self._binary(value, user, index)
        elif op in REDUCE and index == 0 and _reduce_output_axis(user, axis) is not None:
            self.link(value, user.outputs[0], _reduce_output_axis(user, axis))
        elif op == "Gemm" and index == 0 and axis == 1 and not _attr(user, "transA") \
                and const_array(user.inputs[1]) is not None:
            members.add(Member(user, "sink", 1, 1 if _attr(user, "transB") else 0))
        elif op == "MatMul" and index == 0 and value.shape is not None \
                and axis == len(value.shape) - 1 and const_array(user.inputs[1]) is not None \
                and const_array(user.inputs[1]).ndim == 2:
            members.add(Member(user, "sink", 1, 0))
        else:
            self.fixed[value] = f"{op} '{user.name}' reads the channels"

    def _cut(self, value: ir.Value, node: ir.Node) -> None:
        """Concat / Split / Slice: an index map on the channel axis, a plain link off it."""
        axis = self.axis[value]
        cut = cut_axis(node, value, axis)
        if cut is None:
            self.fixed[value] = f"{node.op_type} '{node.name}' cuts an axis of unknown rank " \
                                "or by non-constant bounds"
            return
        ins = list(node.inputs) if node.op_type == "Concat" else [node.inputs[0]]
        if cut == axis:
            self.cuts[node] = axis
            for other in ins + list(node.outputs):
                self.visit(other, axis)
            return
        for other in ins + list(node.outputs):
            if other is not value:
                self.link(value, other, axis)

    def _conv_input(self, value: ir.Value, conv: ir.Node) -> None:
        if _is_depthwise(conv):
            self.members[value].add(Member(conv, "depthwise", 1, 0))
            self.link(value, conv.outputs[0], 1)
        elif _group(conv) == 1 and const_array(conv.inputs[1]) is not None:
            self.members[value].add(Member(conv, "sink", 1, 0 if conv.op_type == "ConvTranspose"
                                           else 1))
        else:
            self.fixed[value] = f"grouped {conv.op_type} '{conv.name}' reads the channels"

    def _binary(self, value: ir.Value, node: ir.Node, index: int) -> None:
        out = node.outputs[0]
        if value.shape is None or out.shape is None:
            self.fixed[value] = f"{node.op_type} '{node.name}' has unknown shapes"
            return
        out_axis = self.axis[value] + len(out.shape) - len(value.shape)
        for k, operand in enumerate(node.inputs):
            if k == index or operand is None:
                continue
            size = _aligned_size(operand, out, out_axis)
            if size is None:
                self.fixed[value] = f"{node.op_type} '{node.name}' has an operand of unknown shape"
                return
            operand_axis = out_axis - len(out.shape) + _rank(operand)
            if size > 1 and const_array(operand) is not None:
                self.members[value].add(Member(node, "const", k, operand_axis))
            elif size > 1:
                self.link(value, operand, operand_axis)
        self.link(value, out, out_axis)

    def groups(self) -> list[ChannelGroup]:
        out, owner = [], {}
        for component in nx.connected_components(self.links):
            group = self._group(component)
            out.append(group)
            owner.update({v: group for v in component})
        IndexMaps(self.cuts, out, owner).resolve()
        for group in out:
            if not group.channels and group.reason is None:
                group.reason = "the channel count is not known on every tensor of the group"
            if not group.sources() and group.reason is None:
                group.reason = "no convolution writes these channels"
        return sorted(out, key=lambda g: g.name)

    def _group(self, component: set[ir.Value]) -> ChannelGroup:
        values = sorted(component, key=lambda v: v.name or "")
        members = sorted({m for v in values for m in self.members[v]},
                         key=lambda m: (m.node.name or "", m.role, m.index))
        reasons = [self.fixed[v] for v in values if v in self.fixed]
        sources = [m for m in members if m.role == "source"]
        sizes = {_dim(v, self.axis[v]) for v in values} | {
            const_array(m.node.inputs[1]).shape[m.axis] for m in sources}
        sizes.discard(None)
        if len(sizes) > 1:
            reasons.append("the tensors of the group disagree on the channel count")
        name = (sources[0].node.name if sources else values[0].name) or "group"
        channels = next(iter(sizes)) if len(sizes) == 1 else 0
        return ChannelGroup(name, int(channels), values, [self.axis[v] for v in values],
                            members, reasons[0] if reasons else None)


def channel_groups(model: ir.Model) -> list[ChannelGroup]:
    """Every group of conv channels in the main graph, prunable or fixed (with the reason)."""
    finder = _Finder(model)
    finder.run()
    return finder.groups()


def prune_group(group: ChannelGroup, keep: Sequence[int], graph: ir.Graph
                ) -> dict[ir.Node, np.ndarray]:
    """Keep only channels `keep` (sorted indices) of a prunable group, editing every member and
    the followers it maps into; see `prune_groups`."""
    return prune_groups([(group, keep)], graph)


def prune_groups(plan: Sequence[tuple[ChannelGroup, Sequence[int]]], graph: ir.Graph
                 ) -> dict[ir.Node, np.ndarray]:
    """Keep channels `keep` of each prunable group in one edit of the graph: the followers that
    several groups map into (a Concat output) lose every group's dropped positions at once, so
    the groups of one `channel_groups` call must be pruned in one call. Returns the kept output
    channels of every conv whose filters were pruned."""
    kept: dict[int, tuple[ChannelGroup, np.ndarray]] = {}
    drops: dict[int, tuple[ChannelGroup, list[np.ndarray]]] = {}
    for group, keep in plan:
        keep = _checked_keep(group, keep)
        kept[id(group)] = (group, keep)
        dropped = np.setdiff1d(np.arange(group.channels), keep)
        for link in group.maps:
            drops.setdefault(id(link.target), (link.target, []))[1].append(
                link.positions[np.isin(link.channels, dropped)])
    for target, parts in drops.values():
        keep = np.setdiff1d(np.arange(target.channels), np.concatenate(parts))
        if keep.size == 0:
            raise ValueError(f"'{target.values[0].name}' ({target.reason}) would keep no "
                             "channels.")
        kept[id(target)] = (target, keep)
    for group, keep in kept.values():  # every check before the first edit
        for select in group.selects:
            cut_counts(select, keep)
    sources = {}
    for group, keep in kept.values():
        _apply(graph, group, keep)
        sources.update({m.node: keep for m in group.sources()})
    return sources


def _checked_keep(group: ChannelGroup, keep: Sequence[int]) -> np.ndarray:
    keep = np.asarray(sorted(keep), dtype=np.int64)
    if not group.prunable:
        raise ValueError(f"group '{group.name}' cannot be pruned: {group.reason}")
    if keep.size == 0 or keep.size > group.channels or keep.min() < 0 \
            or keep.max() >= group.channels:
        raise ValueError(f"group '{group.name}' has {group.channels} channels; cannot keep "
                         f"{keep.size} of them.")
    return keep


def _apply(graph: ir.Graph, group: ChannelGroup, keep: np.ndarray) -> None:
    """Edit one group's members, Split / Slice cuts and tensor shapes to channels `keep`."""
    for member in group.members:
        _edit(graph, member, keep)
    for select in group.selects:
        recut(graph, select, keep)
    for value, axis in zip(group.values, group.axes):
        if value.shape is not None and axis < len(value.shape):
            dims = list(value.shape)
            dims[axis] = int(keep.size)
            value.shape = ir.Shape(dims)


def zero_group(group: ChannelGroup, drop: Sequence[int], graph: ir.Graph) -> None:
    """Zero the weights that read channels `drop` (every sink's slice, its followers' sinks at the
    mapped positions): the rest of the model then computes exactly what it computes with the
    channels removed, if the group is complete (the OTO validity check). Zeroing the writers
    instead is not equivalent in general: PP-OCR's MobileOne blocks add one scalar bias to every
    channel, so a zeroed filter still emits it."""
    drop = np.asarray(drop, dtype=np.int64)
    for member, channels, positions in group.readers():
        _zero(graph, member.node, member.index, member.axis, positions[np.isin(channels, drop)])


def _zero(graph: ir.Graph, node: ir.Node, index: int, axis: int, drop: np.ndarray) -> None:
    if index >= len(node.inputs) or node.inputs[index] is None:
        return
    array = const_array(node.inputs[index]).copy()
    slicer = [slice(None)] * array.ndim
    slicer[axis] = drop
    array[tuple(slicer)] = 0
    set_const_input(graph, node, index, array)


def _edit(graph: ir.Graph, member: Member, keep: np.ndarray) -> None:
    node = member.node
    if member.role == "norm":
        for index in range(1, 5):
            set_const_input(graph, node, index, const_array(node.inputs[index])[keep])
        return
    weight = const_array(node.inputs[member.index])
    set_const_input(graph, node, member.index, np.take(weight, keep, axis=member.axis))
    if member.role in ("source", "depthwise") and len(node.inputs) > 2 \
            and node.inputs[2] is not None:
        set_const_input(graph, node, 2, const_array(node.inputs[2])[keep])
    if member.role == "depthwise":
        node.attributes["group"] = ir.AttrInt64("group", int(keep.size))


def _is_source(node: ir.Node) -> bool:
    """A Conv / ConvTranspose of one group with constant weights (it writes prunable filters)."""
    return node.op_type in ("Conv", "ConvTranspose") and _group(node) == 1 \
        and const_array(node.inputs[1]) is not None and len(node.outputs) == 1


def _source_axis(node: ir.Node) -> int:
    return 1 if node.op_type == "ConvTranspose" else 0


def _is_depthwise(node: ir.Node) -> bool:
    """A Conv with one filter per input channel (groups == channels)."""
    if node.op_type != "Conv":
        return False
    weight = const_array(node.inputs[1])
    return weight is not None and _group(node) > 1 and weight.shape[1] == 1 \
        and weight.shape[0] == _group(node)


def _group(node: ir.Node) -> int:
    return _attr(node, "group", 1)


def _attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _dim(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or axis >= len(value.shape):
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def _rank(value: ir.Value) -> int:
    if value.shape is not None:
        return len(value.shape)
    array = const_array(value)
    return array.ndim if array is not None else 0


def _aligned_size(operand: ir.Value, out: ir.Value, out_axis: int) -> int | None:
    """The size of `operand` on the axis that broadcasting aligns with `out_axis` (1 when it has
    no such axis), or None when unknown."""
    shape = operand.shape
    if shape is None:
        array = const_array(operand)
        if array is None:
            return None
        shape = array.shape
    k = out_axis - (len(out.shape) - len(shape))
    if k < 0:
        return 1
    dim = shape[k]
    return dim if isinstance(dim, int) else None


def _reduce_axes(node: ir.Node, rank: int) -> list[int] | None:
    attr = node.attributes.get("axes")
    if attr is not None:
        axes = list(attr.as_ints())
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        array = const_array(node.inputs[1])
        if array is None:
            return None
        axes = [int(a) for a in np.ravel(array)]
    else:
        return list(range(rank))
    return [a % rank for a in axes]


def _reduce_output_axis(node: ir.Node, axis: int) -> int | None:
    value = node.inputs[0]
    if value.shape is None:
        return None
    axes = _reduce_axes(node, len(value.shape))
    if axes is None or axis in axes:
        return None
    return axis if _attr(node, "keepdims", 1) else axis - sum(a < axis for a in axes)


def _reduce_input_axis(node: ir.Node, axis: int) -> int | None:
    value = node.inputs[0]
    if value.shape is None:
        return None
    axes = _reduce_axes(node, len(value.shape))
    if axes is None:
        return None
    if _attr(node, "keepdims", 1):
        return None if axis in axes else axis
    kept = [a for a in range(len(value.shape)) if a not in axes]
    return kept[axis] if axis < len(kept) else None


def _resize_keeps_channels(node: ir.Node, axis: int) -> bool:
    """Resize / Upsample that scales the channel axis by 1 and gives no explicit sizes."""
    if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name:
        return False
    for index in (2, 1):  # Resize: scales is input 2 (opset >= 11); Upsample: input 1
        if len(node.inputs) > index and node.inputs[index] is not None:
            scales = const_array(node.inputs[index])
            if scales is not None and scales.size > axis:
                return float(scales[axis]) == 1.0
    return False


def _pad_keeps_channels(node: ir.Node, axis: int, rank: int) -> bool:
    pads = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None:
        attr = node.attributes.get("pads")
        pads = np.asarray(attr.as_ints()) if attr is not None else None
    if pads is None or pads.size != 2 * rank or len(node.inputs) > 3:
        return False
    return int(pads[axis]) == 0 and int(pads[axis + rank]) == 0


def group_values(groups: Sequence[ChannelGroup]) -> Iterator[tuple[ChannelGroup, ir.Value, int]]:
    """Each (group, value, axis) of prunable groups, for capturing activations."""
    for group in groups:
        if group.prunable:
            for value, axis in zip(group.values, group.axes):
                yield group, value, axis


def _perm(node: ir.Node, value: ir.Value) -> list[int] | None:
    """A Transpose's permutation (reversed axes by default), None when the rank is unknown."""
    attr = node.attributes.get("perm")
    if attr is not None:
        return list(attr.as_ints())
    return list(range(len(value.shape)))[::-1] if value.shape is not None else None

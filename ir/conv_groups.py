"""Conv filter groups for structured pruning, in the spirit of Torch-Pruning's DepGraph.

Every tensor whose channel axis must shrink together with a convolution's filters is a node of a
networkx graph; the ops between them (BatchNorm, activations, pooling, Resize, Pad, reductions
off the channel axis, residual Adds, SE gates, depthwise convs) are its edges, and each connected
component is one group, pruned with one set of kept indices. The group's *members* are what is
edited: the filters that write the channels (Conv / ConvTranspose outputs), the weights that read
them (Conv / ConvTranspose inputs, Gemm / MatMul rows), depthwise filters, BatchNorm parameters
and per-channel constants. Transpose moves the channel axis, and Concat / Split / Slice off the
channel axis keep it, so they link tensors like the ops above.

Concat, Split and Slice *on* the channel axis are index maps: each side is a group of its own,
and an edge says which channel of one sits at which position of the other (an offset range). A
group nothing maps into is a *root*; the others *follow* (a Concat output follows its inputs,
Split and Slice outputs follow their input): their channels are those of roots, composed along
the edges, and they are pruned at the mapped positions whenever a root is (the Split sizes and
Slice bounds rewritten). A group that reaches a graph input or output, a Reshape, a grouped
(non-depthwise) conv or any op not understood on the channel axis is *fixed*: it is left whole,
and `reason` says why; a fixed follower fixes every root that maps into it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import networkx as nx
import numpy as np
import onnx_ir as ir

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


@dataclasses.dataclass(frozen=True)
class Select:
    """A Split or Slice that cuts channel ranges [start, stop) out of a group's tensor."""

    node: ir.Node
    ranges: tuple[tuple[int, int], ...]  # one per output
    position: int = 0  # a Slice: where the channel axis is in its starts / ends


@dataclasses.dataclass
class IndexMap:
    """Channels `channels` of a root group sit at `positions` of group `target` (a follower)."""

    target: ChannelGroup
    channels: np.ndarray
    positions: np.ndarray


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
        cut = _cut_axis(node, value, axis)
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
        _IndexMaps(self, out, owner).resolve()
        for group in out:
            if not group.channels and group.reason is None:
                group.reason = "the channel count is not known on every tensor of the group"
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


class _IndexMaps:
    """Turns the Concat / Split / Slice cuts into index maps from root groups to followers."""

    def __init__(self, finder: _Finder, groups: list[ChannelGroup],
                 owner: dict[ir.Value, ChannelGroup]) -> None:
        self.finder, self.groups, self.owner = finder, groups, owner
        self.index = {id(g): k for k, g in enumerate(groups)}
        self.flow = nx.MultiDiGraph()
        self.flow.add_nodes_from(range(len(groups)))

    def of(self, value: ir.Value) -> int:
        return self.index[id(self.owner[value])]

    def resolve(self) -> None:
        for node in self.finder.cuts:
            self._edges(node)
        cyclic: set[int] = set()
        for component in nx.weakly_connected_components(self.flow):
            if not nx.is_directed_acyclic_graph(self.flow.subgraph(component)):
                cyclic |= component
                for k in component:
                    self._fix(k, "its channels map back onto themselves through Concat/Split")
        origin: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        blocked: list[tuple[int, str]] = []
        for k in nx.topological_sort(self.flow.subgraph(set(self.flow) - cyclic)):
            if self.flow.in_degree(k):
                own = self.groups[k].reason
                origin[k], problem = self._compose(k, origin)
                if problem or own is not None:
                    blocked.append((k, problem or own))
        for k, (roots, channels) in origin.items():
            self._attach(k, roots, channels)
        for k, why in blocked:
            via = self.groups[k].values[0].name
            for root in np.unique(origin[k][0][origin[k][0] >= 0]):
                self._fix(int(root), f"{why} (its channels reach '{via}' through an index map)")

    def _fix(self, k: int, reason: str) -> None:
        if self.groups[k].reason is None or self.groups[k].follows:
            self.groups[k].reason = reason
            self.groups[k].follows = False

    def _edges(self, node: ir.Node) -> None:
        """Flow edges of one cut: (source positions, target positions) per input/output pair."""
        size = lambda v: self.groups[self.of(v)].channels  # noqa: E731
        if node.op_type == "Concat":
            sizes = [size(v) for v in node.inputs]
            if 0 in sizes:
                return self._fail(node, "has an input of unknown channel count")
            starts = np.cumsum([0, *sizes])
            for v, a, b in zip(node.inputs, starts, starts[1:]):
                self._edge(node, v, node.outputs[0], np.arange(a, b) - a, np.arange(a, b))
            return None
        ranges = _cut_ranges(node, size(node.inputs[0]), self.finder.cuts[node])
        if ranges is None:
            return self._fail(node, "cuts channels in a way that cannot be remapped")
        source = self.owner[node.inputs[0]]
        source.selects.append(Select(node, tuple(ranges), _slice_position(node, self.finder.cuts[node])))
        for out, (a, b) in zip(node.outputs, ranges):
            self._edge(node, node.inputs[0], out, np.arange(a, b), np.arange(b - a))
        return None

    def _edge(self, node: ir.Node, src: ir.Value, dst: ir.Value, sp: np.ndarray,
              dp: np.ndarray) -> None:
        self.flow.add_edge(self.of(src), self.of(dst), node=node, src=sp, dst=dp)

    def _fail(self, node: ir.Node, why: str) -> None:
        values = list(node.inputs) + list(node.outputs)
        for v in values:
            if v in self.owner:
                self._fix(self.of(v), f"{node.op_type} '{node.name}' {why}")

    def _compose(self, k: int, origin: dict) -> tuple[tuple[np.ndarray, np.ndarray], str | None]:
        """Which root and channel sits at each position of follower `k`."""
        group = self.groups[k]
        edges = list(self.flow.in_edges(k, data=True))
        if not group.channels:
            group.channels = int(sum(len(d["dst"]) for _, _, d in edges))
        roots = np.full(group.channels, -1)
        channels = np.full(group.channels, -1)
        problem = None
        for src, _, data in edges:
            dp, sp = data["dst"], data["src"]
            if dp.size and (dp.max() >= group.channels or (roots[dp] >= 0).any()):
                problem = f"{data['node'].op_type} '{data['node'].name}' writes positions " \
                          f"another tensor writes too"
                continue
            if src in origin:
                roots[dp], channels[dp] = origin[src][0][sp], origin[src][1][sp]
            else:
                roots[dp], channels[dp] = src, sp
        if group.reason is None:
            names = sorted({self.groups[r].name for r in np.unique(roots[roots >= 0])})
            node = edges[0][2]["node"]
            group.reason = f"follows {', '.join(names)} through {node.op_type} '{node.name}'"
            group.follows = True
        return (roots, channels), problem

    def _attach(self, k: int, roots: np.ndarray, channels: np.ndarray) -> None:
        for root in np.unique(roots[roots >= 0]):
            where = np.flatnonzero(roots == root)
            self.groups[int(root)].maps.append(IndexMap(self.groups[k], channels[where], where))


def channel_groups(model: ir.Model) -> list[ChannelGroup]:
    """Every group of conv channels in the main graph, prunable or fixed (with the reason)."""
    finder = _Finder(model)
    finder.run()
    return finder.groups()


def prune_group(group: ChannelGroup, keep: Sequence[int], graph: ir.Graph) -> dict[ir.Node, np.ndarray]:
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
            _cut_counts(select, keep)
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
        _recut(graph, select, keep)
    for value, axis in zip(group.values, group.axes):
        if value.shape is not None and axis < len(value.shape):
            dims = list(value.shape)
            dims[axis] = int(keep.size)
            value.shape = ir.Shape(dims)


def _recut(graph: ir.Graph, select: Select, keep: np.ndarray) -> None:
    """Rewrite a Split's sizes or a Slice's bounds for the kept channels of its input."""
    node, counts = select.node, _cut_counts(select, keep)
    if node.op_type == "Slice":
        a, b = select.ranges[0]
        for index, bound in ((1, int((keep < a).sum())), (2, int((keep < b).sum()))):
            array = const_array(node.inputs[index]).copy()
            array[select.position] = bound
            set_const_input(graph, node, index, array)
        return
    sizes = np.asarray(counts, dtype=np.int64)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        set_const_input(graph, node, 1, sizes)
    elif "split" in node.attributes or graph.opset_imports.get("", 13) < 13:
        node.attributes["split"] = ir.AttrInt64s("split", [int(c) for c in counts])
    else:
        node.attributes.pop("num_outputs", None)
        node.resize_inputs(2)
        set_const_input(graph, node, 1, sizes)


def _cut_counts(select: Select, keep: np.ndarray) -> list[int]:
    """Kept channels in each range of a Split / Slice; an error when one would be empty."""
    counts = [int(((keep >= a) & (keep < b)).sum()) for a, b in select.ranges]
    if 0 in counts:
        node = select.node
        raise ValueError(f"{node.op_type} '{node.name}' would give an output no channels; keep "
                         "more channels.")
    return counts


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


def _cut_axis(node: ir.Node, value: ir.Value, channel_axis: int) -> int | None:
    """The axis a Concat / Split cuts; for a Slice `channel_axis` when it slices that axis (-1
    when not); None when unknown."""
    rank = _known_rank(value)
    if node.op_type == "Slice":
        spec = _slice_spec(node, rank)
        return None if spec is None else (channel_axis if channel_axis in spec else -1)
    axis = _attr(node, "axis", 1 if node.op_type == "Concat" else 0)
    if axis < 0:
        return None if rank is None else axis + rank
    return axis


def _known_rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _slice_spec(node: ir.Node, rank: int | None) -> dict[int, tuple[int, int, int, int]] | None:
    """A Slice's {axis: (start, end, step, position)} from constant inputs, or None."""
    if len(node.inputs) < 3:
        return None
    arrays = [const_array(node.inputs[k]) if len(node.inputs) > k and node.inputs[k] is not None
              else None for k in range(1, 5)]
    starts, ends, axes, steps = arrays
    if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] is not None
                                          and axes is None) \
            or (len(node.inputs) > 4 and node.inputs[4] is not None and steps is None):
        return None
    axes = np.arange(starts.size) if axes is None else axes.ravel()
    steps = np.ones(starts.size, np.int64) if steps is None else steps.ravel()
    if (axes < 0).any() and rank is None:
        return None
    axes = [int(a) % rank if a < 0 else int(a) for a in axes]
    return {a: (int(starts.ravel()[k]), int(ends.ravel()[k]), int(steps[k]), k)
            for k, a in enumerate(axes)}


def _cut_ranges(node: ir.Node, size: int, axis: int) -> list[tuple[int, int]] | None:
    """The channel range [start, stop) of each Split / Slice output, None when not expressible."""
    if not size:
        return None
    if node.op_type == "Slice":
        start, end, step, _ = _slice_spec(node, _known_rank(node.inputs[0]))[axis]
        if step != 1:
            return None
        start, end = (min(max(b + size if b < 0 else b, 0), size) for b in (start, end))
        return [(start, end)] if end > start else None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = const_array(node.inputs[1])
        sizes = None if sizes is None else [int(v) for v in sizes.ravel()]
    elif "split" in node.attributes:
        sizes = list(node.attributes["split"].as_ints())
    else:
        count = len(node.outputs)
        step = -(-size // count)
        sizes = [min(step, size - k * step) for k in range(count)]
    if sizes is None or sum(sizes) != size or min(sizes) <= 0:
        return None
    starts = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in zip(starts, starts[1:])]


def _slice_position(node: ir.Node, axis: int) -> int:
    """Where `axis` sits in a Slice's starts / ends (0 for a Split)."""
    if node.op_type != "Slice":
        return 0
    return _slice_spec(node, _known_rank(node.inputs[0]))[axis][3]

"""Index maps of conv channel groups through Concat, Split and Slice on the channel axis
(`ir/conv_groups.py` finds the groups): each side of a cut is a group of its own, and a flow edge
says which channel of one sits at which position of the other. A group nothing maps into is a
*root*; the others *follow*: their positions are composed back to root channels along the edges
(a networkx DAG), a root keeps an `IndexMap` per follower it reaches, and a follower that must
stay whole (a graph output, a position two tensors write, a cycle) fixes every root mapping into
it. Pruning rewrites a Split's sizes and a Slice's bounds from the kept channels of its input."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
import onnx_ir as ir

from winnow.ir.pruning import const_array, set_const_input

if TYPE_CHECKING:
    from winnow.ir.conv_groups import ChannelGroup


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


class IndexMaps:
    """Turns the Concat / Split / Slice cuts into index maps from root groups to followers."""

    def __init__(self, cuts: Mapping[ir.Node, int], groups: list[ChannelGroup],
                 owner: Mapping[ir.Value, ChannelGroup]) -> None:
        self.cuts, self.groups, self.owner = cuts, groups, owner
        self.index = {id(g): k for k, g in enumerate(groups)}
        self.flow = nx.MultiDiGraph()
        self.flow.add_nodes_from(range(len(groups)))

    def of(self, value: ir.Value) -> int:
        return self.index[id(self.owner[value])]

    def resolve(self) -> None:
        """Flow edges of every cut, then the followers' origins, maps and fixed roots."""
        for node in self.cuts:
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
        ranges = cut_ranges(node, size(node.inputs[0]), self.cuts[node])
        if ranges is None:
            return self._fail(node, "cuts channels in a way that cannot be remapped")
        source = self.owner[node.inputs[0]]
        source.selects.append(Select(node, tuple(ranges), slice_position(node, self.cuts[node])))
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


def recut(graph: ir.Graph, select: Select, keep: np.ndarray) -> None:
    """Rewrite a Split's sizes or a Slice's bounds for the kept channels of its input."""
    node, counts = select.node, cut_counts(select, keep)
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


def cut_counts(select: Select, keep: np.ndarray) -> list[int]:
    """Kept channels in each range of a Split / Slice; an error when one would be empty."""
    counts = [int(((keep >= a) & (keep < b)).sum()) for a, b in select.ranges]
    if 0 in counts:
        node = select.node
        raise ValueError(f"{node.op_type} '{node.name}' would give an output no channels; keep "
                         "more channels.")
    return counts


def cut_axis(node: ir.Node, value: ir.Value, channel_axis: int) -> int | None:
    """The axis a Concat / Split cuts; for a Slice `channel_axis` when it slices that axis (-1
    when not); None when unknown."""
    rank = _known_rank(value)
    if node.op_type == "Slice":
        spec = _slice_spec(node, rank)
        return None if spec is None else (channel_axis if channel_axis in spec else -1)
    axis = _int_attr(node, "axis", 1 if node.op_type == "Concat" else 0)
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


def cut_ranges(node: ir.Node, size: int, axis: int) -> list[tuple[int, int]] | None:
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


def slice_position(node: ir.Node, axis: int) -> int:
    """Where `axis` sits in a Slice's starts / ends (0 for a Split)."""
    if node.op_type != "Slice":
        return 0
    return _slice_spec(node, _known_rank(node.inputs[0]))[axis][3]


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default

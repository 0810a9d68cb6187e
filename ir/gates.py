"""Gated copies of a model: one scalar input per region scales that region's residual branch.

`gated_copy(model, regions)` returns a copy in which the exit of region i (the residual stream
leaving it) is replaced, for every consumer and graph output, by

    g_i * exit + (1 - g_i) * entry          (= entry + g_i * (exit - entry))

where `g_i` is a new float scalar graph input `winnow_gate_<i>`. g = 1 is the original model
(bit for bit: 1 * exit + 0 * entry == exit), g = 0 skips the region (exactly `entry`): for a
pre-norm region this removes f(norm(x)), for a post-norm region norm(x + f(x)) becomes x and
for a plain one x + f(x) becomes x. A skip set is then a different feed, not a new session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from winnow.ir.linear_adapter import LinearAdapter, adapter_nodes
from winnow.ir.regions import Region

GATE_PREFIX = "winnow_gate_"


def gate_name(index: int) -> str:
    """The graph input name of the gate of the `index`-th listed region."""
    return f"{GATE_PREFIX}{index}"


def gate_feeds(count: int, skipped: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Gate feeds for `count` gates: 1 everywhere except 0 at the `skipped` indices."""
    off = set(skipped)
    return {gate_name(i): np.array(0.0 if i in off else 1.0, dtype=np.float32)
            for i in range(count)}


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        for v in node.outputs:
            if v.name:
                values[v.name] = v
    return values


def gated_copy(model: ir.Model, regions: Sequence[Region],
               adapters: Mapping[str, LinearAdapter] | None = None) -> tuple[ir.Model, list[str]]:
    """A copy of `model` with a gate input on each region's residual branch; returns the gate names.

    Regions are looked up in the copy by the names of their entry and exit values, so they may
    come from `find_regions(model)`. Regions may be adjacent (one's exit is the next's entry):
    the next region then reads the gated stream. With `adapters` (by region name), a closed gate
    gives `entry + adapter(entry)` instead of `entry`: skipping with the adapter drop-layers fits.
    """
    adapters = adapters or {}
    copy = model.clone()
    graph = copy.graph
    values = _values_by_name(graph)
    resolved = []
    for region in regions:
        entry, exit_ = values.get(region.entry.name), values.get(region.exit.name)
        if entry is None or exit_ is None:
            raise KeyError(f"region '{region.name}': entry '{region.entry.name}' or exit "
                           f"'{region.exit.name}' is not a value of the model")
        resolved.append((entry, exit_))

    names = []
    gated_of: dict[int, ir.Value] = {}  # id(raw exit) -> its gated value, for adjacent regions
    for i, (entry, exit_) in enumerate(resolved):
        while id(entry) in gated_of:
            entry = gated_of[id(entry)]
        while id(exit_) in gated_of:
            exit_ = gated_of[id(exit_)]
        anchor = exit_.producer()
        if anchor is None:
            raise ValueError(f"region exit '{exit_.name}' is a graph input, not a computed value")
        name = gate_name(i)
        gate = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
        graph.inputs.append(gate)
        names.append(name)
        dtype = exit_.dtype or entry.dtype or ir.DataType.FLOAT
        new_nodes = []

        def add(op: str, inputs: list[ir.Value], suffix: str, **attrs: object) -> ir.Value:
            node = ir.node(op, inputs, attrs or None, name=f"{name}/{suffix}")
            node.outputs[0].name = f"{name}/{suffix}"
            new_nodes.append(node)
            return node.outputs[0]

        skip = entry
        if regions[i].name in adapters:
            adapter, skip = adapter_nodes(graph, entry, adapters[regions[i].name], f"{name}/adapter")
            new_nodes.extend(adapter)
        one = add("Constant", [], "one", value=ir.tensor(np.array(1.0, dtype=dtype.numpy())))
        g = gate if dtype == ir.DataType.FLOAT else add("Cast", [gate], "cast", to=dtype)
        keep = add("Mul", [exit_, g], "keep")
        rest = add("Mul", [skip, add("Sub", [one, g], "complement")], "rest")
        gated = add("Add", [keep, rest], "out")
        if exit_.type is not None:
            gated.type = exit_.type
        gated.shape = exit_.shape
        keep_node = keep.producer()

        for user, index in list(exit_.uses()):
            if user is not keep_node:
                user.replace_input_with(index, gated)
        for k, out in enumerate(graph.outputs):
            if out is exit_:
                graph.outputs[k] = gated
        # The gated value takes the exit's name, so outputs and captures by name see the stream.
        original = exit_.name
        exit_.name = f"{name}/exit"
        gated.name = original
        gated_of[id(exit_)] = gated

        graph.insert_after(anchor, new_nodes)
    return copy, names


def suffix_model(gated: ir.Model, stream: str) -> ir.Model:
    """The part of a (gated) model after the computed value `stream`, now a graph input.

    Nodes only the removed prefix needed are dropped, and so are graph inputs nothing reads
    (with their initializers, which an IR < 4 model also lists as inputs).
    """
    copy = gated.clone()
    graph = copy.graph
    old = next(v for node in graph for v in node.outputs if v.name == stream)
    new = ir.Value(name=stream, type=old.type or ir.TensorType(ir.DataType.FLOAT),
                   shape=old.shape)
    for user, index in list(old.uses()):
        user.replace_input_with(index, new)
    for k, out in enumerate(graph.outputs):
        if out is old:
            graph.outputs[k] = new
    old.name = f"{stream}/prefix"
    graph.inputs.insert(0, new)
    RemoveUnusedNodesPass()(copy)
    for value in list(graph.inputs):
        if not value.uses() and not value.is_graph_output():
            graph.inputs.remove(value)
            # IR < 4 requires every initializer to be a graph input: drop the pair together.
            graph.initializers.pop(value.name, None)
    return copy


HEAD_GATE_PREFIX = "winnow_head_gate_"


def head_gated_copy(model: ir.Model, regions: Sequence[Region]) -> tuple[ir.Model, list[str]]:
    """A copy of `model` with one gate input per attention region on its heads: a float vector
    of num_heads x head_dim that multiplies the output projection's input (heads flattened,
    head-major), so a head is masked by zeroing its slice. Returns the gate names in order."""
    from winnow.ir.attention import _weight

    copy = model.clone()
    graph = copy.graph
    names = []
    for i, region in enumerate(regions):
        heads = region.heads
        node = next((n for n in graph if (w := _weight(n)) is not None and w.name == heads.o), None)
        if node is None:
            raise KeyError(f"region '{region.name}': no projection reads weight '{heads.o}'")
        name = f"{HEAD_GATE_PREFIX}{i}"
        width = heads.num_heads * heads.head_dim
        gate = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([width]))
        graph.inputs.append(gate)
        names.append(name)
        source = node.inputs[0]
        mul = ir.node("Mul", [source, gate], name=f"{name}/mul")
        mul.outputs[0].name = f"{name}/out"
        mul.outputs[0].type, mul.outputs[0].shape = source.type, source.shape
        graph.insert_before(node, [mul])
        node.replace_input_with(0, mul.outputs[0])
    return copy, names


def head_gate_feeds(regions: Sequence[Region], masked: Sequence[tuple[int, int]] = ()
                    ) -> dict[str, np.ndarray]:
    """Head-gate feeds for `head_gated_copy`: ones, except zeros for each (region, head) masked."""
    feeds = {f"{HEAD_GATE_PREFIX}{i}": np.ones(r.heads.num_heads * r.heads.head_dim, np.float32)
             for i, r in enumerate(regions)}
    for i, h in masked:
        d = regions[i].heads.head_dim
        feeds[f"{HEAD_GATE_PREFIX}{i}"][h * d:(h + 1) * d] = 0.0
    return feeds

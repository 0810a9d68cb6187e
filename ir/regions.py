"""Regions: residual blocks, their attention/MLP sub-layers and attention heads, found from the
exporter's module scopes when present and from the graph structure (networkx) otherwise."""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

import onnx_ir as ir

from winnow.ir.graph_view import ROOT, GraphView

PARAM_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})
NORM_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"})
RESIDUAL_OPS = frozenset({"Add", "Sum"})
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclasses.dataclass
class Region:
    """A residual region: `exit = entry + branch(entry)` (pre/plain) or `norm(entry + branch)` (post)."""

    name: str
    kind: str  # "attention", "mlp", or "block"
    entry: ir.Value
    exit: ir.Value
    add: ir.Node
    nodes: list[ir.Node]  # branch nodes, the residual Add, and a post-norm when there is one
    layout: str  # "pre" (x + f(norm(x))), "post" (norm(x + f(x))) or "plain" (x + f(x))
    norm_nodes: list[ir.Node]
    identity_skip: bool  # False for projection shortcuts (ResNet downsampling): not droppable
    scope: str | None = None
    shortcut: ir.Value | None = None  # a projection shortcut's output (the Add's other input)
    heads: Any = None  # winnow.ir.attention.AttentionHeads for attention regions
    parts: list[Region] = dataclasses.field(default_factory=list)

    @property
    def droppable(self) -> bool:
        """Whether replacing the region by its entry keeps shapes (identity skip everywhere)."""
        return all(p.identity_skip for p in self.parts) if self.parts else self.identity_skip

    @property
    def skip(self) -> ir.Value | None:
        """What is left of the stream when the residual branch is removed: the entry for an
        identity skip, the projection's output for a projection shortcut (None if unknown)."""
        return self.entry if self.identity_skip else self.shortcut

    @property
    def not_droppable_reason(self) -> str | None:
        """Why the region cannot be dropped (None when it can)."""
        if self.droppable:
            return None
        return ("its shortcut is a projection (the output shape differs from the input), so "
                "removing it would change shapes")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary."""
        out = {"name": self.name, "kind": self.kind, "layout": self.layout,
               "entry": self.entry.name, "exit": self.exit.name, "nodes": len(self.nodes),
               "droppable": self.droppable, "scope": self.scope}
        if not self.droppable:
            out["not_droppable"] = self.not_droppable_reason
        if self.shortcut is not None:
            out["shortcut"] = self.shortcut.name
        if self.heads is not None:
            out["heads"] = self.heads.to_dict()
        if self.parts:
            out["parts"] = [p.to_dict() for p in self.parts]
        return out


LEVELS = ("block", "sublayer", "attention", "mlp")  # what RegionMap.candidates accepts


@dataclasses.dataclass
class RegionMap:
    """The blocks of a model (each with its sub-layers) and how they were found."""

    blocks: list[Region]
    source: str  # "metadata" (module scopes named them) or "structure"

    def sublayers(self) -> list[Region]:
        """Attention and MLP sub-layers in order (the blocks themselves for CNNs)."""
        return [p for b in self.blocks for p in (b.parts or [b])]

    def all(self) -> list[Region]:
        """Blocks and sub-layers."""
        out = []
        for block in self.blocks:
            out.append(block)
            out.extend(block.parts)
        return out

    def get(self, name: str) -> Region:
        """The region of that name; KeyError lists the valid names."""
        for region in self.all():
            if region.name == name:
                return region
        raise KeyError(name)

    def candidates(self, level: str) -> list[Region]:
        """Regions at a level: 'block', 'sublayer', 'attention' or 'mlp' (droppable only)."""
        pool = self.blocks if level == "block" else self.sublayers()
        if level in ("attention", "mlp"):
            pool = [r for r in pool if r.kind == level]
        return [r for r in pool if r.droppable]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary."""
        return {"source": self.source, "blocks": [b.to_dict() for b in self.blocks]}


def node_scopes(node: ir.Node) -> list[str]:
    """The exporter's module scopes of a node, outermost first (empty without metadata)."""
    text = node.metadata_props.get(SCOPES_KEY)
    if not text:
        return []
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [s for s in scopes if isinstance(s, str)]


def _common_scope(nodes: list[ir.Node]) -> str | None:
    lists = [node_scopes(n)[:-1] for n in nodes]  # the last entry is the op, not a module
    lists = [s for s in lists if s]
    if not lists:
        return None
    common = lists[0]
    for other in lists[1:]:
        k = 0
        while k < min(len(common), len(other)) and common[k] == other[k]:
            k += 1
        common = common[:k]
    common = [s for s in common if s]
    return common[-1] if common else None


def _is_param_node(node: ir.Node) -> bool:
    return node.op_type in PARAM_OPS and any(v is not None and is_const(v) for v in node.inputs[1:])


def _value_descendants(view: GraphView, value: ir.Value) -> set[int]:
    out: set[int] = set()
    for user, _ in value.uses():
        if id(user) in view.index:
            j = view.idx(user)
            out |= {j} | view.descendants(j)
    return out


def is_const(value: ir.Value) -> bool:
    """An initializer, or the output of a Constant/ConstantOfShape fed only by constants."""
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type in ("Constant", "ConstantOfShape") and all(
        v is None or v.const_value is not None for v in producer.inputs)


def _branch_is_sese(view: GraphView, branch: set[int], entry: ir.Value, below: set[int],
                    branch_out: ir.Value, add: ir.Node) -> bool:
    """Single entry (only `entry` or entry-independent side inputs) and single exit."""
    for i in branch:
        node = view.nodes[i]
        for v in node.inputs:
            if v is None or v is entry or is_const(v):
                continue
            producer = v.producer()
            if producer is None:
                continue  # a graph input other than the entry: a side input (mask, positions)
            j = view.idx(producer)
            if j not in branch and j in below:
                return False  # reads the residual stream through another path
        for out in node.outputs:
            for user, _ in out.uses():
                if out is branch_out:
                    if user is not add:
                        return False
                elif id(user) not in view.index or view.idx(user) not in branch:
                    return False
    return True


def _residual(view: GraphView, add: ir.Node, idom: dict) -> Region | None:
    a, b = add.inputs[0], add.inputs[1] if len(add.inputs) > 1 else None
    if a is None or b is None or is_const(a) or is_const(b):
        return None
    ai = view.value_ancestors(a)
    bi = view.value_ancestors(b)
    for entry, branch_out, branch_anc in ((a, b, bi), (b, a, ai)):
        producer = entry.producer()
        below = _value_descendants(view, entry)
        is_ancestor = (producer is not None and view.idx(producer) in branch_anc) or (
            producer is None and entry in {v for i in branch_anc for v in view.nodes[i].inputs})
        if not is_ancestor:
            continue
        branch = below & branch_anc
        if _branch_is_sese(view, branch, entry, below, branch_out, add):
            return _make_region(view, add, entry, branch, identity_skip=True)
    return _projection_region(view, add, idom)


def _projection_region(view: GraphView, add: ir.Node, idom: dict) -> Region | None:
    d = idom.get(view.idx(add))
    if d is None or d == ROOT:
        return None
    dom = view.nodes[d]
    if len(dom.outputs) != 1:
        return None
    entry = dom.outputs[0]
    branch = _value_descendants(view, entry) & view.ancestors(view.idx(add))
    sides = [view.value_ancestors(v) & branch for v in add.inputs]
    if not all(any(_is_param_node(view.nodes[i]) for i in s) for s in sides):
        return None
    region = _make_region(view, add, entry, branch, identity_skip=False)
    if region is not None:
        region.shortcut = _shortcut(view, add, sides)
    return region


def _shortcut(view: GraphView, add: ir.Node, sides: list[set[int]]) -> ir.Value | None:
    """The Add input on the side with fewer weight ops (ResNet: one 1x1 conv + BN against a
    three-conv bottleneck); None when both sides weigh the same."""
    weights = [sum(_is_param_node(view.nodes[i]) for i in s) for s in sides]
    if weights[0] == weights[1]:
        return None
    return add.inputs[0] if weights[0] < weights[1] else add.inputs[1]


def _pre_norm(nodes: list[ir.Node], entry: ir.Value) -> list[ir.Node]:
    """The branch's nodes between the entry and its first weight op, when they normalize
    (a LayerNormalization-like op, or a decomposed norm such as RMSNorm's ReduceMean chain)."""
    members = {id(n) for n in nodes}
    front, queue, seen = [], [entry], set()
    while queue:
        for user, _ in queue.pop().uses():
            if id(user) not in members or id(user) in seen or _is_param_node(user):
                continue
            seen.add(id(user))
            front.append(user)
            queue.extend(user.outputs)
    if any(n.op_type in NORM_OPS or n.op_type == "ReduceMean" for n in front):
        return front
    return []


def _make_region(view: GraphView, add: ir.Node, entry: ir.Value, branch: set[int],
                 identity_skip: bool) -> Region | None:
    nodes = [view.nodes[i] for i in sorted(branch)]
    if not any(_is_param_node(n) for n in nodes):
        return None
    pre_norm = _pre_norm(nodes, entry)
    out = add.outputs[0]
    users = [u for u, _ in out.uses()]
    layout, norm_nodes, exit_value = "plain", [], out
    if pre_norm:
        layout, norm_nodes = "pre", pre_norm
    elif len(users) == 1 and users[0].op_type in NORM_OPS:
        layout, norm_nodes, exit_value = "post", [users[0]], users[0].outputs[0]
    kind = "attention" if any(n.op_type == "Softmax" for n in nodes) else "mlp"
    members = nodes + [add] + ([norm_nodes[0]] if layout == "post" else [])
    return Region(name="", kind=kind, entry=entry, exit=exit_value, add=add, nodes=members,
                  layout=layout, norm_nodes=norm_nodes, identity_skip=identity_skip,
                  scope=_common_scope([n for n in nodes if _is_param_node(n)]))


def _residual_regions(model: ir.Model) -> list[Region]:
    view = GraphView(model.graph)
    idom = view.immediate_dominators()
    regions = []
    for node in view.nodes:
        if node.op_type in RESIDUAL_OPS and len(node.inputs) == 2 and node.domain in ("", "ai.onnx"):
            region = _residual(view, node, idom)
            if region is not None:
                regions.append(region)
    return regions


def _group_blocks(subs: list[Region]) -> list[Region]:
    is_transformer = any(s.kind == "attention" for s in subs)
    blocks: list[Region] = []
    i = 0
    while i < len(subs):
        first = subs[i]
        nxt = subs[i + 1] if i + 1 < len(subs) else None
        if is_transformer and first.kind == "attention" and nxt is not None \
                and nxt.kind == "mlp" and nxt.entry is first.exit:
            blocks.append(_pair(first, nxt))
            i += 2
            continue
        if not is_transformer:
            first.kind = "block"
        blocks.append(first)
        i += 1
    return blocks


def _pair(attn: Region, mlp: Region) -> Region:
    scope = _common_scope([n for n in attn.nodes + mlp.nodes if _is_param_node(n)])
    return Region(name="", kind="block", entry=attn.entry, exit=mlp.exit, add=mlp.add,
                  nodes=attn.nodes + mlp.nodes, layout=attn.layout, norm_nodes=attn.norm_nodes,
                  identity_skip=attn.identity_skip and mlp.identity_skip, scope=scope,
                  parts=[attn, mlp])


def _name_blocks(blocks: list[Region]) -> str:
    scopes = [b.scope for b in blocks]
    use_scopes = all(scopes) and len(set(scopes)) == len(scopes)
    for i, block in enumerate(blocks):
        block.name = _short_scope(block.scope) if use_scopes else f"block{i}"
        for part in block.parts:
            part.name = f"{block.name}.{'attn' if part.kind == 'attention' else 'mlp'}"
    return "metadata" if use_scopes else "structure"


def _short_scope(scope: str) -> str:
    return scope[len("model."):] if scope.startswith("model.") else scope


def find_regions(model: ir.Model) -> RegionMap:
    """Find the residual blocks (and attention/MLP sub-layers with their heads) of a model."""
    from winnow.ir.attention import find_heads

    subs = _residual_regions(model)
    blocks = _group_blocks(subs)
    source = _name_blocks(blocks)
    for region in subs:
        if region.kind == "attention":
            region.heads = find_heads(region)
    return RegionMap(blocks=blocks, source=source)

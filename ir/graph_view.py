"""A networkx view of an IR graph: nodes are IR nodes, edges follow values producer -> consumer."""

from __future__ import annotations

import functools

import networkx as nx
import onnx_ir as ir

ROOT = "__root__"


class GraphView:
    """Dataflow DiGraph over the nodes of one IR graph, with reachability helpers."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes: list[ir.Node] = list(graph)
        self.index = {id(n): i for i, n in enumerate(self.nodes)}
        self.dag = nx.DiGraph()
        self.dag.add_nodes_from(range(len(self.nodes)))
        for i, node in enumerate(self.nodes):
            for value in node.outputs:
                for user, _ in value.uses():
                    j = self.index.get(id(user))
                    if j is not None:
                        self.dag.add_edge(i, j)

    def idx(self, node: ir.Node) -> int:
        """Position of an IR node in the view."""
        return self.index[id(node)]

    @functools.cache  # noqa: B019 - one view per analysis, freed with it
    def ancestors(self, i: int) -> frozenset[int]:
        """Nodes with a path to node i."""
        return frozenset(nx.ancestors(self.dag, i))

    @functools.cache  # noqa: B019
    def descendants(self, i: int) -> frozenset[int]:
        """Nodes reachable from node i."""
        return frozenset(nx.descendants(self.dag, i))

    def value_ancestors(self, value: ir.Value) -> frozenset[int]:
        """Nodes the value depends on (its producer included)."""
        producer = value.producer()
        if producer is None or id(producer) not in self.index:
            return frozenset()
        i = self.idx(producer)
        return self.ancestors(i) | {i}

    def reads_graph_input(self, i: int) -> bool:
        """Whether node i reads a graph input that is not an initializer (real data enters)."""
        return any(v is not None and v.is_graph_input() and not v.is_initializer()
                   for v in self.nodes[i].inputs)

    def immediate_dominators(self) -> dict[int, int | str]:
        """Immediate dominator of each node, from a virtual root feeding the nodes that read
        graph inputs; constant-only subgraphs (weights) are not on any data path."""
        rooted = self.dag.copy()
        rooted.add_node(ROOT)
        rooted.add_edges_from((ROOT, n) for n in self.dag.nodes if self.reads_graph_input(n))
        return nx.immediate_dominators(rooted, ROOT)

"""`cse`: merge identical nodes (onnx-ir's common subexpression elimination), in the main graph
and inside every If/Loop/Scan body."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass

from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option


class SubgraphCSEPass(CommonSubexpressionEliminationPass):
    """onnx-ir's CSE applied to each graph of the model, subgraphs included.

    onnx-ir 1.1 only visits the main graph. Within one graph merging is as safe as at the top
    level: a body's nodes read the same values on every iteration, and nodes that own
    subgraphs are never merged. Graphs with a type-valued attribute (Optional's `type`) are
    left alone: onnx-ir 1.1's CSE hashes attribute values and fails on TypeAndShape.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Eliminate common subexpressions graph by graph."""
        modified = False
        for graph in list(model.graphs()):
            if not _has_type_attributes(graph):
                modified |= self._eliminate_common_subexpression(graph)
        return ir.passes.PassResult(model, modified)


def _has_type_attributes(graph: ir.Graph) -> bool:
    kinds = (ir.AttributeType.TYPE_PROTO, ir.AttributeType.TYPE_PROTOS)
    return any(attr.type in kinds for node in graph for attr in node.attributes.values())


@register_pass
class CSEPass(Pass):
    """Common subexpression elimination, a thin wrapper of onnx-ir's pass."""

    name = "cse"
    description = "Merge nodes that compute the same thing (onnx-ir common passes)."

    @dataclass(frozen=True)
    class Config:
        """Options of cse."""

        size_limit: int = option(10, "largest constant tensor (elements) compared by value", min=0)

    def call(self, model: ir.Model) -> PassResult:
        """Eliminate common subexpressions in place, inside control-flow bodies too."""
        return SubgraphCSEPass(size_limit=self.config.size_limit)(model)

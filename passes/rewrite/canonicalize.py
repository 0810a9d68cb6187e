"""`canonicalize`: onnxscript's default rewrite rules plus onnx-ir's identity elimination.

Identity elimination keeps the Identity nodes onnx-ir 1.1 would remove wrongly: `y = Identity(x)`
where `y` is a graph output and `x` is not a value of that graph's own nodes (an outer-scope
value read by an If/Loop/Scan body) or is a graph output itself. onnx-ir removes them and
renames `x`, which raises "Value ... is already an output of a different graph" when two
branches pass the same outer value, and in a Scan body whose state is also emitted as a scan
output gives the body two outputs of one name (ONNX Runtime then returns wrong values).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass
from onnxscript import rewriter

from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option


class SafeIdentityEliminationPass(IdentityEliminationPass):
    """onnx-ir's identity elimination without the cases that corrupt graph outputs."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and not identity_removable(node):
            return False
        return super()._try_eliminate_identity_node(node)


def identity_removable(node: ir.Node) -> bool:
    """Whether `y = Identity(x)` can go: always when `y` is no graph output; when it is, only if
    `x` comes from a node of the same graph and is not a graph output already (then `x` simply
    takes the output's place and name)."""
    if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
        return False
    x, y = node.inputs[0], node.outputs[0]
    if not y.is_graph_output():
        return True
    producer = x.producer()
    return producer is not None and producer.graph is node.graph and not x.is_graph_output()


@register_pass
class CanonicalizePass(Pass):
    """Apply onnxscript's default rewrite rules and remove Identity nodes until nothing changes."""

    name = "canonicalize"
    description = ("Apply onnxscript's default rewrite rules (drop no-ops, merge reshapes/casts) "
                   "and onnx-ir's identity elimination.")

    @dataclass(frozen=True)
    class Config:
        """Options of canonicalize."""

        max_iterations: int = option(10, "rounds of rule application at most", min=1)

    def call(self, model: ir.Model) -> PassResult:
        """Rewrite in place until a fixed point or max_iterations."""
        rules = rewriter.RewriteRuleSet(list(rewriter._DEFAULT_REWRITE_RULES))
        modified = False
        for _ in range(self.config.max_iterations):
            changed = bool(rules.apply_to_model(model))
            changed |= SafeIdentityEliminationPass()(model).modified
            if not changed:
                break
            modified = True
        return PassResult(model, modified)

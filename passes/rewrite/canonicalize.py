"""`canonicalize`: onnxscript's default rewrite rules plus onnx-ir's identity elimination."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass
from onnxscript import rewriter

from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option


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
            changed |= IdentityEliminationPass()(model).modified
            if not changed:
                break
            modified = True
        return PassResult(model, modified)

"""`dce`: remove nodes, functions, opsets and initializers nothing uses (onnx-ir)."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from winnow.passes.base import Pass, PassResult, register_pass


@register_pass
class DCEPass(Pass):
    """Dead code elimination, a thin wrapper of onnx-ir's unused-removal passes."""

    name = "dce"
    description = "Remove unused nodes, initializers, functions and opsets (onnx-ir common passes)."

    def call(self, model: ir.Model) -> PassResult:
        """Remove dead code in place."""
        modified = False
        for inner in (RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()):
            modified |= inner(model).modified
        return PassResult(model, modified)

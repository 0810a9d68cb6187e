"""`cse`: merge identical nodes (onnx-ir's common subexpression elimination)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass

from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option


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
        """Eliminate common subexpressions in place."""
        return CommonSubexpressionEliminationPass(size_limit=self.config.size_limit)(model)

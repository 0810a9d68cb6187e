"""`fold-constants`: evaluate constant subgraphs ahead of time (onnxscript's optimizer)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnxscript.optimizer as oso

from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option


@register_pass
class FoldConstantsPass(Pass):
    """Fold constant subgraphs into initializers with onnxscript's constant folder."""

    name = "fold-constants"
    description = "Fold constant subexpressions into initializers (onnxscript optimizer)."

    @dataclass(frozen=True)
    class Config:
        """Options of fold-constants."""

        input_size_limit: int = option(8192, "largest constant input (elements) to fold", min=0)
        output_size_limit: int = option(512 * 512, "largest folded output (elements)", min=0)
        onnx_shape_inference: bool = option(False, "run ONNX shape inference node by node")

    def call(self, model: ir.Model) -> PassResult:
        """Fold constants in place."""
        result = oso.fold_constants(
            model,
            onnx_shape_inference=self.config.onnx_shape_inference,
            input_size_limit=self.config.input_size_limit,
            output_size_limit=self.config.output_size_limit,
        )
        return PassResult(model, bool(result.modified))

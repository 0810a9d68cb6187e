"""`shape-inference`: fill in value types and shapes (onnx-ir's ONNX shape inference pass)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass as _OnnxIrShapeInference

from winnow.passes.base import ALL_ANALYSES, Pass, PassResult, register_pass
from winnow.passes.config import option


@register_pass
class ShapeInferencePass(Pass):
    """Annotate values with inferred types and shapes; the graph itself is unchanged."""

    name = "shape-inference"
    description = "Infer value types and shapes with ONNX shape inference (onnx-ir common passes)."
    preserves = ALL_ANALYSES

    @dataclass(frozen=True)
    class Config:
        """Options of shape-inference."""

        data_prop: bool = option(True, "propagate constant shape data through Shape/Gather ops")
        strict: bool = option(False, "fail on inference errors instead of leaving shapes unknown")

    def call(self, model: ir.Model) -> PassResult:
        """Infer shapes in place."""
        inner = _OnnxIrShapeInference(check_type=False, strict_mode=self.config.strict,
                                      data_prop=self.config.data_prop)
        return inner(model)

"""`shape-inference`: fill in value types and shapes with ONNX shape inference."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

from winnow.passes.base import ALL_ANALYSES, Pass, PassResult, register_pass
from winnow.passes.config import option

logger = logging.getLogger(__name__)


def merge_inferred(model: ir.Model, inferred: onnx.ModelProto) -> bool:
    """Copy inferred types and shapes onto the model's values; True when anything changed.

    Unlike onnx-ir 1.1's merge (which sets `dtype` and so turns sequence-typed values
    into tensors), this copies the whole `type`, keeping sequences and optionals intact.
    """
    inferred_model = ir.serde.deserialize_model(inferred)
    modified = False
    for graph, inferred_graph in zip(model.graphs(), inferred_model.graphs()):
        inferred_values = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            found = inferred_values.get(name)
            if found is None:
                continue
            if found.type is not None and value.type != found.type:
                value.type = found.type
                modified = True
            if found.shape is not None and value.shape != found.shape:
                value.shape = found.shape
                modified = True
    return modified


@register_pass
class ShapeInferencePass(Pass):
    """Annotate values with inferred types and shapes; the graph itself is unchanged."""

    name = "shape-inference"
    description = "Infer value types and shapes with ONNX shape inference (onnx + onnx-ir)."
    preserves = ALL_ANALYSES

    @dataclass(frozen=True)
    class Config:
        """Options of shape-inference."""

        data_prop: bool = option(True, "propagate constant shape data through Shape/Gather ops")
        strict: bool = option(False, "fail on inference errors instead of leaving shapes unknown")

    def call(self, model: ir.Model) -> PassResult:
        """Infer shapes in place; on an inference error the model is left as it was."""
        infer = functools.partial(onnx.shape_inference.infer_shapes, check_type=False,
                                  strict_mode=self.config.strict, data_prop=self.config.data_prop)
        try:
            # call_onnx_api strips large initializers so models over 2 GB still infer.
            inferred = _c_api_utils.call_onnx_api(infer, model)
        except Exception as exc:  # noqa: BLE001 - onnx raises several types
            if self.config.strict:
                raise
            logger.warning("shape inference failed, model left unchanged: %s", exc)
            return PassResult(model, False)
        return PassResult(model, merge_inferred(model, inferred))

"""`fold-constants`: evaluate constant subgraphs ahead of time (onnxscript's optimizer)."""

from __future__ import annotations

from dataclasses import dataclass

import logging

import onnx_ir as ir
import onnxscript.optimizer as oso

from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option

logger = logging.getLogger(__name__)
_SEQUENCE_OPS = frozenset({"SequenceConstruct", "SplitToSequence", "ConcatFromSequence",
                           "SequenceInsert", "SequenceAt", "SequenceEmpty"})


def _keeps_external_weights(limit: int):
    """A should_fold rule: never fold a node reading a constant above `limit` elements that
    lies in an external data file (onnxscript folds a single-use Transpose of any size, which
    would pull the weight into memory)."""
    def should_fold(node: ir.Node) -> bool | None:
        for value in node.inputs:
            tensor = value.const_value if value is not None else None
            if isinstance(tensor, ir.ExternalTensor) and tensor.size > limit:
                return False
        return None

    return should_fold


def _has_sequence_ops_below_opset_13(model: ir.Model) -> bool:
    opset = model.opset_imports.get("", 0)
    return opset < 13 and any(node.op_type in _SEQUENCE_OPS
                              for node in ir.traversal.RecursiveGraphIterator(model.graph))


@register_pass
class FoldConstantsPass(Pass):
    """Fold constant subgraphs into initializers with onnxscript's constant folder; constants
    above input_size_limit kept in external data files are never folded (they stay on disk)."""

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
        if _has_sequence_ops_below_opset_13(model):
            # onnxscript 0.7.2 rewrites sequence ops into opset-13 forms (Split/Unsqueeze with
            # tensor inputs), which are invalid in older opsets: leave such models unfolded.
            logger.warning("fold-constants skipped: sequence ops in a model below opset 13")
            return PassResult(model, False)
        result = oso.fold_constants(
            model,
            onnx_shape_inference=self.config.onnx_shape_inference,
            input_size_limit=self.config.input_size_limit,
            output_size_limit=self.config.output_size_limit,
            should_fold=_keeps_external_weights(self.config.input_size_limit),
        )
        return PassResult(model, bool(result.modified))

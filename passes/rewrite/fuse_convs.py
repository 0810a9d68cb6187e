"""`fuse-convs`: fold the elementwise ops around convolutions into forms ONNX Runtime runs inside
its blocked (NCHWc) CPU convolutions, with onnxscript's rewrite rules.

A conv net exported op by op (PP-LCNet in PP-OCR: every Conv followed by a scalar `Mul`/`Add`
"learnable affine block", HardSwish spelled `x * Clip(x + 3, 0, 6) / 6`, another affine block)
spends more time in those elementwise ops and in the layout reorders ORT inserts around each of
them than in its convolutions. In order:

1. a scalar affine after a Conv folds into its weights and bias (onnxscript `conv_affine`);
2. the decomposed HardSwish becomes the `HardSwish` op (onnxscript `fuse_hardswish`; the model's
   default opset is raised to 14 first with ONNX's version converter when it is older), which
   ORT fuses into the Conv as its activation;
3. a scalar affine before an unpadded Conv folds into that Conv (onnxscript `affine_conv`);
4. a scalar affine left on a 4-D feature map becomes a `BatchNormalization` (mean 0, variance 1,
   epsilon 0: the same x * s + t), which ORT turns into a blocked depthwise 1x1 conv, so the
   tensor stays in the NCHWc layout instead of being reordered out and back;
5. a `ReduceMean` / `ReduceMax` over both spatial axes of a 4-D map (a classifier's global pool,
   as torch's `x.mean(dim=(2, 3))` exports) becomes `GlobalAveragePool` / `GlobalMaxPool` (then
   `Flatten` when the reduction dropped the axes), which ORT also runs in the NCHWc layout.

Lossless in exact arithmetic and checked like `fuse`: the rewritten copy must match the original
on calibration data within `tolerance`, else the model is left as it was, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet, pattern
from onnxscript.rewriter._ir_utils import get_singleton_value

from winnow.passes.base import register_pass
from winnow.passes.checked import CheckedRewrite, CheckOptions, adopt
from winnow.passes.config import option

HARDSWISH_OPSET = 14


@register_pass
class FuseConvsPass(CheckedRewrite):
    """Fold affine ops and decomposed HardSwish around Convs into forms ORT fuses into them."""

    name = "fuse-convs"
    description = ("Fold scalar Mul/Add next to Convs into their weights, decomposed HardSwish into "
                   "the HardSwish op (opset 14), leftover scalar affines into BatchNormalization "
                   "(ORT keeps NCHWc layout); kept only when outputs match.")
    unchanged_report = {"fusions": {}}
    fallible = True  # onnxscript and ONNX's version converter raise many types on odd graphs

    @dataclass(frozen=True)
    class Config(CheckOptions):
        """Options of fuse-convs."""

        hardswish: bool = option(True, "rewrite x * Clip(x + 3, 0, 6) / 6 into HardSwish, raising "
                                 "the opset to 14 when needed")
        batchnorm: bool = option(True, "turn scalar affines left on 4-D tensors into "
                                 "BatchNormalization")
        global_pool: bool = option(True, "turn ReduceMean/ReduceMax over both spatial axes of a "
                                   "4-D tensor into GlobalAveragePool/GlobalMaxPool")

    def precondition(self, model: ir.Model) -> str | None:
        """Nothing to fold into without a Conv (and no copy made: the pass finishes every ORT
        pipeline)."""
        return None if any(n.op_type == "Conv" for n in model.graph) else "the model has no Conv"

    def rewrite(self, model: ir.Model, feeds: list) -> dict | str:
        """The five rewrites (see the module docstring); how often each applied, and the opset."""
        counts = fuse_convs(model, self.config.hardswish, self.config.batchnorm,
                            self.config.global_pool)
        if not any(counts.values()):
            return "no pattern matched"
        return {"fusions": counts, "opset": model.opset_imports.get("", None)}


def fuse_convs(model: ir.Model, hardswish: bool = True, batchnorm: bool = True,
               global_pool: bool = True) -> dict[str, int]:
    """Apply the five rewrites in place (see the module docstring); how often each applied."""
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
    from onnxscript.rewriter.rules.common import (
        affine_conv_fusion_rule,
        conv_affine_fusion_rule,
        fuse_hardswish_rules,
    )

    LiftConstantsToInitializersPass(size_limit=0)(model)
    counts = {"conv_affine": _apply(model, [conv_affine_fusion_rule])}
    counts["hardswish"] = 0
    if hardswish and _apply(model.clone(), fuse_hardswish_rules().rules):
        if model.opset_imports.get("", 1) < HARDSWISH_OPSET:
            convert_opset(model, HARDSWISH_OPSET)
            LiftConstantsToInitializersPass(size_limit=0)(model)
        counts["hardswish"] = _apply(model, fuse_hardswish_rules().rules)
    counts["affine_conv"] = _apply(model, [affine_conv_fusion_rule])
    counts["affine_batchnorm"] = 0
    if batchnorm:
        from winnow.passes.rewrite.shape_inference import ShapeInferencePass

        ShapeInferencePass()(model)  # the channel count of each affine's input
        counts["affine_batchnorm"] = _apply(model, [AffineToBatchNorm().rule()])
    counts["global_pool"] = 0
    if global_pool:
        from winnow.passes.rewrite.shape_inference import ShapeInferencePass

        ShapeInferencePass()(model)  # the rank of each reduction's input
        counts["global_pool"] = _apply(model, [SpatialReduceToGlobalPool.rule(op)
                                               for op in GLOBAL_POOLS])
    RemoveUnusedNodesPass()(model)
    return counts


def _apply(model: ir.Model, rules: list) -> int:
    """Apply `rules` (commuted) to the main graph until none matches; the number of rewrites."""
    return int(RewriteRuleSet(list(rules), commute=True).apply_to_model(model))


def convert_opset(model: ir.Model, version: int) -> None:
    """Raise the default-domain opset of `model` in place with ONNX's version converter."""
    import onnx

    ir.external_data.load_to_model(model)
    converted = onnx.version_converter.convert_version(ir.serde.serialize_model(model), version)
    adopt(model, ir.serde.deserialize_model(converted))


class AffineToBatchNorm(pattern.RewriteRuleClassBase):
    """x * s + t with scalar constants s, t on an NCHW tensor of known channel count ->
    BatchNormalization(x, scale=s, B=t, mean=0, var=1, epsilon=0)."""

    def pattern(self, op, x, scale, offset):
        return x * scale + offset

    def check(self, context, x, scale, offset) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if get_singleton_value(scale) is None or get_singleton_value(offset) is None:
            return result.fail("the affine's operands are not constant scalars")
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[1], int):
            return result.fail("not a 4-D tensor of known channel count")
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("not float32")
        return result

    def rewrite(self, op, x, scale, offset):
        channels = x.shape[1]

        def vector(value: float, name: str) -> ir.Value:
            return op.initializer(ir.tensor(np.full(channels, value, np.float32)), name)

        stem = f"{scale.name}_bn"
        return op.BatchNormalization(
            x, vector(float(get_singleton_value(scale)), f"{stem}_scale"),
            vector(float(get_singleton_value(offset)), f"{stem}_bias"),
            vector(0.0, f"{stem}_mean"), vector(1.0, f"{stem}_var"), epsilon=0.0)


GLOBAL_POOLS = {"ReduceMean": "GlobalAveragePool", "ReduceMax": "GlobalMaxPool"}


class SpatialReduceToGlobalPool(pattern.RewriteRuleClassBase):
    """ReduceMean/ReduceMax(x, axes=[2, 3]) of a 4-D float x -> GlobalAveragePool/GlobalMaxPool,
    then Flatten when keepdims=0 (axes given as the opset-18 input)."""

    def __init__(self, reduce_op: str) -> None:
        super().__init__(f"{reduce_op}_to_global_pool")
        self.reduce_op = reduce_op

    def pattern(self, op, x, axes):
        return getattr(op, self.reduce_op)(x, axes, _allow_other_attributes=True,
                                           _outputs=["reduced"])

    def check(self, context, x, axes, reduced) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.shape is None or len(x.shape) != 4 or x.dtype != ir.DataType.FLOAT:
            return result.fail("not a 4-D float32 tensor")
        if axes.const_value is None:
            return result.fail("the axes are not constant")
        if sorted(int(a) % 4 for a in axes.const_value.numpy().reshape(-1)) != [2, 3]:
            return result.fail("not a reduction over both spatial axes")
        node = reduced.producer()
        if node.attributes.get_int("noop_with_empty_axes", 0):
            return result.fail("noop_with_empty_axes is set")
        return result

    def rewrite(self, op, x, axes, reduced):
        pooled = getattr(op, GLOBAL_POOLS[self.reduce_op])(x)
        if reduced.producer().attributes.get_int("keepdims", 1):
            return pooled
        return op.Flatten(pooled, axis=1)

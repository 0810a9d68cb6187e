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
   tensor stays in the NCHWc layout instead of being reordered out and back.

Lossless in exact arithmetic and checked like `fuse`: the rewritten copy must match the original
on calibration data within `tolerance`, else the model is left as it was, with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet, pattern
from onnxscript.rewriter._ir_utils import get_singleton_value

from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext

logger = logging.getLogger(__name__)
HARDSWISH_OPSET = 14


@register_pass
class FuseConvsPass(Pass):
    """Fold affine ops and decomposed HardSwish around Convs into forms ORT fuses into them."""

    name = "fuse-convs"
    description = ("Fold scalar Mul/Add next to Convs into their weights, decomposed HardSwish into "
                   "the HardSwish op (opset 14), leftover scalar affines into BatchNormalization "
                   "(ORT keeps NCHWc layout); kept only when outputs match.")

    @dataclass(frozen=True)
    class Config:
        """Options of fuse-convs."""

        tolerance: float = option(1e-4, "largest absolute output difference the rewritten model "
                                  "may show against the original on calibration data", min=0.0)
        samples: int = option(8, "calibration samples the check runs (0 = no check)", min=0)
        hardswish: bool = option(True, "rewrite x * Clip(x + 3, 0, 6) / 6 into HardSwish, raising "
                                 "the opset to 14 when needed")
        batchnorm: bool = option(True, "turn scalar affines left on 4-D tensors into "
                                 "BatchNormalization")

    def call(self, model: ir.Model) -> PassResult:
        """Rewrite in place when the rewritten copy passes the check; else leave the model."""
        from winnow.passes.rewrite.fuse import check_batches, max_output_error

        ctx = PassContext.current()
        trial = model.clone()
        try:
            counts = fuse_convs(trial, self.config.hardswish, self.config.batchnorm)
        except Exception as exc:  # noqa: BLE001 - onnxscript and the version converter raise many
            return self._skip(ctx, model, f"{type(exc).__name__}: {exc}")
        if not any(counts.values()):
            ctx.report[self.name] = {"fusions": counts, "note": "no pattern matched"}
            return PassResult(model, False)
        batches = check_batches(model, ctx, self.config.samples)
        error = max_output_error(model, trial, batches)
        if error > self.config.tolerance:
            return self._skip(ctx, model, f"the rewritten outputs differ by {error:.3g} (more "
                              f"than tolerance {self.config.tolerance:g}) on calibration data")
        adopt(model, trial)
        ctx.report[self.name] = {"fusions": counts, "max_abs_error": error,
                                 "opset": model.opset_imports.get("", None)}
        return PassResult(model, True)

    def _skip(self, ctx: PassContext, model: ir.Model, reason: str) -> PassResult:
        logger.warning("fuse-convs left the model as it was: %s", reason)
        ctx.report[self.name] = {"fusions": {}, "skipped": reason}
        return PassResult(model, False)


def fuse_convs(model: ir.Model, hardswish: bool = True, batchnorm: bool = True) -> dict[str, int]:
    """Apply the four rewrites in place (see the module docstring); how often each applied."""
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


def adopt(model: ir.Model, other: ir.Model) -> None:
    """Give `model` the graph, IR version and functions of `other` (its metadata stays)."""
    model.graph = other.graph
    model.ir_version = other.ir_version
    model.functions.clear()
    model.functions.update(other.functions)


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

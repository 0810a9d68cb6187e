"""`fold-scales`: a constant Mul after a Conv goes into the Conv's weights (onnxscript rules)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleClassBase, RewriteRuleSet

from winnow.passes import RulePass


def _channel_scale(scale: ir.Value, out_channels: int) -> np.ndarray | None:
    """The scale as one factor per output channel, or None when it is not one."""
    if scale.const_value is None:
        return None
    data = scale.const_value.numpy()
    if data.size == 1:
        return np.full(out_channels, data.reshape(()), dtype=data.dtype)
    if data.size == out_channels and data.ndim >= 3 and data.shape[-3] == out_channels:
        return data.reshape(out_channels)  # [C, 1, 1] or [1, C, 1, 1]
    return None


class ConvScale(RewriteRuleClassBase):
    """Mul(Conv(x, W, b), s) -> Conv(x, W * s, b * s), s a scalar or per-channel constant."""

    def pattern(self, op, x, w, b, s):
        return op.Mul(op.Conv(x, w, b, _outputs=["conv"]), s)

    def check(self, context, x, w, b, s, conv, **_):
        if w.const_value is None or b.const_value is None:
            return False
        return _channel_scale(s, w.const_value.shape[0]) is not None

    def rewrite(self, op, x, w, b, s, conv, **_):
        weight = w.const_value.numpy()
        factor = _channel_scale(s, weight.shape[0])
        new_w = op.initializer(ir.tensor(weight * factor.reshape(-1, 1, 1, 1), name=f"{w.name}_scaled"))
        new_b = op.initializer(ir.tensor(b.const_value.numpy() * factor, name=f"{b.name}_scaled"))
        return op.Conv(x, new_w, new_b, **conv.producer().attributes)


class FoldScalesPass(RulePass):
    """Fold constant per-channel or scalar Muls after Convs into the Conv weights and biases."""

    name = "fold-scales"
    description = ("Fold a constant scalar or per-channel Mul after a Conv into its weights and "
                   "bias (learned branch scales, e.g. MobileOne in PP-OCR).")
    rules = [RewriteRuleSet([ConvScale.rule()], commute=True)]

"""`fuse`: rewrite transformer subgraphs into ONNX Runtime's fused contrib ops (Attention,
SkipLayerNormalization, BiasGelu, RotaryEmbedding, ...) with onnxscript's `ort_fusions`.

Lossless by construction and checked: the fused model runs against the original on calibration
data and replaces it only when every output agrees within `tolerance`; a fusion that changes a
model's outputs (or that onnxscript fails on) leaves the model as it was, with the reason in the
report. Rotary embeddings over precomputed cos/sin tables, which onnxscript leaves unfused, are
lowered to RotaryEmbedding by `fuse_rotary.py` first (`rotary`), with or without `attention`.
The weights of each fused Attention (Q, K and V concatenated) are folded into one initializer,
and an attention bias proven to be the padding mask is replaced by the mask itself
(`ir/attention_mask.py`), so ONNX Runtime's quantizers can make QAttention of it.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
import numpy as np
import onnx_ir as ir
import onnxscript.optimizer as oso
from onnx_ir.passes.common import RemoveUnusedNodesPass

from winnow.errors import ExecutionError
from winnow.ir.attention_mask import index_attention_masks
from winnow.ir.execute import run
from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext
from winnow.passes.rewrite.fuse_rotary import fuse_rotary_tables

logger = logging.getLogger(__name__)
CONTRIB = "com.microsoft"


@register_pass
class FusePass(Pass):
    """Fuse attention, normalization and activation patterns into ONNX Runtime contrib ops."""

    name = "fuse"
    description = ("Fuse attention, SkipLayerNorm, BiasGelu, RMSNorm, rotary embeddings into ORT "
                   "contrib ops (onnxscript ort_fusions); kept only when outputs match.")

    @dataclass(frozen=True)
    class Config:
        """Options of fuse."""

        tolerance: float = option(1e-4, "largest absolute output difference the fused model may "
                                  "show against the original on calibration data", min=0.0)
        samples: int = option(8, "calibration samples the check runs (0 = no check)", min=0)
        attention: bool = option(True, "also fuse attention (Attention / MultiHeadAttention / "
                                 "GQA); false keeps to the norm and activation fusions, for CPUs "
                                 "where ORT's fused attention kernel is the slower one")
        rotary: bool = option(True, "also lower rotary embeddings over precomputed cos/sin "
                              "tables (half-split, checked) to RotaryEmbedding")

    def call(self, model: ir.Model) -> PassResult:
        """Fuse in place when the fused copy passes the check; otherwise leave the model as is."""
        ctx = PassContext.current()
        batches = check_batches(model, ctx, self.config.samples)
        trial = model.clone()
        try:
            counts = self._fuse(trial)
            counts.update(index_attention_masks(trial, batches))
        except Exception as exc:  # noqa: BLE001 - onnxscript raises many types on odd graphs
            return self._skip(model, ctx, f"onnxscript's ort_fusions failed: "
                              f"{type(exc).__name__}: {exc}")
        fused = fused_ops(trial)
        if not fused:
            ctx.report[self.name] = {"fused": {}, "fusions": {}, "note": "no pattern matched"}
            return PassResult(model, False)
        try:
            error = max_output_error(model, trial, batches)
        except ExecutionError as exc:
            return self._skip(model, ctx, f"the fused model does not run: {exc}")
        if error > self.config.tolerance:
            return self._skip(model, ctx, f"the fused outputs differ by {error:.3g} (more than "
                              f"tolerance {self.config.tolerance:g}) on calibration data")
        self._fuse(model)
        index_attention_masks(model, batches)
        ctx.report[self.name] = {"fused": fused_ops(model), "fusions": counts,
                                 "max_abs_error": error, "checked_samples": _rows(batches)}
        return PassResult(model, True)

    def _fuse(self, model: ir.Model) -> dict[str, int]:
        """Rotary embeddings over constant tables first (onnxscript's attention fusions read the
        RotaryEmbedding ops), then onnxscript's ORT fusions; how many times each applied."""
        attention = self.config.attention  # onnxscript's GQA fusion reads per-token positions
        tables = fuse_rotary_tables(model, attention) if self.config.rotary else 0
        counts = fuse_for_ort(model, self.config.attention)
        return {**counts, "rotary_embedding_tables": tables} if tables else counts

    def _skip(self, model: ir.Model, ctx: PassContext, reason: str) -> PassResult:
        logger.warning("fuse left the model unfused: %s", reason)
        ctx.report[self.name] = {"fused": {}, "fusions": {}, "skipped": reason}
        return PassResult(model, False)


def fuse_for_ort(model: ir.Model, attention: bool = True) -> dict[str, int]:
    """Run onnxscript's ORT fusions in place (without `attention`, only its norm and activation
    fusions), then fold concatenated constant weights; returns how many times each applied."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    _, counts = optimize_for_ort(model) if attention else (model, _fuse_norms(model))
    oso.fold_constants(model, should_fold=_concat_of_constants)
    RemoveUnusedNodesPass()(model)
    return {k: int(v) for k, v in counts.items() if v}


def _fuse_norms(model: ir.Model) -> dict[str, int]:
    """onnxscript's norm and activation fusions alone (the order `optimize_for_ort` applies
    them in), then its ORT pattern rules (FusedMatMul and the like)."""
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import ORT_PATTERN_REWRITE_RULES
    from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
    from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
    from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import (
        fuse_skip_layer_normalization,
        fuse_skip_rms_normalization,
    )

    optimize(model)
    fusions = {"erf_gelu": fuse_erfgelu, "rms_normalization": fuse_rms_normalization,
               "skip_layer_normalization": fuse_skip_layer_normalization,
               "skip_rms_normalization": fuse_skip_rms_normalization, "gelu": fuse_gelu,
               "bias_gelu": fuse_bias_gelu}
    counts = {name: int(fusion(model)) for name, fusion in fusions.items()}
    optimize(model)
    rewrite(model, ORT_PATTERN_REWRITE_RULES)
    return counts


def _concat_of_constants(node: ir.Node) -> bool | None:
    """Fold a Concat of constants whatever its size (fused QKV weights and biases)."""
    if node.op_type == "Concat" and node.domain == "" and all(
            v is not None and v.const_value is not None for v in node.inputs):
        return True
    return None


def fused_ops(model: ir.Model) -> dict[str, int]:
    """Contrib-domain (com.microsoft) nodes of the main graph by op type."""
    return dict(collections.Counter(n.op_type for n in model.graph if n.domain == CONTRIB))


def check_batches(model: ir.Model, ctx: PassContext, samples: int) -> list[dict[str, np.ndarray]]:
    """The first `samples` calibration samples a checked rewrite compares outputs on (none for
    0: no check)."""
    from winnow.passes.analysis.calibration import calibration_batches
    from winnow.passes.analysis.layer_similarity import limit_samples

    if samples == 0:
        return []
    return limit_samples(calibration_batches(model, ctx), samples)


def max_output_error(reference: ir.Model, candidate: ir.Model,
                     batches: list[dict[str, np.ndarray]]) -> float:
    """Largest absolute difference of any floating output over the batches (0 with none)."""
    worst = 0.0
    for feeds in batches:
        want, got = run(reference, feeds), run(candidate, feeds)
        for name, r in want.items():
            if np.issubdtype(np.asarray(r).dtype, np.floating) and np.size(r):
                diff = np.abs(np.asarray(got[name], np.float64) - np.asarray(r, np.float64))
                worst = max(worst, float(np.nanmax(diff)) if not np.isnan(diff).all() else 0.0)
    return worst


def _rows(batches: list[dict[str, np.ndarray]]) -> int:
    return sum(int(next(iter(b.values())).shape[0]) for b in batches if b)

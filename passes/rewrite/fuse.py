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
from dataclasses import dataclass

import onnx_ir as ir
import onnxscript.optimizer as oso
from onnx_ir.passes.common import RemoveUnusedNodesPass

from winnow.ir.attention_mask import index_attention_masks
from winnow.passes.base import register_pass
from winnow.passes.checked import CheckedRewrite, CheckOptions
from winnow.passes.config import option
from winnow.passes.rewrite.fuse_rotary import fuse_rotary_tables

CONTRIB = "com.microsoft"


@register_pass
class FusePass(CheckedRewrite):
    """Fuse attention, normalization and activation patterns into ONNX Runtime contrib ops."""

    name = "fuse"
    description = ("Fuse attention, SkipLayerNorm, BiasGelu, RMSNorm, rotary embeddings into ORT "
                   "contrib ops (onnxscript ort_fusions); kept only when outputs match.")
    unchanged_report = {"fused": {}, "fusions": {}}
    fallible = True  # onnxscript raises many types on odd graphs

    @dataclass(frozen=True)
    class Config(CheckOptions):
        """Options of fuse."""

        attention: bool = option(True, "also fuse attention (Attention / MultiHeadAttention / "
                                 "GQA); false keeps to the norm and activation fusions, for CPUs "
                                 "where ORT's fused attention kernel is the slower one")
        rotary: bool = option(True, "also lower rotary embeddings over precomputed cos/sin "
                              "tables (half-split, checked) to RotaryEmbedding")

    def rewrite(self, model: ir.Model, feeds: list) -> dict | str:
        """Rotary embeddings over constant tables first (onnxscript's attention fusions read the
        RotaryEmbedding ops), then onnxscript's ORT fusions, then the attention masks the feeds
        prove to be padding masks indexed; the fused ops and how often each fusion applied."""
        attention = self.config.attention  # onnxscript's GQA fusion reads per-token positions
        tables = fuse_rotary_tables(model, attention) if self.config.rotary else 0
        counts = fuse_for_ort(model, self.config.attention)
        if tables:
            counts["rotary_embedding_tables"] = tables
        counts.update(index_attention_masks(model, feeds))
        fused = fused_ops(model)
        return {"fused": fused, "fusions": counts} if fused else "no pattern matched"


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

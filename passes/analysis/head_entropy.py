"""`head-entropy`: per attention head, the entropy of its attention distribution, normalised by
log(number of keys visible to the query) so causal and bidirectional models compare fairly.

For every real query position (padding queries are skipped) of every calibration sample, the
head's softmax row p gives H = -sum p log p (0 log 0 = 0) over the keys it can see; the keys a
query can see are those any head of the layer gives non-zero weight (masks and causality apply
to all heads alike, so padding keys and future positions drop out without knowing the mask
convention). H / log(visible) is 0 for a head that looks at one key and 1 for a uniform one;
queries that see a single key (the first token of a causal model) are skipped. The score is the
mean over queries. High entropy = the head averages broadly (a bag-of-tokens head).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.ir.activations import padding_mask
from winnow.ir.execute import run
from winnow.ir.regions import Region, find_regions
from winnow.passes.base import AnalysisPass, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext

NO_ATTENTION = ("no attention sub-layer with a Softmax was recognised, so there are no heads to "
                "score")


NONFINITE = "its attention probabilities hold NaN or Inf on the calibration data"
NO_QUERIES = ("no real query of the calibration data sees more than one key, so entropies of it "
              "say nothing")


def attention_softmaxes(regions: list[Region]) -> dict[str, ir.Value]:
    """The attention-probability value (Softmax output) of each attention region, by region name."""
    out = {}
    for region in regions:
        if region.kind != "attention":
            continue
        softmax = next((n for n in region.nodes if n.op_type == "Softmax"), None)
        if softmax is not None and softmax.outputs[0].name:
            out[region.name] = softmax.outputs[0]
    return out


def as_heads(probs: np.ndarray, batch: int, heads: int | None) -> np.ndarray | None:
    """Attention probabilities as [batch, heads, queries, keys], or None when the layout is not
    one of [b, h, q, k] or [b * h, q, k]."""
    if probs.ndim == 4 and (heads is None or probs.shape[1] == heads):
        return probs
    if probs.ndim == 3 and heads and probs.shape[0] == batch * heads:
        return probs.reshape(batch, heads, *probs.shape[1:])
    return None


def normalized_entropy(probs: np.ndarray, query_mask: np.ndarray | None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per head: the sum of normalised entropies over valid queries, and the number of them.

    `probs` is [batch, heads, queries, keys]; `query_mask` [batch, queries] (1 = real token).
    """
    p = np.asarray(probs, dtype=np.float64)
    visible = (p > 0).any(axis=1)  # [b, q, k]: keys any head of the layer attends to
    count = visible.sum(axis=-1)  # [b, q]
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = -plogp.sum(axis=-1)  # [b, h, q]
    valid = count > 1
    if query_mask is not None and query_mask.shape == valid.shape:
        valid &= query_mask.astype(bool)
    norm = entropy / np.log(np.maximum(count, 2))[:, None, :]
    sums = np.where(valid[:, None, :], norm, 0.0).sum(axis=(0, 2))
    return sums, np.full(p.shape[1], valid.sum(), dtype=np.int64)


@register_pass
class HeadEntropyPass(AnalysisPass):
    """Score every attention head by the normalised entropy of its attention distribution."""

    name = "head-entropy"
    description = ("normalised entropy of each attention head's distribution over visible keys "
                   "(real queries only; 1 = uniform, 0 = one key)")

    @dataclass(frozen=True)
    class Config:
        """Options of head-entropy."""

        samples: int = option(64, "calibration sequences/images used", min=1)

    def analyze(self, model: ir.Model) -> dict[str, Any]:
        """Entropy per head of every attention layer on the calibration data."""
        from winnow.passes.analysis.calibration import calibration_batches
        from winnow.passes.analysis.layer_similarity import limit_samples

        start = time.perf_counter()
        regions = [r for r in find_regions(model).sublayers() if r.kind == "attention"]
        softmaxes = attention_softmaxes(regions)
        if not softmaxes:
            return {"layers": [], "heads": {}, "note": NO_ATTENTION}
        batches = limit_samples(calibration_batches(model, PassContext.current()),
                                self.config.samples)
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, np.ndarray] = {}
        skipped: set[str] = set()
        unmeasured: dict[str, str] = {}
        for feeds in batches:
            captured = run(model, feeds, capture=[v.name for v in softmaxes.values()])
            mask = padding_mask(feeds)
            rows = next(iter(feeds.values())).shape[0]
            for region in regions:
                if region.name not in softmaxes:
                    continue
                heads = region.heads.num_heads if region.heads is not None else None
                probs = as_heads(captured[softmaxes[region.name].name], rows, heads)
                if probs is None:
                    skipped.add(region.name)
                    continue
                if not np.isfinite(probs).all():
                    unmeasured[region.name] = NONFINITE
                    continue
                s, c = normalized_entropy(probs, mask)
                sums[region.name] = sums.get(region.name, 0) + s
                counts[region.name] = counts.get(region.name, 0) + c
        unmeasured.update({name: NO_QUERIES for name, c in counts.items()
                           if name not in unmeasured and c[0] == 0})
        layers = [{"region": name, "num_heads": len(s),
                   "entropy": [float(v) for v in s / np.maximum(counts[name], 1)],
                   "queries": int(counts[name][0])}
                  for name, s in sums.items() if name not in unmeasured]
        result = {"layers": layers,
                  "heads": {f"{layer['region']}.head{i}": e for layer in layers
                            for i, e in enumerate(layer["entropy"])},
                  "not_measurable": unmeasured,
                  "samples": sum(next(iter(b.values())).shape[0] for b in batches),
                  "seconds": time.perf_counter() - start}
        if skipped:
            result["note"] = ("attention probabilities of " + ", ".join(sorted(skipped)) +
                              " are not laid out as [batch, heads, queries, keys]; not scored")
        return result

"""`layer-similarity`: how much each block and sub-layer changes the residual stream
(cos(X, Y) per token, ShortGPT's block influence 1 - cos, and the angular distance), and how well
a closed-form linear adapter stands in for it (`linear_cos`: cos(Y, adapter(X)), cross-fitted)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.ir.activations import iter_pairs, rowwise_cosine
from winnow.ir.linear_adapter import fit_adapter
from winnow.ir.regions import LEVELS, Region, RegionMap, find_regions
from winnow.passes.base import AnalysisPass, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext
from winnow.progress import bar

NO_BLOCKS = "no residual blocks were detected, so there is nothing to score"
MAX_FIT_VECTORS = 8192  # per region, for the linear-adapter score (CNN maps have many positions)


def limit_samples(batches: list[dict[str, np.ndarray]], samples: int) -> list[dict[str, np.ndarray]]:
    """Cut a list of batches (first axis = samples) down to at most `samples` samples."""
    out, left = [], samples
    for feeds in batches:
        if left <= 0:
            break
        n = min(left, next(iter(feeds.values())).shape[0])
        out.append({k: v[:n] for k, v in feeds.items()})
        left -= n
    return out


@register_pass
class LayerSimilarityPass(AnalysisPass):
    """Score every block and sub-layer by the similarity of its input and output streams."""

    name = "layer-similarity"
    description = ("Cosine of residual stream in vs out per block and sub-layer (What Matters in "
                   "Transformers / ShortGPT block influence); high cosine = redundant.")

    @dataclass(frozen=True)
    class Config:
        """Options of layer-similarity."""

        samples: int = option(64, "calibration sequences/images used", min=1)

    def analyze(self, model: ir.Model) -> dict[str, Any]:
        """Score every region on the calibration data."""
        from winnow.passes.analysis.calibration import calibration_batches

        start = time.perf_counter()
        regions = find_regions(model)
        if not regions.blocks:
            return {"regions": [], "ranking": {}, "ranking_linear": {}, "note": NO_BLOCKS}
        batches = limit_samples(calibration_batches(model, PassContext.current()), self.config.samples)
        scored = score_regions(model, regions.all(), batches)
        return {"regions": [scored[r.name] for r in regions.all()],
                "ranking": _rank(regions, scored, "cos"),
                "ranking_linear": _rank(regions, scored, "linear_cos"),
                "samples": sum(next(iter(b.values())).shape[0] for b in batches),
                "source": regions.source, "seconds": time.perf_counter() - start}


def _rank(regions: RegionMap, scored: dict[str, dict], key: str) -> dict[str, list[str]]:
    """Droppable regions per level, most redundant (highest `key`) first."""
    return {level: [r["name"] for r in sorted((scored[x.name] for x in regions.candidates(level)),
                                              key=lambda r: -r[key])]
            for level in LEVELS}


def score_regions(model: ir.Model, regions: list[Region], batches: list[dict]) -> dict[str, dict]:
    """cos / block influence / angular distance per region, averaged over all real tokens, and
    the cross-fitted linear-adapter cosine."""
    pairs = {r.name: (r.entry.name, r.exit.name) for r in regions}
    sums = {name: np.zeros(3) for name in pairs}
    kept: dict[tuple, list] = {pair: [] for pair in set(pairs.values())}
    rng = np.random.default_rng(0)
    for chunk in bar(iter_pairs(model, batches, list(kept)), "layer-similarity", total=len(batches)):
        for name, pair in pairs.items():
            cos = np.clip(rowwise_cosine(*chunk[pair]), -1.0, 1.0)
            sums[name] += [cos.sum(), (np.arccos(cos) / np.pi).sum(), cos.size]
        for pair in kept:
            kept[pair].append(_subsample(rng, *chunk[pair], MAX_FIT_VECTORS // len(batches) + 1))
    linear = {pair: linear_adapter_cosine(np.concatenate([x for x, _ in v]),
                                          np.concatenate([y for _, y in v]))
              for pair, v in kept.items()}
    out = {}
    for r in regions:
        total_cos, total_angle, count = sums[r.name]
        cos = total_cos / max(count, 1)
        out[r.name] = {"name": r.name, "kind": r.kind, "layout": r.layout, "cos": float(cos),
                       "block_influence": float(1.0 - cos),
                       "angular": float(total_angle / max(count, 1)), "vectors": int(count),
                       "linear_cos": linear[pairs[r.name]]}
    return out


def _subsample(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, rows: int) -> tuple:
    if len(x) <= rows:
        return x, y
    pick = np.sort(rng.choice(len(x), size=rows, replace=False))
    return x[pick], y[pick]


def linear_adapter_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Mean cos(Y, adapter(X)) with 2-fold cross-fitting (each half scored by the adapter fitted
    on the other), so a region is not flattered by an adapter that memorised its samples."""
    if len(x) < 4:
        return float("nan")
    halves = (slice(0, len(x) // 2), slice(len(x) // 2, None))
    cos = []
    for fit, test in (halves, halves[::-1]):
        adapter = fit_adapter(x[fit], y[fit])
        cos.append(rowwise_cosine(adapter.apply(x[test]), y[test]))
    return float(np.clip(np.concatenate(cos), -1.0, 1.0).mean())

"""`layer-similarity`: how much each block and sub-layer changes the residual stream
(cos(X, Y) per token, ShortGPT's block influence 1 - cos, and the angular distance), and how well
a closed-form linear adapter stands in for it (`linear_cos`: cos(Y, adapter(X)), cross-fitted)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.ir.activations import Degeneracy, iter_pairs, rowwise_cosine
from winnow.ir.execute import LARGE_MODEL_BYTES, weight_bytes
from winnow.ir.linear_adapter import fit_and_apply
from winnow.ir.regions import LEVELS, Region, RegionMap, find_regions
from winnow.passes.base import AnalysisPass, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext
from winnow.progress import counter

NO_BLOCKS = "no residual blocks were detected, so there is nothing to score"
NO_SHORTCUT = ("both sides of its residual Add carry weights alike, so there is no shortcut to "
               "measure it against")
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
        result = {"regions": [scored[r.name] for r in regions.all()],
                  "ranking": _rank(regions, scored, "cos"),
                  "ranking_linear": _rank(regions, scored, "linear_cos"),
                  "not_measurable": {n: r["reason"] for n, r in scored.items() if not r["measurable"]},
                  "samples": sum(next(iter(b.values())).shape[0] for b in batches),
                  "source": regions.source, "seconds": time.perf_counter() - start}
        if len(result["not_measurable"]) == len(scored):
            name, reason = next(iter(result["not_measurable"].items()))
            result["note"] = (f"none of the {len(scored)} regions is measurable on the calibration "
                              f"data (e.g. {name}: {reason}), so nothing is ranked")
        return result


def _rank(regions: RegionMap, scored: dict[str, dict], key: str) -> dict[str, list[str]]:
    """Droppable, measurable regions per level, most redundant (highest `key`) first."""
    def score(row: dict) -> float:
        value = row[key]
        return -value if value is not None and np.isfinite(value) else np.inf

    return {level: [r["name"] for r in sorted((scored[x.name] for x in regions.candidates(level)
                                               if scored[x.name]["measurable"]), key=score)]
            for level in LEVELS}


def score_regions(model: ir.Model, regions: list[Region], batches: list[dict]) -> dict[str, dict]:
    """cos / block influence / angular distance per region, averaged over all real tokens, and
    the cross-fitted linear-adapter cosine. X is what is left when the residual branch is
    removed: the entry for an identity skip, the shortcut's output for a projection shortcut
    (ResNet downsampling), so a projection block is measured through its projection. A region
    whose X or Y is degenerate on the data (NaN, (near) zero, constant) gets `measurable: False`
    and a `reason` instead of scores. A large model's regions are measured a group at a time
    (see `pair_groups`), so the vectors held at once stay within ACTIVATION_BUDGET."""
    pairs = {r.name: (r.skip.name, r.exit.name) for r in regions if r.skip is not None}
    live = sorted(set(pairs.values()))
    groups = pair_groups(model, batches, live)
    ticks = counter("layer-similarity", len(groups) * len(batches))
    measured: dict[tuple, dict] = {}
    try:
        for group in groups:
            measured.update(_measure_pairs(model, batches, group, ticks))
    finally:
        ticks.close()
    out = {}
    for r in regions:
        pair = pairs.get(r.name)
        base = {"name": r.name, "kind": r.kind, "layout": r.layout,
                "measured_from": "entry" if r.identity_skip else "shortcut"}
        m = measured.get(pair, {"problem": NO_SHORTCUT, "sums": np.zeros(3)})
        total_cos, total_angle, count = m["sums"]
        if m["problem"] is not None:
            out[r.name] = {**base, "measurable": False, "reason": m["problem"], "cos": None,
                           "block_influence": None, "angular": None, "linear_cos": None,
                           "vectors": int(count)}
            continue
        cos = total_cos / max(count, 1)
        out[r.name] = {**base, "measurable": True, "cos": float(cos),
                       "block_influence": float(1.0 - cos),
                       "angular": float(total_angle / max(count, 1)), "vectors": int(count),
                       "linear_cos": m["linear_cos"]}
    return out


def _measure_pairs(model: ir.Model, batches: list[dict], live: list[tuple],
                   ticks: Any) -> dict[tuple, dict]:
    """One pass over the batches capturing the (skip, exit) pairs `live`: per pair the sums of
    cos, angle and count, why it is not measurable (or None) and its linear-adapter cosine."""
    sums = {pair: np.zeros(3) for pair in live}
    watch = {pair: Degeneracy() for pair in live}
    widths: dict[tuple, tuple[int, int]] = {}
    kept: dict[tuple, list] = {pair: [] for pair in live}
    rng = np.random.default_rng(0)
    for chunk in iter_pairs(model, batches, live):
        ticks.update(1)
        for pair in live:
            x, y = chunk[pair]
            if x.shape != y.shape:
                widths[pair] = (x.shape[-1], y.shape[-1])
                continue
            watch[pair].update(x, y)
            kept[pair].append(_subsample(rng, x, y, MAX_FIT_VECTORS // len(batches) + 1))
            with np.errstate(invalid="ignore"):
                cos = np.clip(rowwise_cosine(x, y), -1.0, 1.0)
            sums[pair] += [cos.sum(), (np.arccos(cos) / np.pi).sum(), cos.size]
        del chunk
    out = {}
    for pair in live:
        sample = (np.concatenate([x for x, _ in kept[pair]]),
                  np.concatenate([y for _, y in kept[pair]])) if kept[pair] else None
        kept[pair] = []
        problem = _problem(watch[pair], widths.get(pair), pair, sample)
        out[pair] = {"sums": sums[pair], "problem": problem,
                     "linear_cos": linear_adapter_cosine(*sample) if problem is None else None}
    return out


ACTIVATION_BUDGET = 1024**3  # bytes of captured vectors one pass over a large model's data holds


def pair_groups(model: ir.Model, batches: list[dict], live: list[tuple]) -> list[list[tuple]]:
    """`live` cut into groups, each measured in its own pass over the batches: one group for a
    model of at most LARGE_MODEL_BYTES of weights; for a larger one, as many pairs per group as
    fit ACTIVATION_BUDGET, judged by the vectors of the first pair on the first batch (the
    batch's float64 X and Y and ONNX Runtime's outputs, and the rows kept for the adapter fit)."""
    if len(live) <= 1 or not batches or weight_bytes(model) <= LARGE_MODEL_BYTES:
        return [live]
    x, y = next(iter_pairs(model, batches[:1], live[:1]))[live[0]]
    kept_rows = min(MAX_FIT_VECTORS + len(batches), len(x) * len(batches))
    per_pair = 1.5 * (x.nbytes + y.nbytes) + kept_rows * (x.shape[1] + y.shape[1]) * 8
    size = max(1, int(ACTIVATION_BUDGET // max(per_pair, 1)))
    return [live[i:i + size] for i in range(0, len(live), size)]


def _problem(watch: Degeneracy, widths: tuple[int, int] | None, pair: tuple,
             sample: tuple | None) -> str | None:
    """Why a (skip, exit) pair cannot be scored, or None."""
    if widths is not None:
        return (f"its input '{pair[0]}' ({widths[0]} wide) and output '{pair[1]}' ({widths[1]} "
                "wide) differ in shape")
    return watch.reason(sample)


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
        cos.append(rowwise_cosine(fit_and_apply(x[fit], y[fit], x[test]), y[test]))
    return float(np.clip(np.concatenate(cos), -1.0, 1.0).mean())

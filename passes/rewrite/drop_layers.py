"""`drop-layers`: remove residual blocks or sub-layers (by name, by layer-similarity, or by
das-skip), replacing each by the identity, a closed-form linear adapter, or a linear adapter
with a context term (the mean over the sequence / spatial positions, masked and causal as the
model is)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from winnow.errors import PassConfigError
from winnow.ir.activations import as_vectors, padding_mask
from winnow.ir.execute import run
from winnow.ir.linear_adapter import (ContextSpec, context_of, context_spec, fit_adapter,
                                      insert_adapter, insert_after_value)
from winnow.ir.regions import LEVELS, Region, RegionMap, find_regions
from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext



REPLACED_BY = {"identity": "identity", "linear": "linear adapters", "context": "context adapters"}


@register_pass
class DropLayersPass(Pass):
    """Remove whole residual regions; lossy, so its fidelity is judged by the evaluator."""

    name = "drop-layers"
    description = ("Drop residual blocks/sub-layers chosen by name, layer-similarity or das-skip; "
                   "replace each by identity or a ridge-fitted linear adapter.")
    lossless = False

    @dataclass(frozen=True)
    class Config:
        """Options of drop-layers."""

        regions: tuple[str, ...] = option((), "names of the regions to drop (overrides count)")
        count: int = option(0, "how many regions to drop, chosen by `source`", min=0)
        source: str = option("layer-similarity", "analysis that ranks regions",
                             choices=("layer-similarity", "das-skip"))
        level: str = option("block", "which regions are candidates", choices=LEVELS)
        replacement: str = option("identity", "what replaces a dropped region: its entry, entry + "
                                  "x W + b, or entry + x W + mean(x) V + b (context)",
                                  choices=("identity", "linear", "context"))
        rank: int = option(0, "rank of the linear adapter (0 = full)", min=0)
        ridge: float = option(1e-2, "ridge strength of the adapter fit (relative)", min=0.0)
        samples: int = option(1024, "calibration samples used to fit adapters", min=1)

    def call(self, model: ir.Model) -> PassResult:
        """Drop the chosen regions in place."""
        ctx = PassContext.current()
        region_map = find_regions(model)
        if not region_map.blocks:
            ctx.report[self.name] = {"dropped": [], "note": "no residual blocks were detected; "
                                     "nothing was rewritten"}
            return PassResult(model, False)
        chosen = self._choose(model, region_map, ctx)
        if not chosen:
            ctx.report[self.name] = {"dropped": [], "note": "no regions were asked for (give "
                                     "regions=[...] or count=N)"}
            return PassResult(model, False)
        fits, replaced = {}, {}
        batches = self._batches(model, ctx) if self.config.replacement != "identity" else []
        # Targets come from the original model; inputs from the model as rewritten so far
        # (regions in network order), so each adapter also corrects the error upstream of it.
        ordered = sorted(chosen, key=lambda r: _position(model, r))
        targets = _collect(model, batches, [r.exit.name for r in chosen])[0] if batches else {}
        spec = (context_spec(model, ordered[0].entry, batches[0])
                if batches and self.config.replacement == "context" else None)
        for region in ordered:
            entry = replaced.get(id(region.entry), region.entry)
            if batches:
                x, context = _collect(model, batches, [entry.name], spec)
                fits[region.name] = fit_adapter(x[entry.name], targets[region.exit.name],
                                                self.config.ridge, self.config.rank,
                                                None if context is None else context[entry.name], spec)
            replaced[id(region.exit)] = _replace_region(model.graph, region, entry,
                                                        fits.get(region.name))
        RemoveUnusedNodesPass()(model)
        names = [r.name for r in chosen]
        ctx.report[self.name] = {"dropped": names, "count": len(names),
                                 "replacement": self.config.replacement,
                                 "chosen_by": self._chosen_by(),
                                 "adapter_r2": {n: f.r2 for n, f in fits.items()},
                                 "summary": f"removed {', '.join(names)} "
                                            f"({REPLACED_BY[self.config.replacement]})"}
        return PassResult(model, True)

    def _chosen_by(self) -> str:
        if self.config.regions:
            return "named in the regions option"
        if self.config.source == "das-skip":
            return f"das-skip ranking (top {self.config.count}, level {self.config.level})"
        key = "cos" if self.config.replacement == "identity" else "linear_cos"
        return (f"layer-similarity ranking by {key} (top {self.config.count}, level "
                f"{self.config.level})")

    def _choose(self, model: ir.Model, region_map: RegionMap, ctx: PassContext) -> list[Region]:
        candidates = region_map.candidates(self.config.level)
        if self.config.regions:
            return [_lookup(region_map, name) for name in self.config.regions]
        if self.config.count == 0:
            return []
        if self.config.count > len(candidates):
            raise PassConfigError(
                f"drop-layers count={self.config.count} is more than the {len(candidates)} "
                f"droppable {self.config.level} regions: {', '.join(r.name for r in candidates)}.")
        ranking, unmeasured = _ranking(self.config, model, ctx)
        by_name = {r.name: r for r in candidates}
        chosen = [by_name[n] for n in ranking if n in by_name][: self.config.count]
        if len(chosen) < self.config.count:
            unmeasured = {n: reason for n, reason in unmeasured.items() if n in by_name}
            example = next(iter(unmeasured.items()), None)
            why = f" (e.g. {example[0]}: {example[1]})" if example else ""
            raise PassConfigError(
                f"drop-layers count={self.config.count}: {self.config.source} could rank only "
                f"{len(chosen)} of the {len(candidates)} droppable {self.config.level} regions; "
                f"{len(unmeasured)} are not measurable on the calibration data{why}. Lower count"
                + (" or name regions=[...]." if self.config.source == "das-skip" else
                   ", name regions=[...], or use source=das-skip, which judges the outputs."))
        return chosen

    def _batches(self, model: ir.Model, ctx: PassContext) -> list[dict]:
        from winnow.passes.analysis.calibration import calibration_batches
        from winnow.passes.analysis.layer_similarity import limit_samples

        return limit_samples(calibration_batches(model, ctx), self.config.samples)


def _collect(model: ir.Model, batches: list[dict], names: list[str],
             spec: ContextSpec | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Vectors (padding dropped) of the named values over all batches, and with `spec` the
    vectors of their context means."""
    values: dict[str, list] = {n: [] for n in names}
    contexts: dict[str, list] = {n: [] for n in names}
    for feeds in batches:
        captured = run(model, feeds, capture=names)
        mask = padding_mask(feeds)
        for name in names:
            values[name].append(as_vectors(captured[name], mask))
            if spec is not None:
                contexts[name].append(as_vectors(context_of(captured[name], spec, feeds), mask))
    stacked = {n: np.concatenate(v) for n, v in values.items()}
    return stacked, ({n: np.concatenate(v) for n, v in contexts.items()} if spec else None)


def _lookup(region_map: RegionMap, name: str) -> Region:
    try:
        region = region_map.get(name)
    except KeyError:
        valid = ", ".join(r.name for r in region_map.all() if r.droppable)
        raise PassConfigError(
            f"drop-layers: there is no region named '{name}'; droppable regions are: {valid}.") from None
    if not region.droppable:
        raise PassConfigError(f"drop-layers: region '{name}' has a projection shortcut (its output "
                              "shape differs from its input) and cannot be dropped.")
    return region


def _ranking(cfg: Any, model: ir.Model, ctx: PassContext) -> tuple[list[str], dict[str, str]]:
    """Candidates, most droppable first, judged for the replacement that will stand in for them;
    and the regions the analysis could not measure, with the reason."""
    if cfg.source == "das-skip":
        result = ctx.get_analysis("das-skip", model, level=cfg.level, k=cfg.count,
                                  replacement="identity" if cfg.replacement == "identity" else "linear")
        return list(result.get("ranking", [])), dict(result.get("not_measurable") or {})
    result = ctx.get_analysis("layer-similarity", model)
    key = "ranking" if cfg.replacement == "identity" else "ranking_linear"
    unmeasured = {r["name"]: r.get("reason", "") for r in result.get("regions", [])
                  if r.get("measurable") is False}
    return list(result.get(key, {}).get(cfg.level, [])), unmeasured


def _position(model: ir.Model, region: Region) -> int:
    return next(i for i, node in enumerate(model.graph) if node is region.add)


def _replace_region(graph: ir.Graph, region: Region, entry: ir.Value, adapter: Any) -> ir.Value:
    """Route every use of the region's exit to `entry` (or entry + adapter); returns the new value."""
    new = insert_adapter(graph, entry, adapter, f"winnow.adapter.{region.name}") \
        if adapter is not None else entry
    exit_value = region.exit
    outputs = [i for i, v in enumerate(graph.outputs) if v is exit_value]
    for index in outputs:
        keep = ir.node("Identity", [new], name=f"winnow.dropped.{region.name}")
        insert_after_value(graph, new, [keep])
        name = exit_value.name
        exit_value.name = f"{name}.dropped"
        keep.outputs[0].name = name
        keep.outputs[0].dtype, keep.outputs[0].shape = exit_value.dtype, exit_value.shape
        graph.outputs[index] = keep.outputs[0]
    exit_value.replace_all_uses_with(new)  # after the outputs: onnx-ir refuses to move those
    return new

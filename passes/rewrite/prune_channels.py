"""`prune-channels`: remove MLP intermediate channels structurally (the up / gate projections'
output columns and biases, the down projection's input rows) and conv filters with their
dependency groups (`ir/conv_groups.py`: writers, BatchNorms, depthwise convs, residual partners,
SE gates and readers pruned together), the lowest `channel-importance` scores first, in every MLP
and group or the named ones; `round_to` keeps the kept width a multiple of 8 or 16; optionally
refit in closed form on calibration activations each MLP down projection and each Conv / Gemm
that reads pruned conv channels (`ir/conv_refit.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from winnow.errors import PassConfigError
from winnow.ir.conv_groups import ChannelGroup, prune_groups
from winnow.ir.conv_refit import capture_targets, refit_readers, refittable
from winnow.ir.pruning import MlpChannels, projection_output, prune_channels, refit_linear, \
    set_projection
from winnow.passes.analysis.channel_importance import shaped_channel_groups, traced_mlps
from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext
from winnow.passes.rewrite.prune_heads import _vectors, check_ratio


def kept_width(width: int, ratio: float, round_to: int) -> int:
    """Channels kept when `ratio` of `width` go, rounded up to a multiple of `round_to`."""
    keep = max(1, width - round(ratio * width))
    keep = -(-keep // round_to) * round_to
    return min(keep, width)


@register_pass
class PruneChannelsPass(Pass):
    """Remove MLP intermediate channels and conv filter groups structurally; lossy, judged by the
    evaluator."""

    name = "prune-channels"
    description = ("remove MLP intermediate channels and conv filter groups (lowest "
                   "channel-importance first) with every weight coupled to them; round_to 8/16; "
                   "optional MLP down-projection refit")
    lossless = False

    @dataclass(frozen=True)
    class Config:
        """Options of prune-channels."""

        ratio: float = option(0.0, "fraction of each MLP's intermediate channels to remove, in "
                              "[0, 1)")
        scope: str = option("layer", "MLP channels: remove ratio of every MLP's, or ratio of all "
                            "of them at once, the lowest scores wherever they are (every MLP "
                            "keeps at least round_to)", choices=("layer", "global"))
        regions: tuple[str, ...] = option((), "MLP sub-layers or conv groups to prune (default: "
                                          "every one)")
        kind: str = option("all", "what to prune: MLP channels, conv filter groups or both",
                           choices=("all", "mlp", "conv"))
        source: str = option("activation", "what ranks channels: channel-importance's activation "
                             "or weight score, or random", choices=("activation", "weight", "random"))
        seed: int = option(0, "seed of source=random")
        round_to: int = option(1, "keep a multiple of this many channels", choices=(1, 8, 16))
        refit: bool = option(False, "refit each MLP down projection and each conv/Gemm reading "
                             "pruned conv channels by ridge least squares on calibration "
                             "activations")
        samples: int = option(256, "calibration samples for the refit", min=1)
        ridge: float = option(1e-3, "ridge strength of the refit (relative)", min=0.0)

        def __post_init__(self) -> None:
            check_ratio(self.ratio, "prune-channels")

    def call(self, model: ir.Model) -> PassResult:
        """Remove the lowest-scored channels of the chosen MLPs and conv groups in place."""
        ctx = PassContext.current()
        mlps, notes = traced_mlps(model) if self.config.kind != "conv" else ([], [])
        groups = [g for g in shaped_channel_groups(model) if g.prunable] \
            if self.config.kind != "mlp" else []
        mlps, groups = self._chosen(mlps, groups)
        if not (mlps or groups) or self.config.ratio == 0.0:
            ctx.report[self.name] = {"pruned": {}, "note": "; ".join(notes) or (
                "no channels were asked for (give ratio>0)" if mlps or groups else
                "no MLP with traceable channels and no prunable conv filter group was found; "
                "nothing was rewritten")}
            return PassResult(model, False)
        conv_report, conv_r2 = self._prune_convs(model, groups, ctx) if groups else ({}, {})
        if not mlps:
            ctx.report[self.name] = {"pruned": conv_report,
                                     **({"refit_r2": conv_r2} if conv_r2 else {})}
            return PassResult(model, True)
        scores = self._scores(model, mlps, ctx)
        counts = kept_counts(mlps, scores, self.config.ratio, self.config.round_to,
                             self.config.scope)
        keeps = {}
        for mlp in mlps:
            keeps[mlp.region.name] = np.sort(np.argsort(-scores[mlp.region.name],
                                                        kind="stable")[:counts[mlp.region.name]])
        batches = self._batches(model, ctx) if self.config.refit else []
        targets = _vectors(model, batches, [projection_output(m.down).name for m in mlps]) \
            if batches else {}
        report = {"pruned": {**conv_report, **{m.region.name: [m.width, int(keeps[m.region.name].size)]
                                               for m in mlps}}}
        copy = model.clone()  # rehearsed on a copy: a failure leaves the model untouched
        trial = {m.region.name: m for m in traced_mlps(copy)[0]}
        for name, keep in keeps.items():
            prune_channels(copy.graph, trial[name], keep)
        for mlp in mlps:
            prune_channels(model.graph, mlp, keeps[mlp.region.name])
        RemoveUnusedNodesPass()(model)
        if batches:
            report["refit_r2"] = {m.region.name: _refit_down(model, m, targets, batches,
                                                             self.config.ridge) for m in mlps}
        if conv_r2:
            report["refit_r2"] = {**report.get("refit_r2", {}), **conv_r2}
        ctx.report[self.name] = report
        return PassResult(model, True)

    def _chosen(self, mlps: list[MlpChannels], groups: list[ChannelGroup]
                ) -> tuple[list[MlpChannels], list[ChannelGroup]]:
        if not self.config.regions:
            return mlps, groups
        valid = [m.region.name for m in mlps] + [g.name for g in groups]
        for name in self.config.regions:
            if name not in valid:
                raise PassConfigError(f"prune-channels: there is no prunable MLP or conv group "
                                      f"named '{name}'; they are: {', '.join(valid) or 'none'}.")
        wanted = set(self.config.regions)
        return ([m for m in mlps if m.region.name in wanted],
                [g for g in groups if g.name in wanted])

    def _prune_convs(self, model: ir.Model, groups: list[ChannelGroup], ctx: PassContext
                     ) -> tuple[dict[str, list[int]], dict[str, float]]:
        """Prune each conv filter group to its highest-scored channels (refitting the readers
        with `refit`); ({group: [before, after]}, {reader: refit R^2})."""
        if self.config.source == "random":
            rng = np.random.default_rng(self.config.seed)
            scores = {g.name: rng.random(g.channels) for g in groups}
        else:
            result = ctx.get_analysis("channel-importance", model, score=self.config.source)
            scores = {e["group"]: np.asarray(e["scores"]) for e in result.get("conv_groups", [])
                      if e.get("scores") is not None}
        keeps = {}
        for group in groups:  # every choice is made before the first edit
            count = kept_width(group.channels, self.config.ratio, self.config.round_to)
            if group.name not in scores or len(scores[group.name]) != group.channels:
                raise PassConfigError(f"prune-channels: channel-importance has no scores for conv "
                                      f"group '{group.name}'.")
            keeps[group.name] = np.sort(np.argsort(-scores[group.name], kind="stable")[:count])
        readers = list({m.node: None for g in groups for m, _, _ in g.readers()
                        if refittable(m.node)}) if self.config.refit else []
        batches = self._batches(model, ctx) if readers else []
        targets = capture_targets(model, readers, batches) if readers else []
        kept = prune_groups([(g, keeps[g.name]) for g in groups], model.graph)
        r2 = refit_readers(model, targets, batches, self.config.ridge, kept) if targets else {}
        return {g.name: [g.channels, int(keeps[g.name].size)] for g in groups}, r2

    def _scores(self, model: ir.Model, mlps: list[MlpChannels], ctx: PassContext
                ) -> dict[str, np.ndarray]:
        if self.config.source == "random":
            rng = np.random.default_rng(self.config.seed)
            return {m.region.name: rng.random(m.width) for m in mlps}
        result = ctx.get_analysis("channel-importance", model, score=self.config.source)
        chosen = {m.region.name for m in mlps}
        for layer in result["layers"]:
            if layer["region"] in chosen and layer.get("measurable") is False:
                raise PassConfigError(
                    f"prune-channels: channel-importance cannot rank the channels of "
                    f"'{layer['region']}' ({layer['reason']}); leave it out with regions=[...] "
                    "or rank by source=weight.")
        return {layer["region"]: np.asarray(layer["scores"]) for layer in result["layers"]}

    def _batches(self, model: ir.Model, ctx: PassContext) -> list[dict]:
        from winnow.passes.analysis.calibration import calibration_batches
        from winnow.passes.analysis.layer_similarity import limit_samples

        return limit_samples(calibration_batches(model, ctx), self.config.samples)


def kept_counts(mlps: list[MlpChannels], scores: dict[str, np.ndarray], ratio: float,
                round_to: int, scope: str) -> dict[str, int]:
    """How many channels each MLP keeps: `ratio` of each (scope 'layer'), or `ratio` of all
    channels with the lowest scores going first wherever they are (scope 'global'; each MLP's
    count then rounded up to a multiple of `round_to`, at least `round_to`)."""
    if scope == "layer":
        return {m.region.name: kept_width(m.width, ratio, round_to) for m in mlps}
    owner = np.concatenate([np.full(m.width, i) for i, m in enumerate(mlps)])
    order = np.argsort(np.concatenate([scores[m.region.name] for m in mlps]), kind="stable")
    removed = np.bincount(owner[order[:round(ratio * owner.size)]], minlength=len(mlps))
    return {m.region.name: kept_width(m.width, gone / m.width, round_to)
            for m, gone in zip(mlps, removed)}


def _refit_down(model: ir.Model, mlp: MlpChannels, targets: dict[str, np.ndarray],
                batches: list[dict], ridge: float) -> float:
    """Refit one down projection on the pruned model's activations (earlier MLPs already
    refitted, so each fit also absorbs the error before it); returns the fit's R^2."""
    x_name = mlp.down.inputs[0].name
    y = targets[projection_output(mlp.down).name]
    x = _vectors(model, batches, [x_name])[x_name]
    weight, bias = refit_linear(x, y, ridge)
    resid = y - x @ weight - bias
    set_projection(model.graph, mlp.down, weight, bias)
    return 1.0 - float((resid**2).sum() / max(((y - y.mean(0))**2).sum(), 1e-12))

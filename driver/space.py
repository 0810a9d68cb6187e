"""The search space: the moves the registered passes offer, suggested per Optuna trial, and the
pipeline text a set of choices turns into (lossless clean-up first, then depth, width, fusion,
numerics, in the order the passes need)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir

from winnow.ir.regions import find_regions
from winnow.passes.base import registered_passes
from winnow.passes.config import config_fields
from winnow.passes.manager import DEFAULT_PIPELINE

REPLACEMENTS = ("identity", "linear", "context")
# Outlier channels of int8-dynamic activations kept in float: everywhere, or only where the mask
# folds into the Gelu making them (no extra pass at run time; being free, a lower threshold).
OUTLIER_SPLITS = {"float": "split-outliers",
                  "float-free": "split-outliers{free_only=true,factor=4}"}
RATIOS = (0.0, 0.25, 0.5)
MAX_DROPPED = 3


@dataclasses.dataclass(frozen=True)
class Space:
    """What can be searched on one model: drop counts per region level, and which width,
    fusion and quantization passes exist with which modes."""

    drop_levels: dict[str, int]
    width: tuple[str, ...]
    fuse: bool
    quant_modes: tuple[str, ...]
    replacements: tuple[str, ...] = REPLACEMENTS
    quant_auto_exclude: bool = False
    split_outliers: bool = False
    refit: bool = True  # width moves refit what reads the pruned heads / channels

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (for the manifest and the study's attributes)."""
        return dataclasses.asdict(self)


def build_space(model: ir.Model, fitted: bool = True) -> Space:
    """The moves available on `model` with the passes registered in this process; without
    `fitted` (no data to judge a fit on but the data it was fitted on) only moves that fit
    nothing to data: identity drops, fusion, data-free quantization."""
    passes = registered_passes()
    regions = find_regions(model)
    counts = {level: len(regions.candidates(level)) for level in ("block", "attention", "mlp")}
    levels = {k: min(MAX_DROPPED, n - 1) for k, n in counts.items() if n >= 2}
    width = tuple(name for name in ("prune-heads", "prune-channels")
                  if name in passes and _prunable(name, model, regions))
    modes = tuple(m for m in _quant_modes(passes) if _has_weights(model, m))
    auto = fitted and "exclude" in _option_names(passes.get("quantize"))
    split = fitted and "split-outliers" in passes
    if not fitted:
        modes = tuple(m for m in modes if "static" not in m)
        return Space(levels, width, "fuse" in passes, modes, ("identity",), auto, split, False)
    return Space(levels, width, "fuse" in passes, modes, REPLACEMENTS, auto, split)


def _prunable(name: str, model: ir.Model, regions: Any) -> bool:
    """Whether the width pass `name` finds anything to prune (a trial that cannot apply is lost)."""
    from winnow.ir.conv_groups import channel_groups
    from winnow.ir.pruning import prunable_attention
    from winnow.passes.analysis.channel_importance import traced_mlps

    if name == "prune-heads":
        return bool(prunable_attention(regions))
    return bool(traced_mlps(model)[0]) or any(g.prunable for g in channel_groups(model))


def _has_weights(model: ir.Model, mode: str) -> bool:
    """Whether quantize mode `mode` finds an op with a constant weight to quantize."""
    from winnow.ir.pruning import const_array
    from winnow.passes.rewrite.quantize import OP_TYPES

    ops = set(OP_TYPES.get(mode, ()))
    return not ops or any(n.op_type in ops and len(n.inputs) > 1
                          and const_array(n.inputs[1]) is not None for n in model.graph)


def _option_names(cls: Any) -> set[str]:
    return {f["name"] for f in config_fields(cls.Config)} if cls is not None else set()


def _quant_modes(passes: Mapping[str, Any]) -> tuple[str, ...]:
    if "quantize" not in passes:
        return ()
    for field in config_fields(passes["quantize"].Config):
        if field["name"] == "mode" and field["choices"]:
            return tuple(field["choices"])
    return ()


def suggest(trial: Any, space: Space) -> dict[str, Any]:
    """Choices for one Optuna trial (conditional: a replacement only when something is dropped)."""
    choices: dict[str, Any] = {}
    if space.drop_levels:
        level = trial.suggest_categorical("drop.level", sorted(space.drop_levels))
        count = trial.suggest_int("drop.count", 0, max(space.drop_levels.values()))
        count = min(count, space.drop_levels[level])
        if count:
            choices["drop"] = {"level": level, "count": count,
                               "replacement": trial.suggest_categorical("drop.replacement",
                                                                        space.replacements)}
    for name in space.width:
        ratio = trial.suggest_categorical(f"{name}.ratio", RATIOS)
        if ratio:
            choices[name] = {"ratio": ratio, "refit": space.refit}
    mode = "none"
    if space.quant_modes:
        mode = trial.suggest_categorical("quantize.mode", ("none", *space.quant_modes))
        if mode != "none":
            choices["quantize"] = {"mode": mode}
            if mode.startswith("int8") and space.quant_auto_exclude:
                choices["quantize"]["exclude"] = trial.suggest_categorical(
                    "quantize.exclude", ("none", "auto"))
            if mode == "int8-dynamic" and space.split_outliers:
                choices["quantize"]["outliers"] = trial.suggest_categorical(
                    "quantize.outliers", ("float", "float-free", "int8"))
    # Fusion with any number format: fuse hands Attention the padding mask, so int8 makes
    # QAttention of it (fuse + int8 measured faster than int8 alone on MiniLM at 8 threads,
    # about even at 2); fp16 and int4 keep the fused ops in float.
    if space.fuse and trial.suggest_categorical("fuse", (False, True)):
        choices["fuse"] = {}
    return choices


def pipeline_text(choices: Mapping[str, Any]) -> str:
    """The pipeline that applies `choices` after the lossless default pipeline."""
    parts = [DEFAULT_PIPELINE]
    if "drop" in choices:
        d = choices["drop"]
        parts.append(f"drop-layers{{count={d['count']},level={d['level']},"
                     f"replacement={d['replacement']}}}")
    for name in ("prune-heads", "prune-channels"):
        if name in choices:
            # Head scores are measured once on the source; after a drop the regions changed, so
            # the cheap output-norm proxy ranks heads instead of re-measuring every trial.
            source = ",source=proxy" if name == "prune-heads" and "drop" in choices else ""
            # Refit what reads the pruned heads / channels: on CNNs it is the difference between
            # unusable and lossless (digits-cnn, half its filters: accuracy -30 points without,
            # +0.3 with); round_to keeps kernels SIMD-friendly.
            refit = ",refit=true" if choices[name].get("refit") else ""
            extra = ",round_to=8" if name == "prune-channels" else ""
            parts.append(f"{name}{{ratio={choices[name]['ratio']}{source}{refit}{extra}}}")
    if any(k in choices for k in ("drop", "prune-heads", "prune-channels")):
        parts.append("dce")
    if "fuse" in choices:
        parts.append("fuse")
    if "quantize" in choices:
        q = choices["quantize"]
        exclude = ",exclude=[auto]" if q.get("exclude") == "auto" else ""
        if q.get("outliers") in OUTLIER_SPLITS:
            parts.append(OUTLIER_SPLITS[q["outliers"]])
        parts.append(f"quantize{{mode={q['mode']}{exclude}}}")
    return ",".join(parts)


def seed_plans(space: Space) -> list[dict[str, Any]]:
    """Plans tried first (Optuna enqueued trials): nothing, each single move at its mildest."""
    base: dict[str, Any] = {}
    if space.drop_levels:
        base.update({"drop.level": sorted(space.drop_levels)[0], "drop.count": 0})
    base.update({f"{name}.ratio": 0.0 for name in space.width})
    if space.fuse:
        base["fuse"] = False
    if space.quant_modes:
        base["quantize.mode"] = "none"
    plans = [dict(base)]
    quant = []
    for mode in space.quant_modes:
        plan = dict(base, **{"quantize.mode": mode})
        if mode.startswith("int8") and space.quant_auto_exclude:
            plan["quantize.exclude"] = "none"
        if mode == "int8-dynamic" and space.split_outliers:
            quant += [dict(plan, **{"quantize.outliers": o}) for o in ("int8", "float-free", "float")]
        else:
            quant.append(plan)
    # Most promising first (the time budget may end the seeds): int8 dynamic, then one drop per
    # level, a quarter of the heads / channels, fusion, and the other number formats.
    dynamic = [p for p in quant if p["quantize.mode"] == "int8-dynamic"]
    plans += dynamic
    if space.fuse:
        plans += [dict(p, fuse=True) for p in dynamic]
    for level in sorted(space.drop_levels):
        plans.append(dict(base, **{"drop.level": level, "drop.count": 1,
                                   "drop.replacement": space.replacements[-1]}))
    plans += [dict(base, **{f"{name}.ratio": RATIOS[1]}) for name in space.width]
    if space.fuse:
        plans.append(dict(base, fuse=True))
    plans += [p for p in quant if p not in dynamic]
    return plans

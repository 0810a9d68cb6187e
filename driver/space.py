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
# Distillation after structural moves: bounded in time so one trial stays a trial; the held-back
# check inside the pass keeps the input weights when training does not help. A small model
# trains on its whole train split and waits out a few noisy checks before halving the rate.
DISTILL = "distill{steps=2000,lr=0.001,max_seconds=60,samples=2048,patience=5}"
STRUCTURAL = ("drop", "prune-heads", "prune-channels")
# After whole blocks, one more sub-layer of those left may go ("drop.extra"): at batch 1 a small
# model's time follows its op count, and an attention sub-layer is most of a block's ops
# (digits-vit: 2 blocks + 1 attention, distilled, int8: 2.6x at b1 where 2 blocks give 2.0x).
SUBLAYER_LEVELS = ("attention", "mlp")
MAX_DROPPED = 3
# int8 modes searched with one weight scale per output channel or one per tensor: per tensor was
# the more faithful on tiny-gpt (perplexity +0.04% vs +1.1% per channel) and the faster on
# digits-vit, so neither is a default.
PER_CHANNEL_MODES = ("int8-dynamic", "int8-static")
# How many follow-up plans (combinations and stronger steps of the seeds that held the budget)
# are queued once the first seeds are done.
FOLLOW_UPS = 6
# Moves that change how the model computes, not what: merged into the best plan so far before
# any other follow-up, so a search that runs out of trials has finished its best plan
# (digits-vit: 2 blocks + 1 attention, distilled, won at 2.13x/2.31x (b1/b8) with its int8 merge
# still queued; with int8 it runs 2.29x/2.67x).
NUMERICS = frozenset({"quantize", "fuse", "fuse-convs"})


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
    distill: bool = False  # structural moves may be followed by knowledge distillation
    fuse_convs: bool = False  # the elementwise ops around Convs may be folded (fuse-convs)

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
    distill = fitted and "distill" in passes and bool(levels or width) and _has_torch()
    convs = "fuse-convs" in passes and any(n.op_type == "Conv" for n in model.graph)
    if not fitted:
        modes = tuple(m for m in modes if "static" not in m)
        return Space(levels, width, "fuse" in passes, modes, ("identity",), auto, split, False,
                     fuse_convs=convs)
    return Space(levels, width, "fuse" in passes, modes, REPLACEMENTS, auto, split,
                 distill=distill, fuse_convs=convs)


def _has_torch() -> bool:
    """Whether PyTorch (which distill trains with) is installed."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


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
            extra = _suggest_extra(trial, space, level, count)
            if extra:
                choices["drop"]["extra"] = extra
    for name in space.width:
        ratio = trial.suggest_categorical(f"{name}.ratio", RATIOS)
        if ratio:
            choices[name] = {"ratio": ratio, "refit": space.refit}
    if space.distill and any(k in choices for k in STRUCTURAL) and \
            trial.suggest_categorical("distill", (False, True)):
        choices["distill"] = {}
    mode = "none"
    if space.quant_modes:
        mode = trial.suggest_categorical("quantize.mode", ("none", *space.quant_modes))
        if mode != "none":
            choices["quantize"] = {"mode": mode}
            if mode in PER_CHANNEL_MODES:
                choices["quantize"]["per_channel"] = trial.suggest_categorical(
                    "quantize.per_channel", (True, False))
            if mode.startswith("int8") and space.quant_auto_exclude:
                choices["quantize"]["exclude"] = trial.suggest_categorical(
                    "quantize.exclude", ("none", "auto"))
            if mode == "int8-dynamic" and space.split_outliers:
                choices["quantize"]["outliers"] = trial.suggest_categorical(
                    "quantize.outliers", ("float", "float-free", "int8"))
    # Fusion with any number format: fuse hands Attention the padding mask, so int8 makes
    # QAttention of it (fuse + int8 measured faster than int8 alone on MiniLM at 8 threads,
    # about even at 2); fp16 and int4 keep the fused ops in float. Without attention, only the
    # norm and activation fusions (ORT's fused CPU attention is slower on tiny-gpt and at b8 on
    # MiniLM at 2 threads).
    if space.fuse and trial.suggest_categorical("fuse", (False, True)):
        choices["fuse"] = {"attention": trial.suggest_categorical("fuse.attention", (True, False))}
    # Conv nets exported op by op (PP-LCNet: scalar affine blocks, HardSwish spelled out) spend
    # as long in the elementwise ops around their Convs and ORT's layout reorders as in the
    # Convs; fuse-convs folds them (lossless, checked), with any other move.
    if space.fuse_convs and trial.suggest_categorical("fuse_convs", (False, True)):
        choices["fuse-convs"] = {}
    return choices


def extra_levels(space: Space) -> tuple[str, ...]:
    """The sub-layer levels whose regions can follow dropped blocks."""
    return tuple(level for level in SUBLAYER_LEVELS if level in space.drop_levels) \
        if "block" in space.drop_levels else ()


def extra_fits(space: Space, blocks: int, level: str) -> bool:
    """Whether one `level` sub-layer may go after `blocks` dropped blocks (one of its kind is
    left, and no more than MAX_DROPPED regions of a level go in all)."""
    limit = min(space.drop_levels.get(level, 0), space.drop_levels.get("block", 0))
    return blocks + 1 <= limit


def _suggest_extra(trial: Any, space: Space, level: str, count: int) -> str | None:
    """The sub-layer level of one more region to drop after `count` blocks, or None."""
    levels = extra_levels(space)
    if level != "block" or not levels:
        return None
    extra = trial.suggest_categorical("drop.extra", ("none", *levels))
    return extra if extra != "none" and extra_fits(space, count, extra) else None


def pipeline_text(choices: Mapping[str, Any]) -> str:
    """The pipeline that applies `choices` after the lossless default pipeline."""
    parts = [DEFAULT_PIPELINE]
    if "drop" in choices:
        d = choices["drop"]
        parts.append(f"drop-layers{{count={d['count']},level={d['level']},"
                     f"replacement={d['replacement']}}}")
        if d.get("extra"):
            parts.append(f"drop-layers{{count=1,level={d['extra']},"
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
    if any(k in choices for k in STRUCTURAL):
        parts.append("dce")
    if "distill" in choices:
        parts.append(DISTILL)
    if "fuse-convs" in choices:  # after pruning and distill (they read the exported form)
        parts.append("fuse-convs")
    if "fuse" in choices:
        parts.append("fuse" if choices["fuse"].get("attention", True) else "fuse{attention=false}")
    if "quantize" in choices:
        q = choices["quantize"]
        per_tensor = ",per_channel=false" if q.get("per_channel") is False else ""
        exclude = ",exclude=[auto]" if q.get("exclude") == "auto" else ""
        if q.get("outliers") in OUTLIER_SPLITS:
            parts.append(OUTLIER_SPLITS[q["outliers"]])
        parts.append(f"quantize{{mode={q['mode']}{per_tensor}{exclude}}}")
    return ",".join(parts)


def seed_plans(space: Space) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Plans tried first (Optuna enqueued trials), in two tiers: nothing and each single move at
    its mildest that most often pays (int8 dynamic per channel and per tensor, alone and fused,
    one drop per level, a quarter of the heads / channels, fusion); then, after the follow-ups
    the first tier suggests (see `follow_up_plans`), the drop / width seeds followed by `distill`,
    the other number formats and outlier splits."""
    base = base_plan(space)
    first, rest = [dict(base)], []
    for mode in space.quant_modes:
        plan = dict(base, **{"quantize.mode": mode})
        if mode in PER_CHANNEL_MODES:
            plan["quantize.per_channel"] = True
        if mode.startswith("int8") and space.quant_auto_exclude:
            plan["quantize.exclude"] = "none"
        if mode == "int8-dynamic":
            outliers = ("int8", "float-free", "float") if space.split_outliers else (None,)
            plans = [plan if o is None else dict(plan, **{"quantize.outliers": o})
                     for o in outliers]
            first += [plans[0], dict(plans[0], **{"quantize.per_channel": False})]
            if space.fuse:
                first += [dict(plans[0], fuse=True, **{"fuse.attention": a}) for a in (True, False)]
            rest += plans[1:]
        else:
            rest.append(plan)
    for level in sorted(space.drop_levels):
        seed = {"drop.level": level, "drop.count": 1, "drop.replacement": space.replacements[-1]}
        if level == "block" and extra_levels(space):
            seed["drop.extra"] = "none"
        first.append(dict(base, **seed))
    structural = [dict(base, **{f"{name}.ratio": RATIOS[1]}) for name in space.width]
    first += structural
    if space.fuse:
        first += [dict(base, fuse=True, **{"fuse.attention": a}) for a in (True, False)]
    if space.fuse_convs:
        first.append(dict(base, fuse_convs=True))
    if space.distill:  # the same structural moves, distilled: they may hold where bare ones
        # fail, but each trains for up to a minute, so they wait for the second tier
        rest = [dict(p, distill=True) for p in first if plan_moves(p, space).keys() & {
            "drop", *space.width}] + rest
    return first, rest


def base_plan(space: Space) -> dict[str, Any]:
    """The plan that changes nothing, with every unconditional choice of `space` set."""
    base: dict[str, Any] = {}
    if space.drop_levels:
        base.update({"drop.level": sorted(space.drop_levels)[0], "drop.count": 0})
    base.update({f"{name}.ratio": 0.0 for name in space.width})
    if space.fuse:
        base["fuse"] = False
    if space.fuse_convs:
        base["fuse_convs"] = False
    if space.distill:  # a first-tier seed trains only where it says so (else TPE may draw it)
        base["distill"] = False
    if space.quant_modes:
        base["quantize.mode"] = "none"
    return base


def plan_moves(plan: Mapping[str, Any], space: Space) -> dict[str, dict[str, Any]]:
    """The moves a plan makes, each with the choices that belong to it: 'drop', a width pass
    name, 'fuse', 'fuse-convs', 'quantize' (a move the plan leaves at its default is absent)."""
    moves: dict[str, dict[str, Any]] = {}
    # distillation belongs to the structural moves it follows, so merged plans keep it
    distill = {"distill": True} if plan.get("distill") else {}
    if plan.get("drop.count"):
        moves["drop"] = {k: v for k, v in plan.items() if k.startswith("drop.")} | distill
    for name in space.width:
        if plan.get(f"{name}.ratio"):
            moves[name] = {f"{name}.ratio": plan[f"{name}.ratio"]} | distill
    if plan.get("fuse"):
        moves["fuse"] = {k: v for k, v in plan.items() if k.startswith("fuse.") or k == "fuse"}
    if plan.get("fuse_convs"):
        moves["fuse-convs"] = {"fuse_convs": True}
    if plan.get("quantize.mode", "none") != "none":
        moves["quantize"] = {k: v for k, v in plan.items() if k.startswith("quantize.")}
    return moves


def stronger(plan: Mapping[str, Any], space: Space) -> list[dict[str, Any]]:
    """`plan` with one of its drop or width moves one step further, one plan per move that has
    a next step (more layers dropped, the next ratio)."""
    out = []
    for move in plan_moves(plan, space):
        if move == "drop":
            count = int(plan["drop.count"]) + 1
            if count <= space.drop_levels[plan["drop.level"]]:
                out.append(dict(plan, **{"drop.count": count}))
            if plan["drop.level"] == "block" and plan.get("drop.extra", "none") == "none":
                out += [dict(plan, **{"drop.extra": level}) for level in extra_levels(space)
                        if extra_fits(space, count - 1, level)]
        elif move in space.width:
            step = RATIOS.index(plan[f"{move}.ratio"]) + 1
            if step < len(RATIOS):
                out.append(dict(plan, **{f"{move}.ratio": RATIOS[step]}))
    return out


def follow_up_plans(space: Space, results: list[tuple[dict[str, Any], float, float]],
                    max_drop: float, tried: list[dict[str, Any]] = (),
                    count: int = FOLLOW_UPS) -> list[dict[str, Any]]:
    """Plans to try next, from the (plan, cost, drop) results that held `max_drop` and cost less
    than the source: first the cheapest of them merged with each numerics move that held alone
    (`NUMERICS`), then every pair of them with no move in common merged into one plan (of plans
    making the same moves, the cheapest) and each with one drop / width move a step further;
    each group cheapest first by the product of the costs (a stronger step counted as its cost
    squared), none of `tried` or the results, at most `count`.
    Repeated as results come in, it is a greedy search that grows the plans that hold."""
    held = [(p, c) for p, c, d in results if d <= max_drop and c < 1.0 and plan_moves(p, space)]
    scored: list[tuple[float, dict[str, Any]]] = []
    for a, cost_a in held:
        scored += [(cost_a * cost_a, up) for up in stronger(a, space)]
    merging = _cheapest_per_moves(held, space)
    pairs = [(cost_a * cost_b, merged) for i, (a, cost_a) in enumerate(merging)
             for b, cost_b in merging[i + 1:] if (merged := _merged(a, b, space)) is not None]
    best = min(held, key=lambda item: item[1], default=None)
    finishing = [] if best is None else [
        (best[1] * cost, merged) for plan, cost in merging
        if set(plan_moves(plan, space)) <= NUMERICS
        and (merged := _merged(best[0], plan, space)) is not None]
    seen = [*tried, *(p for p, _, _ in results)]
    out: list[dict[str, Any]] = []
    for _, plan in [*_by_cost(finishing), *_by_cost(scored + pairs)]:
        if plan not in out and not any(_same_plan(plan, t) for t in seen):
            out.append(plan)
    return out[:count]


def _by_cost(scored: list[tuple[float, dict[str, Any]]]) -> list[tuple[float, dict[str, Any]]]:
    """Scored plans cheapest first (ties in the order they came)."""
    return sorted(scored, key=lambda item: item[0])


def _merged(a: Mapping[str, Any], b: Mapping[str, Any], space: Space) -> dict[str, Any] | None:
    """One plan making the moves of both `a` and `b`, or None when they share a move."""
    moves_a, moves_b = plan_moves(a, space), plan_moves(b, space)
    if set(moves_a) & set(moves_b):
        return None
    merged = base_plan(space)
    for choices in (*moves_a.values(), *moves_b.values()):
        merged.update(choices)
    return merged


def _cheapest_per_moves(held: list[tuple[dict[str, Any], float]], space: Space
                        ) -> list[tuple[dict[str, Any], float]]:
    """Of the plans making the same set of moves, the cheapest: merges pair only those, so five
    int8 flavours that all held do not queue five copies of every structural plan."""
    best: dict[frozenset[str], tuple[dict[str, Any], float]] = {}
    for plan, cost in held:
        key = frozenset(plan_moves(plan, space))
        if key not in best or cost < best[key][1]:
            best[key] = (plan, cost)
    return list(best.values())


def _same_plan(plan: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether two plans make the same choices: equal where both choose, and the same choices
    set away from their defaults (a trial's params lack what it did not suggest)."""
    def active(p: Mapping[str, Any]) -> set[str]:
        return {k for k, v in p.items() if v not in (0, 0.0, False, "none")}

    return active(plan) == active(other) and all(plan[k] == other[k]
                                                 for k in set(plan) & set(other))

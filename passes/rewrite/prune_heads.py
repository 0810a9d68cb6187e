"""`prune-heads`: remove attention heads structurally (Q/K/V rows and biases, O columns, and the
Reshape / Expand constants that encode the head count), chosen by head-importance, its proxy,
head-entropy (highest first), at random, or by name; optionally refit each output projection in
closed form on calibration activations (ridge least squares against the unpruned layer's output).

GQA: `gqa=within` removes the same number of query heads from every KV group (the KV heads stay);
`gqa=groups` removes whole KV groups with their query heads. Either way n_q % n_kv == 0 holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from winnow.errors import PassConfigError
from winnow.ir.activations import as_vectors, padding_mask
from winnow.ir.execute import run
from winnow.ir.pruning import (HeadPlan, head_names, projection_output, prunable_attention,
                               prune_heads, refit_linear, set_projection, weight_node)
from winnow.ir.regions import Region, find_regions
from winnow.passes.base import Pass, PassResult, register_pass
from winnow.passes.config import option
from winnow.passes.manager import PassContext

SOURCES = ("importance", "proxy", "entropy", "random")


def check_ratio(ratio: float, pass_name: str) -> None:
    """Ratios are fractions removed, in [0, 1): removing everything is not pruning."""
    if not 0.0 <= ratio < 1.0:
        raise PassConfigError(f"pass '{pass_name}' option 'ratio' must be in [0, 1); got {ratio!r}.")


@register_pass
class PruneHeadsPass(Pass):
    """Remove attention heads structurally; lossy, judged by the evaluator."""

    name = "prune-heads"
    description = ("remove attention heads (by importance, proxy, entropy, random or name), "
                   "slicing Q/K/V/O and head-count constants; optional closed-form O refit")
    lossless = False

    @dataclass(frozen=True)
    class Config:
        """Options of prune-heads."""

        heads: tuple[str, ...] = option((), "names of heads to remove ('<attention region>."
                                        "head<i>'); overrides ratio")
        ratio: float = option(0.0, "fraction of query heads to remove, in [0, 1)")
        scope: str = option("layer", "apply ratio in every layer or over all heads at once",
                            choices=("layer", "global"))
        source: str = option("importance", "what ranks heads: masked-head loss, its output-norm "
                             "proxy, entropy (highest removed first) or random", choices=SOURCES)
        seed: int = option(0, "seed of source=random")
        gqa: str = option("within", "GQA: remove query heads evenly within KV groups, or whole "
                          "KV groups", choices=("within", "groups"))
        refit: bool = option(False, "refit each output projection by ridge least squares on "
                             "calibration activations")
        samples: int = option(256, "calibration samples for the refit", min=1)
        ridge: float = option(1e-3, "ridge strength of the refit (relative)", min=0.0)

        def __post_init__(self) -> None:
            check_ratio(self.ratio, "prune-heads")

    def call(self, model: ir.Model) -> PassResult:
        """Remove the chosen heads in place."""
        ctx = PassContext.current()
        regions = prunable_attention(find_regions(model))
        if not regions:
            ctx.report[self.name] = {"removed": [], "note": "no attention layer with recognisable "
                                     "heads was found; nothing was rewritten"}
            return PassResult(model, False)
        chosen = (self._explicit(regions) if self.config.heads
                  else self._by_score(model, regions, ctx))
        exact = bool(self.config.heads)
        plans = [plan_layer(r, *chosen.get(r.name, ([], 0)), self.config.gqa, exact)
                 for r in regions]
        plans = [p for p in plans if len(p.keep_q) < p.heads.num_heads]
        if not plans:
            ctx.report[self.name] = {"removed": [], "note": "no heads were asked for (give "
                                     "heads=[...] or ratio>0)"}
            return PassResult(model, False)
        targets = _targets(model, plans, self._batches(model, ctx)) if self.config.refit else None
        names = {id(p.region): head_names(p.region) for p in plans}
        report = {"removed": [names[id(p.region)][h] for p in plans
                              for h in range(p.heads.num_heads) if h not in p.keep_q],
                  "kept": {p.region.name: len(p.keep_q) for p in plans},
                  "kept_kv": {p.region.name: len(p.keep_kv) for p in plans}}
        rehearse(model, plans)  # a failure is raised before the model is touched
        for plan in plans:
            prune_heads(model.graph, plan)
        RemoveUnusedNodesPass()(model)
        if targets is not None:
            report["refit_r2"] = _refit(model, plans, targets, self._batches(model, ctx),
                                        self.config.ridge)
        ctx.report[self.name] = report
        return PassResult(model, True)

    def _batches(self, model: ir.Model, ctx: PassContext) -> list[dict]:
        from winnow.passes.analysis.calibration import calibration_batches
        from winnow.passes.analysis.layer_similarity import limit_samples

        return limit_samples(calibration_batches(model, ctx), self.config.samples)

    def _explicit(self, regions: list[Region]) -> dict[str, tuple[list[int], int]]:
        """Per layer: (the named heads, how many), from the `heads` option."""
        index = {n: (r.name, h) for r in regions for h, n in enumerate(head_names(r))}
        named: dict[str, list[int]] = {}
        for name in self.config.heads:
            if name not in index:
                valid = ", ".join(index)
                raise PassConfigError(f"prune-heads: there is no head named '{name}'; heads "
                                      f"are: {valid}.")
            region, head = index[name]
            if head not in named.setdefault(region, []):
                named[region].append(head)
        return {r: (heads, len(heads)) for r, heads in named.items()}

    def _by_score(self, model: ir.Model, regions: list[Region], ctx: PassContext
                  ) -> dict[str, tuple[list[int], int]]:
        """Per layer: (heads most removable first, how many to remove)."""
        if self.config.ratio == 0.0:
            return {}
        scores = head_scores(model, regions, ctx, self.config.source, self.config.seed)
        if self.config.scope == "layer":
            counts = {r.name: min(round(self.config.ratio * r.heads.num_heads),
                                  r.heads.num_heads - 1) for r in regions}
        else:
            counts = global_counts(regions, scores, self.config.ratio)
        return {r.name: (_order(scores[r.name]), counts[r.name]) for r in regions}


def _order(scores: np.ndarray) -> list[int]:
    """Head indices, highest score (most removable) first."""
    return [int(i) for i in np.argsort(-scores, kind="stable")]


def head_scores(model: ir.Model, regions: list[Region], ctx: PassContext, source: str,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Per layer, per head: how removable each head is (higher = remove first)."""
    if source == "random":
        rng = np.random.default_rng(seed)
        return {r.name: rng.random(r.heads.num_heads) for r in regions}
    if source == "entropy":
        result = ctx.get_analysis("head-entropy", model)
        by_layer = {layer["region"]: np.asarray(layer["entropy"]) for layer in result["layers"]}
    else:
        result = ctx.get_analysis("head-importance", model) if source == "importance" else \
            ctx.get_analysis("head-importance", model, proxy_only=True)
        by_layer = {layer["region"]: -np.asarray(layer[source]) for layer in result["layers"]}
    missing = [r.name for r in regions if r.name not in by_layer]
    if missing:
        why = (result.get("not_measurable") or {}).get(missing[0])
        raise PassConfigError(f"prune-heads: {source} has no scores for {', '.join(missing)}"
                              + (f" ({missing[0]}: {why})." if why else "."))
    return {r.name: by_layer[r.name] for r in regions}


def global_counts(regions: list[Region], scores: dict[str, np.ndarray], ratio: float
                  ) -> dict[str, int]:
    """Heads to remove per layer when the `ratio` most removable heads of the model go, each
    layer keeping at least one head."""
    ranked = sorted(((s, r.name) for r in regions for s in scores[r.name]), key=lambda t: -t[0])
    total = sum(r.heads.num_heads for r in regions)
    limit = {r.name: r.heads.num_heads - 1 for r in regions}
    counts = {r.name: 0 for r in regions}
    budget = round(ratio * total)
    for _, name in ranked:
        if budget == 0:
            break
        if counts[name] < limit[name]:
            counts[name] += 1
            budget -= 1
    return counts


def plan_layer(region: Region, order: list[int], count: int, gqa: str,
               exact: bool = False) -> HeadPlan:
    """The heads a layer keeps when `count` heads go, taken from `order` (most removable first)
    while respecting GQA grouping; `exact`: the first `count` of `order` must go as they are."""
    h = region.heads
    n, kv = h.num_heads, h.num_kv_heads
    rep = n // kv
    removed = set(order[:count])
    if count >= n:
        raise PassConfigError(f"prune-heads would remove every head of '{region.name}'; use "
                              "drop-layers to remove a whole attention layer.")
    if rep == 1:
        keep = [i for i in range(n) if i not in removed]
        return HeadPlan(region, keep, keep)
    group_of = [q // rep for q in range(n)]
    if gqa == "groups":
        if exact:
            gone = sorted({group_of[q] for q in removed})
            if {q for q in range(n) if group_of[q] in gone} != removed:
                raise PassConfigError(f"prune-heads gqa=groups: the heads named in "
                                      f"'{region.name}' are not whole KV groups of {rep} heads.")
        else:
            rank = {g: np.mean([order.index(q) for q in range(n) if group_of[q] == g])
                    for g in range(kv)}
            gone = sorted(rank, key=rank.get)[:min(count // rep, kv - 1)]
        keep_kv = [g for g in range(kv) if g not in gone]
        return HeadPlan(region, [q for q in range(n) if group_of[q] in keep_kv], keep_kv)
    if exact:
        per = {sum(group_of[q] == g for q in removed) for g in range(kv)}
        if len(per) != 1:
            raise PassConfigError(f"prune-heads gqa=within: the heads named in '{region.name}' "
                                  f"must take the same number from each of its {kv} KV groups.")
        drop = removed
    else:
        per_group = min(count // kv, rep - 1)
        drop = {q for g in range(kv) for q in [q for q in order if group_of[q] == g][:per_group]}
    if any(sum(group_of[q] == g for q in drop) >= rep for g in range(kv)):
        raise PassConfigError(f"prune-heads would empty a KV group of '{region.name}'; use "
                              "gqa=groups to remove whole groups.")
    return HeadPlan(region, [q for q in range(n) if q not in drop], list(range(kv)))


def rehearse(model: ir.Model, plans: list[HeadPlan]) -> None:
    """Apply the plans to a copy first, so an unsupported pattern in any layer raises before the
    model itself is edited (nothing is left half-rewritten)."""
    trial = model.clone()
    regions = {r.name: r for r in prunable_attention(find_regions(trial))}
    for plan in plans:
        prune_heads(trial.graph, HeadPlan(regions[plan.region.name], plan.keep_q, plan.keep_kv))


def _targets(model: ir.Model, plans: list[HeadPlan], batches: list[dict]) -> dict[str, np.ndarray]:
    """The unpruned output-projection outputs of each planned layer (real tokens only)."""
    names = [projection_output(weight_node(p.region, p.heads.o)).name for p in plans]
    return _vectors(model, batches, names)


def _vectors(model: ir.Model, batches: list[dict], names: list[str]) -> dict[str, np.ndarray]:
    chunks: dict[str, list] = {n: [] for n in names}
    for feeds in batches:
        captured = run(model, feeds, capture=names)
        mask = padding_mask(feeds)
        for n in names:
            chunks[n].append(as_vectors(captured[n], mask))
    return {n: np.concatenate(c) for n, c in chunks.items()}


def _refit(model: ir.Model, plans: list[HeadPlan], targets: dict[str, np.ndarray],
           batches: list[dict], ridge: float) -> dict[str, float]:
    """Refit each pruned layer's output projection, in network order, on the inputs the pruned
    model gives it (so each fit also absorbs the error of the layers before it)."""
    r2 = {}
    order = {id(n): i for i, n in enumerate(model.graph)}
    for plan in sorted(plans, key=lambda p: order[id(weight_node(p.region, p.heads.o))]):
        node = weight_node(plan.region, plan.heads.o)
        target_name = projection_output(node).name
        x = _vectors(model, batches, [node.inputs[0].name])[node.inputs[0].name]
        y = targets[target_name]
        weight, bias = refit_linear(x, y, ridge)
        resid = y - x @ weight - bias
        r2[plan.region.name] = 1.0 - float((resid**2).sum() / max(((y - y.mean(0))**2).sum(), 1e-12))
        set_projection(model.graph, node, weight, bias)
    return r2


def describe(result: dict[str, Any]) -> str:
    """One line: how many heads were removed and what each layer keeps."""
    if not result.get("removed"):
        return result.get("note", "no heads removed")
    kept = ", ".join(f"{k}: {v}" for k, v in result["kept"].items())
    return f"{len(result['removed'])} heads removed; kept per layer: {kept}"


"""das-skip: which regions can be skipped, learned by a k-armed bandit (DAS, NeurIPS 2023).

Wu et al., "Parameter and Computation Efficient Transfer Learning for Vision-Language
Pre-trained Models" (NeurIPS 2023) search the layers to skip with REINFORCE-style updates on
one logit per candidate. Here: p = sigmoid(logit); each step draws `samples_per_step` distinct
skip sets of k regions without replacement, weighted by p; the reward of a set is
r = exp(-loss), loss = fidelity loss against the unmodified model on the step's calibration
batches (or `ctx.options["task_loss"](outputs, feeds)`, which the zoo provides for tiny-gpt: its
next-byte cross-entropy) plus `cost_weight` x the fraction of
the model's weights still used; with b the step's mean reward, each region i of a set moves by
`logit_i += lr * (r - b) * p_i * (1 - p_i)`. Logits rise for regions whose skipping hurts least,
so the highest logits are the most skippable regions. With `replacement=linear` a skipped
region becomes entry + a ridge adapter fitted on the unmodified model (what drop-layers will put
there), so the search ranks regions by how well they can be *replaced*, not merely removed.

Speed: the model is copied once with a scalar gate on each candidate's residual branch
(`winnow.ir.gates`), so a skip set is a different feed, not a new model. A skip set whose first
region is m only runs the model from region m's entry on (one session per start region, built
once; the prefix value comes from the all-gates-open run that also gives the reference). Each
step uses small mini-batches (`batch_size` rows, trailing padding trimmed) of the calibration
data; all skip sets of a step see the same mini-batch, so the baseline cancels its difficulty.
The cost term (`cost_weight`, default 0) is the fraction of the model's MatMul/Gemm/Conv weights
still used: constant at fixed k when the candidates are alike (MiniLM blocks), meaningful when
they differ (attention vs MLP sub-layers, CNN stages).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from winnow import progress
from winnow.errors import ExecutionError, PassConfigError
from winnow.ir.activations import degenerate_regions
from winnow.ir.execute import model_bytes, session_options
from winnow.ir.gates import gate_feeds, gated_copy, suffix_model
from winnow.ir.linear_adapter import fit_region_adapters
from winnow.ir.regions import LEVELS, PARAM_OPS, Region, find_regions
from winnow.passes.analysis.calibration import calibration_batches, fidelity_loss, split_batch
from winnow.passes.analysis.layer_similarity import limit_samples
from winnow.passes.base import AnalysisPass, register_pass
from winnow.passes.config import option



def _weight_count(nodes: Any) -> int:
    """Elements of the constant weights (and biases) of the parameterized ops among `nodes`."""
    total = 0
    for node in nodes:
        if node.op_type not in PARAM_OPS:
            continue
        for v in node.inputs[1:]:
            if v is not None and v.const_value is not None:
                total += math.prod(v.const_value.shape.numpy())
    return total


def _draw_sets(rng: np.random.Generator, p: np.ndarray, k: int, count: int) -> list[tuple]:
    """`count` distinct k-subsets drawn without replacement with weights p (fewer if not possible)."""
    n = len(p)
    count = min(count, math.comb(n, k))
    weights = p / p.sum()
    sets: list[tuple] = []
    seen: set[tuple] = set()
    for _ in range(count * 50):
        s = tuple(sorted(int(i) for i in rng.choice(n, size=k, replace=False, p=weights)))
        if s not in seen:
            seen.add(s)
            sets.append(s)
            if len(sets) == count:
                return sets
    # Weights so peaked that rejection stalls: fill up with the remaining sets in order.
    for s in itertools.combinations(range(n), k):
        if len(sets) == count:
            break
        if s not in seen:
            seen.add(s)
            sets.append(s)
    return sets


@register_pass
class DasSkipPass(AnalysisPass):
    """Learn which k regions can be skipped with the least harm (DAS bandit on gated copies)."""

    name = "das-skip"
    description = ("rank regions by how skippable they are with DAS's k-armed bandit "
                   "(reward exp(-fidelity loss)) on a gated copy of the model")

    @dataclasses.dataclass(frozen=True)
    class Config:
        level: str = option("block", "regions to consider: blocks, sub-layers, or only "
                            "attention / MLP sub-layers", choices=LEVELS)
        k: int = option(1, "regions skipped together in each sampled skip set", min=1)
        steps: int = option(200, "bandit steps", min=1)
        samples_per_step: int = option(4, "distinct skip sets sampled per step (DAS's das_step)",
                                       min=1)
        lr: float = option(2.0, "learning rate of the logit updates", min=0.0)
        cost_weight: float = option(0.0, "weight of the cost term: fraction of the model's "
                                    "weights (MatMul/Gemm/Conv) still used after skipping",
                                    min=0.0)
        seed: int = option(0, "seed of the skip-set sampling")
        batches: int = option(1, "calibration mini-batches per step (cycling through the data)",
                              min=1)
        batch_size: int = option(4, "rows (sequences, images) per mini-batch: calibration "
                                 "batches are split along their first axis; 0 keeps them whole",
                                 min=0)
        replacement: str = option("identity", "what a skipped region becomes: its entry "
                                  "(identity) or entry + a ridge-fitted linear adapter, as "
                                  "drop-layers will replace it", choices=("identity", "linear"))
        adapter_samples: int = option(256, "calibration samples the linear adapters are "
                                      "fitted on (replacement=linear)", min=1)

    def analyze(self, model: ir.Model) -> dict[str, Any]:
        from winnow.passes.manager import PassContext

        cfg = self.config
        ctx = PassContext.current()
        start = time.perf_counter()
        regions = find_regions(model).candidates(cfg.level)
        if not regions:
            return {"level": cfg.level, "k": cfg.k, "regions": [], "ranking": [], "selected": [],
                    "curve": {"reward": [], "loss": []}, "seconds": time.perf_counter() - start,
                    "note": f"no detectable blocks: the model has no droppable residual regions "
                            f"at level '{cfg.level}', so there is nothing to skip."}
        names = [r.name for r in regions]
        if cfg.k >= len(regions):
            raise PassConfigError(
                f"pass 'das-skip' option 'k' must be smaller than the {len(regions)} candidate "
                f"regions at level '{cfg.level}'; got {cfg.k}. The candidates are: "
                f"{', '.join(names)}.")

        unmeasured = degenerate_regions(model, regions, limit_samples(
            calibration_batches(model, ctx), cfg.adapter_samples))
        unscored = [_unmeasured_entry(r, unmeasured[r.name]) for r in regions
                    if r.name in unmeasured]
        regions = [r for r in regions if r.name not in unmeasured]
        names = [r.name for r in regions]
        if cfg.k >= len(regions):
            return _too_few_measurable(cfg.level, cfg.k, unscored, time.perf_counter() - start)
        batches = [mb for b in calibration_batches(model, ctx)
                   for mb in split_batch(b, cfg.batch_size, model)]
        adapters = None
        if cfg.replacement == "linear":
            with progress.step(f"fitting linear adapters for {len(regions)} regions"):
                fit_batches = limit_samples(calibration_batches(model, ctx), cfg.adapter_samples)
                adapters = fit_region_adapters(model, regions, fit_batches)
        evaluate = _Evaluator(model, regions, batches, ctx.options.get("task_loss"),
                              cfg.cost_weight, adapters=adapters)
        rng = np.random.default_rng(cfg.seed)
        logits = np.zeros(len(regions))
        rewards, losses = [], []
        cursor = 0
        for _step in progress.bar(range(cfg.steps), desc="das-skip", total=cfg.steps):
            p = 1.0 / (1.0 + np.exp(-logits))
            sets = _draw_sets(rng, p, cfg.k, cfg.samples_per_step)
            batch_ids = [(cursor + j) % evaluate.num_batches for j in range(cfg.batches)]
            cursor += cfg.batches
            step_losses = [evaluate(s, batch_ids) for s in sets]
            # A NaN/Inf loss (a skip set that breaks the model) earns no reward.
            with np.errstate(invalid="ignore", over="ignore"):
                step_rewards = np.nan_to_num(np.exp(-np.array(step_losses)), nan=0.0, posinf=0.0)
            baseline = step_rewards.mean()
            for s, r in zip(sets, step_rewards):
                for i in s:
                    logits[i] += cfg.lr * (r - baseline) * p[i] * (1.0 - p[i])
            rewards.append(float(baseline))
            losses.append(float(np.mean(step_losses)))

        p = 1.0 / (1.0 + np.exp(-logits))
        order = sorted(range(len(regions)), key=lambda i: (-logits[i], i))
        ranking = [names[i] for i in order]
        return {
            "level": cfg.level,
            "k": cfg.k,
            "regions": [{"name": n, "kind": r.kind, "layout": r.layout,
                         "logit": float(logits[i]), "p": float(p[i]),
                         "weight_fraction": evaluate.weight_fraction[i]}
                        for i, (n, r) in enumerate(zip(names, regions))] + unscored,
            "ranking": ranking,
            "selected": ranking[:cfg.k],
            "not_measurable": unmeasured,
            "curve": {"reward": rewards, "loss": losses},
            "loss": "task" if evaluate.task_loss else "fidelity (1 - cosine of outputs)",
            "replacement": cfg.replacement,
            "calibration_batches": evaluate.num_batches,
            "prefix_reuse": evaluate.prefix_reuse,
            "seconds": time.perf_counter() - start,
        }


def _unmeasured_entry(region: Region, reason: str) -> dict[str, Any]:
    """A candidate left out of the bandit because its streams are degenerate on the data."""
    return {"name": region.name, "kind": region.kind, "layout": region.layout,
            "measurable": False, "reason": reason}


def _too_few_measurable(level: str, k: int, unscored: list[dict], seconds: float
                        ) -> dict[str, Any]:
    """The result when too few candidates are measurable to rank skip sets of k."""
    first = unscored[0]
    return {"level": level, "k": k, "regions": unscored, "ranking": [], "selected": [],
            "not_measurable": {r["name"]: r["reason"] for r in unscored},
            "curve": {"reward": [], "loss": []}, "seconds": seconds,
            "note": f"{len(unscored)} of the candidate regions are not measurable on the "
                    f"calibration data (e.g. {first['name']}: {first['reason']}), too few are "
                    f"left to rank skip sets of k={k}, so nothing is ranked"}


def _session(model: ir.Model) -> ort.InferenceSession:
    """An ORT session whose worker threads sleep instead of spinning between the many small
    runs: on a shared CPU spinning threads cost ~40% (measured on MiniLM)."""
    ir.external_data.load_to_model(model)
    options = session_options(threads=0, optimize=False)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model_bytes(model), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        raise ExecutionError("ONNX Runtime cannot load the gated model: "
                             f"{str(exc).splitlines()[0]}") from exc


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)


class _Evaluator:
    """Loss of a skip set on a calibration batch, from one gated copy of the model.

    Every run with a skip set whose first region is m starts at region m's entry: the prefix
    is the unmodified model, so its value comes from the all-gates-open run of that batch (which
    also gives the reference outputs). One ORT session per start region, each built once, when
    their weights fit in PREFIX_REUSE_BYTES; otherwise one session runs the whole model.
    """

    PREFIX_REUSE_BYTES = 2 << 30
    CACHED_BATCHES = 64

    def __init__(self, model: ir.Model, regions: list[Region], batches: list[dict],
                 task_loss: Any, cost_weight: float, reuse_prefix: bool = True,
                 adapters: Mapping[str, Any] | None = None) -> None:
        self.gated, self.gates = gated_copy(model, regions, adapters)
        needed = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
        for batch in batches:
            missing = [n for n in needed if n not in batch]
            if missing:
                raise ExecutionError(
                    f"a calibration batch lacks input(s) {', '.join(missing)}; the model takes "
                    f"{', '.join(needed)}: give feeds for every input.")
        self.batches = batches
        self.task_loss = task_loss if callable(task_loss) else None
        self.cost_weight = cost_weight
        total = _weight_count(model.graph) or 1
        self.weight_fraction = [_weight_count(r.nodes) / total for r in regions]
        graph_inputs = {v.name for v in self.gated.graph.inputs}
        # Start points: region entries computed inside the graph (not graph inputs).
        self.starts = {i: r.entry.name for i, r in enumerate(regions)
                       if i > 0 and r.entry.name not in graph_inputs} if reuse_prefix else {}
        if self.starts:
            weights = _initializer_bytes(self.gated)
            if weights * (len(self.starts) + 1) > self.PREFIX_REUSE_BYTES:
                self.starts = {}
        self.outputs = [v.name for v in self.gated.graph.outputs]
        full = self.gated.clone()
        values = {v.name: v for node in full.graph for v in node.outputs}
        self.captures = [name for name in dict.fromkeys(self.starts.values())
                         if name not in self.outputs]
        full.graph.outputs.extend(values[name] for name in self.captures)
        self.sessions: dict[int, ort.InferenceSession] = {0: _session(full)}
        self.open_runs: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    @property
    def prefix_reuse(self) -> bool:
        return bool(self.starts)

    def _session_for(self, start: int) -> ort.InferenceSession:
        session = self.sessions.get(start)
        if session is None:
            session = self.sessions[start] = _session(
                suffix_model(self.gated, self.starts[start]))
        return session

    def _feeds(self, session: ort.InferenceSession, values: Mapping[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
        names = {i.name for i in session.get_inputs()}
        return {k: v for k, v in values.items() if k in names}

    def open_run(self, batch: int) -> dict[str, np.ndarray]:
        """Outputs and start-point values of the unmodified model on a batch (cached)."""
        hit = self.open_runs.get(batch)
        if hit is not None:
            self.open_runs.move_to_end(batch)
            return hit
        session = self.sessions[0]
        names = self.outputs + self.captures
        feeds = {**self.batches[batch], **gate_feeds(len(self.gates))}
        result = dict(zip(names, session.run(names, self._feeds(session, feeds))))
        self.open_runs[batch] = result
        if len(self.open_runs) > self.CACHED_BATCHES:
            self.open_runs.popitem(last=False)
        return result

    def outputs_for(self, skipped: tuple, batch: int) -> dict[str, np.ndarray]:
        """Graph outputs of the model with the regions `skipped` (indices) gated off."""
        feeds = {**self.batches[batch], **gate_feeds(len(self.gates), skipped)}
        start = min(skipped, default=0)
        while start > 0 and start not in self.starts:
            start -= 1
        if start > 0:
            opened = self.open_run(batch)
            feeds[self.starts[start]] = opened[self.starts[start]]
        session = self._session_for(start)
        return dict(zip(self.outputs, session.run(self.outputs, self._feeds(session, feeds))))

    def __call__(self, skipped: tuple, batch_ids: list[int]) -> float:
        values = []
        for b in batch_ids:
            out = self.outputs_for(skipped, b)
            if self.task_loss is not None:
                values.append(float(self.task_loss(out, self.batches[b])))
            else:
                ref = self.open_run(b)
                values.append(fidelity_loss({k: ref[k] for k in self.outputs}, out))
        loss = float(np.mean(values))
        if self.cost_weight:
            loss += self.cost_weight * (1.0 - sum(self.weight_fraction[i] for i in skipped))
        return loss


def describe(result: Mapping[str, Any]) -> str:
    """One line per region: name, logit and p, most skippable first."""
    if not result.get("regions"):
        return result.get("note", "no regions")
    by_name = {r["name"]: r for r in result["regions"]}
    return "\n".join(f"{n:32s} logit {by_name[n]['logit']:+.3f}  p {by_name[n]['p']:.3f}"
                     for n in result["ranking"])

"""Measured latency of candidates relative to the source, interleaved with it (A B A B) so a
busy machine slows both alike; the ratio at a batch size is the median of the per-round ratios,
and a candidate's cost is the geometric mean of its ratios over the batch sizes timed (b1 and b8
for a model with a dynamic batch, its own batch for a fixed one)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.errors import ExecutionError
from winnow.measure.timing import (
    available_cpus,
    paired_ratios,
    session_runner,
    time_interleaved,
    timing_session,
)

Feeds = dict[str, np.ndarray]


def batch_label(rows: int) -> str:
    """How a batch size is named in reports: b1, b8."""
    return f"b{rows}"


def timing_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray],
                 batches: Sequence[int]) -> dict[str, Feeds]:
    """The feeds to time `model` on, by batch label: the first rows of `feeds` at each of
    `batches` (rows repeated when there are fewer) when every batched input's first axis is
    symbolic, else `feeds` as they are, at the model's own batch."""
    arrays = {k: np.asarray(v) for k, v in feeds.items()}
    sizes = {v.shape[0] for v in arrays.values() if v.ndim >= 1}
    if len(sizes) != 1 or not _dynamic_batch(model, arrays):
        return {batch_label(min(sizes, default=1)): arrays}
    (rows,) = sizes
    return {batch_label(b): {k: (v[np.arange(b) % rows] if v.ndim >= 1 else v)
                             for k, v in arrays.items()}
            for b in dict.fromkeys(batches)}


def _dynamic_batch(model: ir.Model, arrays: Mapping[str, np.ndarray]) -> bool:
    inputs = {v.name: v for v in model.graph.inputs}
    for name, array in arrays.items():
        value = inputs.get(name)
        if value is None or array.ndim == 0:
            continue
        if value.shape is None or len(value.shape) == 0 or isinstance(value.shape[0], int):
            return False
    return True


def combined_ratio(ratios: Mapping[str, float]) -> float:
    """One cost from the per-batch latency ratios: their geometric mean."""
    return math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))


class CandidateTimer:
    """Times candidates against one reference session on fixed feeds at each timing batch."""

    def __init__(self, base: ir.Model, feeds: Mapping[str, np.ndarray],
                 batches: Sequence[int], repeats: int) -> None:
        self.threads = available_cpus()
        self.batch_feeds = timing_feeds(base, feeds, batches)
        self.repeats = repeats
        self.seconds = dict.fromkeys(self.batch_feeds, 0.0)  # timed runs, by batch
        # the shapes the cost model prices: the largest timing batch
        self.feeds = self.batch_feeds[max(self.batch_feeds, key=lambda label: int(label[1:]))]
        self.base = self._runners(base)

    def _runners(self, model: ir.Model) -> dict[str, Any]:
        try:
            session = timing_session(model, self.threads)
        except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
            raise ExecutionError(f"ONNX Runtime cannot load a candidate for timing: "
                                 f"{str(exc).splitlines()[0]}") from exc
        return {label: session_runner(session, feeds)
                for label, feeds in self.batch_feeds.items()}

    def latency_ratios(self, model: ir.Model, repeats: int | None = None) -> dict[str, float]:
        """Candidate latency over the source's at each timing batch (below 1 = faster)."""
        return self.latency_ratios_together({"cand": model}, repeats or self.repeats)["cand"]

    def relative_latency(self, model: ir.Model, repeats: int | None = None) -> float:
        """`combined_ratio` of the candidate's `latency_ratios`."""
        return combined_ratio(self.latency_ratios(model, repeats))

    def latency_ratios_together(self, models: Mapping[str, ir.Model], repeats: int
                                ) -> dict[str, dict[str, float]]:
        """`latency_ratios` of several candidates, every batch of every candidate and of the
        source timed in the same interleaved rounds (a head-to-head: the noise of one run moves
        them all alike)."""
        sessions = {"base": self.base, **{name: self._runners(m) for name, m in models.items()}}
        runners = {f"{name} {label}": run for name, by_batch in sessions.items()
                   for label, run in by_batch.items()}
        timings = time_interleaved(runners, repeats=repeats, warmup=2)
        for key, timing in timings.items():
            self.seconds[key.rsplit(" ", 1)[1]] += sum(timing.samples)
        return {name: {label: 1.0 / paired_ratios(timings[f"base {label}"],
                                                  timings[f"{name} {label}"])["median"]
                       for label in self.batch_feeds}
                for name in models}

"""Which ONNX Runtime intra-op thread count runs a model fastest on this host, per batch size.

A small model at batch 1 can spend more time waking ORT's worker threads (one hand-off per
parallel kernel, no spin-waiting) than computing: the pruned digits-cnn runs in about 12 us on
one thread and 24 us on two, while at batch 8 two threads win. So the count is measured, not
assumed: every candidate count gets its own session, all are timed interleaved on the same
feeds, and a count below the default (every CPU, ORT's own default) is chosen only when it is
clearly faster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from winnow.measure.timing import (
    available_cpus,
    paired_ratios,
    session_runner,
    time_interleaved,
    timing_session,
)

# A count other than the default must be at least this much faster (median of paired ratios).
MIN_GAIN = 0.05
TUNING_REPEATS = 15

Feeds = Mapping[str, np.ndarray]


def thread_candidates(cpus: int | None = None) -> list[int]:
    """1, 2, 4, ... below the CPUs this process may use, and that count itself (the default)."""
    cpus = available_cpus() if cpus is None else max(1, cpus)
    counts, count = [], 1
    while count < cpus:
        counts.append(count)
        count *= 2
    return counts + [cpus]


@dataclass
class ThreadChoice:
    """The chosen thread count per batch label and the medians (ms) it was chosen from."""

    threads: dict[str, int]
    default: int
    medians_ms: dict[str, dict[int, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the artifact manifest's `runtime` section)."""
        return {"intra_op_num_threads": dict(self.threads), "default_threads": self.default,
                "median_ms": {label: {str(t): round(ms, 5) for t, ms in by.items()}
                              for label, by in self.medians_ms.items()},
                "chosen_when_faster_by": MIN_GAIN}


def fastest_threads(model: Any, feeds_by_label: Mapping[str, Feeds],
                    candidates: Sequence[int] | None = None, repeats: int = TUNING_REPEATS,
                    warmup: int = 3) -> ThreadChoice:
    """Time `model` (a path, ir.Model or bytes: anything `timing_session` takes) at each
    candidate thread count on each batch's feeds, all interleaved, and choose per batch label."""
    counts = sorted(set(candidates or thread_candidates()))
    default = counts[-1]
    sessions = {t: timing_session(model, t) for t in counts}
    runners = {(label, t): session_runner(sessions[t], feeds)
               for label, feeds in feeds_by_label.items() for t in counts}
    timings = time_interleaved(runners, repeats=repeats, warmup=warmup)
    choice = ThreadChoice({}, default)
    for label in feeds_by_label:
        choice.medians_ms[label] = {t: timings[(label, t)].median * 1e3 for t in counts}
        choice.threads[label] = _choose(timings, label, counts, default)
    return choice


def _choose(timings: Mapping[Any, Any], label: str, counts: Sequence[int], default: int) -> int:
    """The default count unless another one is faster by at least MIN_GAIN both in the median
    of paired rounds and in the fastest run: a busy host (another process on the cores) slows
    the many-thread runs of most rounds, but not the fastest, so it cannot pass for a gain."""
    need = 1.0 / (1.0 - MIN_GAIN)
    base = timings[(label, default)]
    best, best_gain = default, need
    for t in counts:
        gain = paired_ratios(base, timings[(label, t)])["median"]
        fastest_gain = base.min / timings[(label, t)].min
        if t != default and gain >= best_gain and fastest_gain >= need:
            best, best_gain = t, gain
    return best


def batch_rows(feeds: Feeds) -> int:
    """The batch of a feed dict: its inputs' largest first axis (1 when all are scalars)."""
    return max((np.shape(v)[0] for v in feeds.values() if np.ndim(v) >= 1), default=1)


def threads_for(runtime: Mapping[str, Any] | None, rows: int, default: int | None = None) -> int:
    """The thread count a manifest's `runtime` section gives for a batch of `rows`: the entry of
    the largest timed batch not above `rows` (else the smallest), or `default` (every CPU)."""
    fallback = available_cpus() if default is None else default
    chosen = (runtime or {}).get("intra_op_num_threads") or {}
    by_rows = sorted((int(label[1:]), int(t)) for label, t in chosen.items()
                     if label[:1] == "b" and label[1:].isdigit())
    if not by_rows:
        return fallback
    below = [t for b, t in by_rows if b <= rows]
    return below[-1] if below else by_rows[0][1]

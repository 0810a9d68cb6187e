"""Measured latency of candidates relative to the source, interleaved with it (A B A B) so a
busy machine slows both alike; the ratio is the median of the per-round ratios."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.measure.timing import (
    available_cpus,
    first_samples,
    paired_ratios,
    session_runner,
    time_interleaved,
    timing_session,
)
from winnow.errors import ExecutionError


class CandidateTimer:
    """Times candidates against one reference session on fixed feeds."""

    def __init__(self, base: ir.Model, feeds: Mapping[str, np.ndarray], batch: int,
                 repeats: int) -> None:
        self.threads = available_cpus()
        self.feeds = first_samples(feeds, batch)
        self.repeats = repeats
        self.base = self._session(base)

    def _session(self, model: ir.Model) -> Any:
        try:
            session = timing_session(model, self.threads)
        except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
            raise ExecutionError(f"ONNX Runtime cannot load a candidate for timing: "
                                 f"{str(exc).splitlines()[0]}") from exc
        return session_runner(session, self.feeds)

    def relative_latency(self, model: ir.Model, repeats: int | None = None) -> float:
        """Candidate latency over the source's (below 1 = faster), median of paired rounds."""
        cand = self._session(model)
        timings = time_interleaved({"base": self.base, "cand": cand},
                                   repeats=repeats or self.repeats, warmup=2)
        return 1.0 / paired_ratios(timings["base"], timings["cand"])["median"]

    def relative_latencies(self, models: Mapping[str, ir.Model], repeats: int) -> dict[str, float]:
        """`relative_latency` of several candidates timed in the same interleaved rounds (a
        head-to-head: the noise of one run moves them all alike)."""
        runners = {"base": self.base, **{name: self._session(m) for name, m in models.items()}}
        timings = time_interleaved(runners, repeats=repeats, warmup=2)
        return {name: 1.0 / paired_ratios(timings["base"], timings[name])["median"]
                for name in models}

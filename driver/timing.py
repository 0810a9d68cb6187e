"""Measured latency of candidates relative to the source, interleaved with it (A B A B) so a
busy machine slows both alike; the ratio is the median of the per-round ratios."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from winnow.benchmark import available_cpus, bench_session_options, paired_ratios, time_interleaved
from winnow.errors import ExecutionError
from winnow.ir.execute import model_bytes


def timing_feeds(feeds: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first `batch` samples of a calibration batch (every input sliced on its first axis)."""
    return {k: (v[:batch] if np.ndim(v) >= 1 else v) for k, v in feeds.items()}


class CandidateTimer:
    """Times candidates against one reference session on fixed feeds."""

    def __init__(self, base: ir.Model, feeds: Mapping[str, np.ndarray], batch: int,
                 repeats: int) -> None:
        self.threads = available_cpus()
        self.feeds = timing_feeds(feeds, batch)
        self.repeats = repeats
        self.base = self._session(base)

    def _session(self, model: ir.Model) -> Any:
        try:
            session = ort.InferenceSession(model_bytes(model), bench_session_options(self.threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
            raise ExecutionError(f"ONNX Runtime cannot load a candidate for timing: "
                                 f"{str(exc).splitlines()[0]}") from exc
        names = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in self.feeds.items() if k in names}
        return lambda: session.run(None, feeds)

    def relative_latency(self, model: ir.Model, repeats: int | None = None) -> float:
        """Candidate latency over the source's (below 1 = faster), median of paired rounds."""
        cand = self._session(model)
        timings = time_interleaved({"base": self.base, "cand": cand},
                                   repeats=repeats or self.repeats, warmup=2)
        return 1.0 / paired_ratios(timings["base"], timings["cand"])["median"]

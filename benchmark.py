"""Speed measurement: warm-up, interleaved runs (A B A B ...), medians, ratios, peak RSS."""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

NOISY_SPREAD = 1.5  # max/min above this marks a timing as noisy


@dataclasses.dataclass
class Timing:
    """Latency samples of one runner, in seconds."""

    name: str
    samples: list[float]

    @property
    def median(self) -> float:
        """Median latency."""
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        """Fastest run."""
        return min(self.samples)

    @property
    def max(self) -> float:
        """Slowest run."""
        return max(self.samples)

    @property
    def noisy(self) -> bool:
        """True when the slowest run is far from the fastest (a busy machine)."""
        return self.max > NOISY_SPREAD * self.min

    def to_dict(self) -> dict[str, Any]:
        """Milliseconds, for reports."""
        return {"name": self.name, "median_ms": self.median * 1e3, "min_ms": self.min * 1e3,
                "max_ms": self.max * 1e3, "runs": len(self.samples), "noisy": self.noisy}


def time_interleaved(runners: Mapping[str, Callable[[], Any]], repeats: int = 20,
                     warmup: int = 3) -> dict[str, Timing]:
    """Time each runner `repeats` times, interleaved round by round, after `warmup` rounds."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            runners[name]()
            samples[name].append(time.perf_counter() - start)
    return {n: Timing(n, s) for n, s in samples.items()}


def paired_ratios(base: Timing, other: Timing) -> dict[str, float]:
    """base/other per interleaved round: the median, min and max speed-up of `other`."""
    ratios = [b / o for b, o in zip(base.samples, other.samples)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


_RSS_SCRIPT = """
import json, resource, sys
import numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = int(sys.argv[2])
sess = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
feeds = dict(np.load(sys.argv[3], allow_pickle=False))
for _ in range(3):
    sess.run(None, feeds)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_rss_mb(model_path: Path, feeds: Mapping[str, np.ndarray], threads: int,
                scratch: Path) -> float:
    """Peak resident memory (MiB) of a fresh process that loads and runs the model."""
    feeds_path = scratch / f"feeds-{abs(hash(str(model_path)))}.npz"
    np.savez(feeds_path, **feeds)
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(model_path), str(threads),
                           str(feeds_path)], capture_output=True, text=True, check=True)
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"])

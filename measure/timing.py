"""Speed measurement: warm-up, interleaved runs (A B A B ...), medians, ratios, peak RSS."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from winnow.errors import ExecutionError

NOISY_SPREAD = 1.5  # max/min above this marks a timing as noisy


@dataclasses.dataclass
class Timing:
    """Latency samples of one runner, in seconds."""

    name: str
    samples: list[float]
    period: int = 1  # runs cycle through this many input groups (`rotating`): run i fed group i % period

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
    def spread(self) -> float:
        """Slowest run over fastest run (1.0 = perfectly steady); with rotated inputs, the widest
        such ratio among runs of one input group (inputs of other lengths take other times),
        over all runs when no group ran twice."""
        same_input = [g for g in (self.samples[r::self.period] for r in range(self.period))
                      if len(g) > 1] if self.period > 1 else []
        groups = same_input or [self.samples]
        return max((max(g) / min(g) if min(g) > 0 else float("inf")) for g in groups)

    @property
    def noisy(self) -> bool:
        """True when the slowest run is far from the fastest on the same inputs (a busy
        machine)."""
        return self.spread > NOISY_SPREAD

    def noise_warning(self) -> str | None:
        """A plain one-line warning when the timing is noisy, else None."""
        if not self.noisy:
            return None
        return (f"warning: {self.name} timings are noisy: the slowest run on the same inputs is "
                f"{self.spread:.1f}x the fastest (all runs: {self.min * 1e3:.3g} to "
                f"{self.max * 1e3:.3g} ms); the machine is busy "
                "or throttling; close other programs or raise --repeats.")

    def to_dict(self) -> dict[str, Any]:
        """Milliseconds, for reports."""
        return {"name": self.name, "median_ms": self.median * 1e3, "min_ms": self.min * 1e3,
                "max_ms": self.max * 1e3, "runs": len(self.samples), "noisy": self.noisy}


def bench_session_options(threads: int = 0) -> Any:
    """ORT session options for timing: all graph optimizations, `threads` intra-op threads, and
    no spin-waiting, so a session's idle threads never steal the cores of the runner timed next
    (interleaved runs would otherwise measure each other's spinning)."""
    from winnow.ir.execute import session_options

    options = session_options(threads, optimize=True)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def first_samples(feeds: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first `batch` samples of a batch of feeds (every input sliced on its first axis)."""
    return {k: (v[:batch] if np.ndim(v) >= 1 else v) for k, v in feeds.items()}


def timing_session(model: Any, threads: int | None = None) -> Any:
    """The ORT CPU session every winnow timer uses (`winnow bench`, the driver, the bench scripts):
    `bench_session_options`, `threads` intra-op threads (default: the CPUs this process may use).

    `model` is an ir.Model, an onnx.ModelProto, ONNX bytes or a path to a .onnx/.ort file.
    """
    import onnxruntime as ort

    from winnow.ir.execute import model_bytes

    if isinstance(model, (str, Path)):
        source: Any = str(model)
    else:
        source = model if isinstance(model, bytes) else model_bytes(model)
    options = bench_session_options(available_cpus() if threads is None else threads)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def session_runner(session: Any, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
    """A no-argument runner of `session` on the feeds it takes (extra feeds are left out)."""
    names = {i.name for i in session.get_inputs()}
    own = {k: v for k, v in feeds.items() if k in names}
    return lambda: session.run(None, own)


def rotating(run: Callable[[Any], Any], groups: Sequence[Any]) -> Callable[[], Any]:
    """A runner that feeds `run` the next group on each call: every variant is called once per
    interleaved round, so in each round all of them run the same samples (paired ratios stay
    fair) while the rounds cover samples of every length, not one."""
    calls = itertools.count()
    return lambda: run(groups[next(calls) % len(groups)])


def latency_ratio(base: Any, candidate: Any, feeds: Mapping[str, np.ndarray], repeats: int = 20,
                  warmup: int = 3, threads: int | None = None) -> dict[str, float]:
    """Speed-up of `candidate` over `base` (median, min, max of base/candidate per round), both in
    `timing_session`s on the same feeds, timed interleaved: the same measurement as `winnow bench
    A --vs B` makes on two artifacts."""
    runners = {"base": session_runner(timing_session(base, threads), feeds),
               "cand": session_runner(timing_session(candidate, threads), feeds)}
    timings = time_interleaved(runners, repeats=repeats, warmup=warmup)
    return paired_ratios(timings["base"], timings["cand"])


def time_interleaved(runners: Mapping[str, Callable[[], Any]], repeats: int = 20,
                     warmup: int = 3, desc: str | None = None, period: int = 1
                     ) -> dict[str, Timing]:
    """Time each runner `repeats` times, interleaved round by round, after `warmup` rounds.

    Rounds alternate the order (A B C, then C B A) so no runner always follows the same one.
    `desc` shows a progress bar over the rounds; `period` is the number of input groups the
    runners rotate through (`rotating`), so noise is judged among runs on the same inputs.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}.")
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    rounds: Any = range(repeats)
    if desc is not None:
        from winnow.progress import bar

        rounds = bar(rounds, desc, total=repeats)
    for round_index in rounds:
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            runners[name]()
            samples[name].append(time.perf_counter() - start)
    return {n: Timing(n, s, period) for n, s in samples.items()}


def paired_ratios(base: Timing, other: Timing) -> dict[str, float]:
    """base/other per interleaved round: the median, min and max speed-up of `other`."""
    ratios = [b / o for b, o in zip(base.samples, other.samples)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


_RSS_SCRIPT = """
import json, resource, sys
import numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = int(sys.argv[2])
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
sess = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
feeds = dict(np.load(sys.argv[3], allow_pickle=False))
for _ in range(3):
    sess.run(None, feeds)
try:  # VmHWM: this process image's own peak (ru_maxrss keeps the parent's across fork+exec)
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    peak_kib = float(status.split()[0])
except (OSError, IndexError, ValueError):
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_rss_mb": peak_kib / 1024}))
"""


def peak_rss_mb(model_path: Path, feeds: Mapping[str, np.ndarray], threads: int,
                scratch: Path) -> float:
    """Peak resident memory (MiB) of a fresh process that loads and runs the model.

    The figure includes the interpreter, numpy and ONNX Runtime themselves (about 50-100 MiB).
    """
    feeds_path = scratch / f"feeds-{abs(hash(str(model_path)))}.npz"
    np.savez(feeds_path, **feeds)
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(model_path), str(threads),
                           str(feeds_path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ExecutionError(f"measuring the memory of '{model_path}' failed in a fresh process: "
                             f"{reason}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def available_cpus() -> int:
    """CPUs this process may run on (the default thread count of `winnow bench`)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, OS and the versions that decide the numbers (for result files)."""
    import onnxruntime

    info: dict[str, Any] = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(),
                            "available_cpus": available_cpus(), "machine": platform.machine(),
                            "load_average": _load_average(),
                            "os": f"{platform.system()} {platform.release()}",
                            "python": platform.python_version(), "numpy": np.__version__,
                            "onnxruntime": onnxruntime.__version__}
    for name in ("torch", "onnx"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover - both are dependencies
            info[name] = None
    from winnow import __version__

    info["winnow"] = __version__
    return info

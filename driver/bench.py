"""`winnow bench`: time one artifact, or two interleaved, on feeds built from the manifest."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from winnow.measure.timing import (
    Timing,
    paired_ratios,
    peak_rss_mb,
    rotating,
    time_interleaved,
    timing_session,
)
from winnow.errors import ExecutionError, SourceError, UnsupportedModelError
from winnow.measure.threads import batch_rows, threads_for
from winnow.ir.user_inputs import UserInputs

DEFAULT_SEQ = 64  # symbolic non-batch dims of random feeds when --seq is not given
INT_HIGH = 100  # random integer inputs (token ids, indices) are drawn from [0, INT_HIGH)
FEED_SEED = 0

Spec = Mapping[str, Any]


def _dims(spec: Spec, batch: int, seq: int) -> list[int]:
    """The concrete shape of one input: symbolic first dim = batch, other symbolic dims = seq."""
    shape = spec.get("shape")
    if shape is None:
        raise UnsupportedModelError(f"input '{spec['name']}' has no known rank in the manifest; "
                                    "winnow bench cannot build feeds for it.")
    return [d if isinstance(d, int) and d >= 0 else (batch if axis == 0 else seq)
            for axis, d in enumerate(shape)]


def _dtype(spec: Spec) -> np.dtype:
    try:
        return np.dtype(spec.get("dtype") or "float32")
    except TypeError:
        raise UnsupportedModelError(f"input '{spec['name']}' has dtype '{spec.get('dtype')}', "
                                    "which winnow bench cannot generate.") from None


def random_feeds(specs: Sequence[Spec], batch: int = 1, seq: int = DEFAULT_SEQ,
                 seed: int = FEED_SEED) -> dict[str, np.ndarray]:
    """Feeds for manifest input specs: floats ~ N(0, 1), int masks all ones, other ints in [0, 100)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape, dtype, name = _dims(spec, batch, seq), _dtype(spec), spec["name"]
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_ or (np.issubdtype(dtype, np.integer) and "mask" in name.lower()):
            feeds[name] = np.ones(shape, dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[name] = rng.integers(0, INT_HIGH, shape).astype(dtype)
        else:
            raise UnsupportedModelError(f"input '{name}' has dtype '{dtype}', which winnow bench "
                                        "cannot generate.")
    return feeds


def _symbolic(spec: Spec, axis: int) -> bool:
    shape = spec.get("shape") or []
    return axis < len(shape) and not (isinstance(shape[axis], int) and shape[axis] >= 0)


def zoo_feeds(name: str, specs: Sequence[Spec], batch: int = 1,
              seq: int | None = None, start: int = 0) -> dict[str, np.ndarray]:
    """`batch` held-out samples of zoo model `name` from sample `start` on (wrapping around when
    it has fewer).

    `seq` crops symbolic second axes (never pads: real data is not invented).
    """
    from winnow import models_zoo

    batches = models_zoo.get(name).heldout()
    missing = [s["name"] for s in specs if s["name"] not in batches[0]]
    if missing:
        raise SourceError(f"the held-out data of zoo:{name} has no input(s) "
                          f"{', '.join(missing)}; pass --random-feeds.")
    feeds = {}
    for spec in specs:
        full = np.concatenate([b[spec["name"]] for b in batches])
        picked = (start + np.arange(batch)) % len(full) if full.ndim else None
        rows = np.take(full, picked, axis=0) if full.ndim else full
        if seq is not None and full.ndim >= 2 and _symbolic(spec, 1):
            if seq > rows.shape[1]:
                raise SourceError(f"the held-out data of zoo:{name} has sequence length "
                                  f"{rows.shape[1]} for '{spec['name']}'; choose --seq "
                                  f"{rows.shape[1]} or less, or pass --random-feeds.")
            rows = rows[:, :seq]
        feeds[spec["name"]] = np.ascontiguousarray(rows.astype(_dtype(spec), copy=False))
    return feeds


def feed_groups(manifest: Mapping[str, Any], batch: int = 1, seq: int | None = None,
                random: bool = False, user_inputs: UserInputs | None = None, rotate: int = 1
                ) -> tuple[list[dict[str, np.ndarray]], str]:
    """`rotate` consecutive groups of `batch` zoo held-out samples to time in turn (one group
    for other feeds, which do not vary), and the description of `build_feeds`."""
    feeds, description = build_feeds(manifest, batch, seq, random, user_inputs)
    source = str(manifest.get("source") or "")
    if rotate <= 1 or user_inputs is not None or random or not source.startswith("zoo:"):
        return [feeds], description
    specs = manifest.get("inputs") or []
    groups = [feeds] + [zoo_feeds(source[4:], specs, batch, seq, i * batch)
                        for i in range(1, rotate)]
    return groups, f"{description}, {rotate} groups of {batch} in turn"


def build_feeds(manifest: Mapping[str, Any], batch: int = 1, seq: int | None = None,
                random: bool = False, user_inputs: UserInputs | None = None
                ) -> tuple[dict[str, np.ndarray], str]:
    """Feeds for an artifact and a description: the inputs the user gave (--input-shapes /
    --example-inputs), else zoo held-out data when the source is zoo:NAME, else random data."""
    specs = manifest.get("inputs") or []
    if user_inputs is not None:
        return user_inputs.feeds(specs, FEED_SEED), user_inputs.origin
    source = str(manifest.get("source") or "")
    if source.startswith("zoo:") and not random:
        return zoo_feeds(source[4:], specs, batch, seq), f"{source} held-out data"
    return (random_feeds(specs, batch, DEFAULT_SEQ if seq is None else seq),
            f"random (seed {FEED_SEED}; floats N(0,1), int masks ones, ints in [0, {INT_HIGH}))")


def open_session(model_path: Path, threads: int) -> Any:
    """The timing session (benchmark.timing_session) of an artifact's model, its external data checked."""
    import onnx

    from winnow.frontend.onnx_file import check_external_data

    check_external_data(onnx.load(str(model_path), load_external_data=False), model_path.parent)
    try:
        return timing_session(model_path, threads)
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        raise ExecutionError(f"ONNX Runtime cannot load '{model_path}': "
                             f"{str(exc).strip().splitlines()[0]}") from None


@dataclasses.dataclass
class Bench:
    """One artifact under test: its folder, manifest, model file, session and its thread count."""

    label: str
    path: Path
    manifest: dict[str, Any]
    model_path: Path
    session: Any
    threads: int

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[Any]:
        """Run once; a failure names the artifact."""
        try:
            return self.session.run(None, dict(feeds))
        except Exception as exc:  # noqa: BLE001
            raise ExecutionError(f"ONNX Runtime failed to run '{self.path}' on the benchmark "
                                 f"feeds: {str(exc).strip().splitlines()[0]}") from None


def _artifact(path: str | Path) -> tuple[Any, Path]:
    """An ORT artifact (manifest checked) and its model file; other artifacts are refused."""
    from winnow.backends.ort import MODEL_FILE, load_artifact

    artifact = load_artifact(path)
    model_path = artifact.path / MODEL_FILE
    if artifact.manifest.get("backend", "ort") != "ort":
        raise UnsupportedModelError(f"'{path}' is a {artifact.manifest['backend']} artifact; winnow "
                                    "bench times ONNX Runtime artifacts (time TVM libraries with "
                                    "bench/tvm.py).")
    if not model_path.is_file():
        raise SourceError(f"artifact '{path}' has no {MODEL_FILE}; winnow bench times ONNX "
                          "Runtime artifacts.")
    return artifact, model_path


def _open(label: str, artifact: Any, model_path: Path, threads: int) -> Bench:
    return Bench(label, artifact.path, artifact.manifest, model_path,
                 open_session(model_path, threads), threads)


def _check_inputs(bench: Bench, feeds: Mapping[str, np.ndarray], first: Bench) -> None:
    names = [i.name for i in bench.session.get_inputs()]
    if sorted(names) != sorted(feeds):
        raise ExecutionError(f"'{bench.path}' takes input(s) {', '.join(names) or 'none'} but "
                             f"'{first.path}' takes {', '.join(feeds) or 'none'}; --vs needs "
                             "two artifacts with the same inputs.")


@dataclasses.dataclass
class BenchResult:
    """What `winnow bench` measured: settings, feeds, per-artifact timings, ratio, memory."""

    settings: dict[str, Any]
    inputs: list[dict[str, Any]]
    artifacts: list[dict[str, Any]]
    timings: dict[str, Timing]
    ratio: dict[str, float] | None
    agreement: dict[str, Any] | None
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The `--json` output."""
        return {"settings": self.settings, "inputs": self.inputs, "artifacts": self.artifacts,
                "ratio": self.ratio, "agreement": self.agreement, "warnings": self.warnings}

    def table(self) -> str:
        """A plain-text table for people."""
        s = self.settings
        shapes = ", ".join(f"{i['name']} {i['dtype']} {i['shape']}" for i in self.inputs)
        lines = [f"feeds     {s['feeds']}: {shapes or 'no inputs'}",
                 f"settings  {_threads_text(s['threads'])}, all ORT graph optimizations, "
                 f"no spin-waiting, {s['warmup']} warm-up + {s['repeats']} timed runs each"
                 f"{', interleaved' if len(self.artifacts) > 1 else ''}", ""]
        lines.append(f"{'':<3}{'median ms':>11}{'min ms':>10}{'max ms':>10}{'peak RSS MB':>13}"
                     "  artifact")
        for a in self.artifacts:
            rss = "-" if a["peak_rss_mb"] is None else f"{a['peak_rss_mb']:.1f}"
            mark = "  (noisy)" if a["noisy"] else ""
            lines.append(f"{a['label']:<3}{a['median_ms']:>11.3f}{a['min_ms']:>10.3f}"
                         f"{a['max_ms']:>10.3f}{rss:>13}  {a['path']}{mark}")
        if self.ratio is not None:
            r = self.ratio
            if abs(r["speedup"] - 1) < 0.03:
                verdict = "A and B are within 3% of each other"
            elif r["speedup"] > 1:
                verdict = f"A is {r['speedup']:.2f}x faster than B"
            else:
                verdict = f"A is {1 / r['speedup']:.2f}x slower than B"
            lines += ["", f"A/B latency ratio {r['median']:.3f} (median of {r['pairs']} paired "
                          f"runs; min {r['min']:.3f}, max {r['max']:.3f}): {verdict}"]
        if self.agreement is not None:
            ag = self.agreement
            if ag.get("min_cosine") is not None:
                lines.append(f"outputs   A vs B on these feeds: min cosine "
                             f"{ag['min_cosine']:.6f}, max abs error {ag['max_abs_error']:.3g}")
            elif ag.get("error"):
                lines.append(f"outputs   A vs B not comparable: {ag['error']}")
        return "\n".join(lines)


def _threads_text(threads: Mapping[str, int]) -> str:
    counts = set(threads.values())
    if len(counts) == 1:
        (count,) = counts
        return f"{count} thread{'s' if count > 1 else ''}"
    return "threads " + ", ".join(f"{label} {count}" for label, count in threads.items())


def bench(artifact: str | Path, other: str | Path | None = None, *, threads: int | None = None,
          batch: int = 1, seq: int | None = None, repeats: int = 20, warmup: int = 5,
          random: bool = False, memory: bool = True,
          user_inputs: UserInputs | None = None, rotate: int = 16) -> BenchResult:
    """Time `artifact` (and `other`, interleaved A B A B ...) on the same feeds.

    Each artifact runs at `threads` ORT intra-op threads, by default at the count its manifest
    records for this batch (measured at compile), else every CPU. Feeds come from A's manifest: the zoo's held-out data for `zoo:NAME` sources (unless
    `random`), `rotate` groups of `batch` samples timed in turn (each round both artifacts run
    the same group), so samples of every length count; random data shaped by the input specs
    otherwise; `user_inputs` (--input-shapes / --example-inputs) replace both, and `batch`/`seq`
    then do not apply. Peak RSS is measured afterwards (first group), each artifact in a fresh
    process.
    """
    for name, value in (("batch", batch), ("repeats", repeats), ("rotate", rotate)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}.")
    loaded = [_artifact(artifact)] + ([_artifact(other)] if other is not None else [])
    groups, description = feed_groups(loaded[0][0].manifest, batch, seq, random, user_inputs,
                                      rotate)
    feeds = groups[0]
    benches = [_open(label, art, model_path,
                     threads or threads_for(art.manifest.get("runtime"), batch_rows(feeds)))
               for label, (art, model_path) in zip("AB", loaded)]
    for b in benches[1:]:
        _check_inputs(b, feeds, benches[0])
    outputs = [b.run(feeds) for b in benches]  # fails early, with a clear message
    timings = time_interleaved({b.label: rotating(b.run, groups) for b in benches},
                               repeats=repeats, warmup=warmup, desc="timing", period=len(groups))
    rss: dict[str, float | None] = {b.label: None for b in benches}
    if memory:
        from winnow.progress import step

        with step("measuring peak memory in fresh processes"), \
                tempfile.TemporaryDirectory(prefix="winnow-bench-") as scratch:
            for b in benches:
                rss[b.label] = peak_rss_mb(b.model_path, feeds, b.threads, Path(scratch))
    artifacts = [{"label": b.label, "path": str(b.path), "source": b.manifest.get("source"),
                  "pipeline": b.manifest.get("pipeline"), **timings[b.label].to_dict(),
                  "spread": timings[b.label].spread, "peak_rss_mb": rss[b.label]}
                 for b in benches]
    for a in artifacts:
        a.pop("name", None)
    ratio = agreement = None
    if len(benches) == 2:
        r = paired_ratios(timings["A"], timings["B"])  # A latency / B latency, per round
        speed = paired_ratios(timings["B"], timings["A"])
        ratio = {**r, "pairs": repeats, "speedup": speed["median"]}
        agreement = _agreement(benches, outputs)
    warnings = [w for w in (timings[b.label].noise_warning() for b in benches) if w]
    settings = {"threads": {b.label: b.threads for b in benches},
                "threads_from": "--threads" if threads else "each artifact's manifest (tuned at "
                                "compile; every CPU when it records none)",
                "batch": batch if user_inputs is None else None,
                "seq": _seq_used(feeds, benches[0].manifest),
                "repeats": repeats, "warmup": warmup, "feeds": description,
                "feed_groups": len(groups),
                "graph_optimization": "all", "spin_wait": False}
    inputs = [{"name": k, "dtype": v.dtype.name, "shape": list(v.shape)} for k, v in feeds.items()]
    return BenchResult(settings, inputs, artifacts, timings, ratio, agreement, warnings)


def _seq_used(feeds: Mapping[str, np.ndarray], manifest: Mapping[str, Any]) -> int | None:
    """The size given to symbolic non-batch dims (None when the model has none)."""
    for spec in manifest.get("inputs") or []:
        for axis in range(1, len(spec.get("shape") or [])):
            if _symbolic(spec, axis) and spec["name"] in feeds:
                return int(feeds[spec["name"]].shape[axis])
    return None


def _agreement(benches: Sequence[Bench], outputs: Sequence[list[Any]]) -> dict[str, Any]:
    from winnow.driver.compile import compare_outputs

    named = [dict(zip([o.name for o in b.session.get_outputs()], outs))
             for b, outs in zip(benches, outputs)]
    result = compare_outputs(named[0], named[1])
    result.pop("outputs", None)
    return result

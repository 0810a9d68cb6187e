"""TVM latency table: TVM with no schedules, with TVM's dlight CPU rules, with winnow's rules, and
ONNX Runtime, per zoo model, all timed interleaved in one run on the same feeds; with
--tune-trials N also TVM tuned by MetaSchedule (N trials, the database kept under --tuning-dir
and reused, so a second run does not tune again; the tuning seconds are printed), without it
TVM with the tuning databases shipped in backends/tvm_databases where they match the model.

Each model is bound to fixed shapes (batch 1; MiniLM sequence 128), optimized by onnxscript, and
the same shape-bound ONNX is what ORT runs and what TVM imports, so every column computes the same
function (max abs error vs ORT is printed). Columns: median ms (min-max), ratio to ORT (median of
paired per-round ratios), build seconds. Markdown printed and saved under bench/results/.

    python bench/tvm.py [--models digits-cnn,digits-vit,minilm] [--repeats 20] [--seq 128]
                        [--tune-trials N] [--tuning-dir DIR] [--tune-timeout S]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Idle TVM workers sleep instead of spinning, as ORT's timing sessions do (allow_spinning=0), so
# no runner's threads steal the cores of the one timed next.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
# Run as a script, this file's folder leads sys.path and its name would shadow the tvm package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import datetime  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = ("digits-cnn", "digits-vit", "minilm")
VARIANTS = {"TVM no schedules": "none", "TVM dlight (TVM's CPU rules)": "dlight",
            "TVM winnow rules": "winnow"}


def bound_model(name: str, seq: int) -> tuple[Any, dict[str, np.ndarray]]:
    """The zoo model bound to batch 1 (and `seq` tokens), and random feeds of those shapes."""
    from winnow.backends import tvm as tvm_backend
    from winnow.backends.manifest import io_spec
    from winnow.driver.bench import random_feeds
    from winnow.frontend import load

    model = load(f"zoo:{name}")
    specs = io_spec(model)["inputs"]
    shapes = {s["name"]: [d if isinstance(d, int) else (1 if axis == 0 else seq)
                          for axis, d in enumerate(s["shape"])] for s in specs}
    bound = tvm_backend.prepare(model, shapes)
    return bound, random_feeds(io_spec(bound)["inputs"])


def tvm_runner(bound: Any, feeds: dict[str, np.ndarray], schedules: str,
               database: Any = None, report: dict[str, Any] | None = None) -> tuple[Any, float]:
    """A no-argument runner of the TVM build with `schedules` (and a tuning database's schedules
    for the kernels it holds, named in `report['kernels_applied']`), and its build seconds."""
    import tvm
    from tvm import relax

    from winnow.backends import tvm as tvm_backend

    start = time.perf_counter()
    executable = tvm_backend.build(tvm_backend.to_relax(bound),
                                   tvm_backend.resolve_target("host"), schedules, database,
                                   report)
    seconds = time.perf_counter() - start
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[v.name]) for v in bound.graph.inputs]
    main = vm["main"]
    return (lambda: main(*args)), seconds


def max_error(runner: Any, reference: list[np.ndarray]) -> float:
    """Largest abs difference of the runner's outputs from ORT's."""
    from winnow.backends.tvm import vm_outputs

    return max(float(np.max(np.abs(o - r))) for o, r in zip(vm_outputs(runner()), reference))


def tuned_database(bound: Any, folder: Path, trials: int,
                   timeout: float) -> tuple[Any, dict[str, Any]]:
    """Tune `bound`'s kernels into `folder` (only those it holds no record for; winnow's rule
    schedule of each timed beside the search's) and return that database with what tuning did."""
    from winnow.backends import tvm as tvm_backend
    from winnow.backends import tvm_tuning

    target = tvm_backend.resolve_target("host")
    lowered = tvm_backend.lower(tvm_backend.to_relax(bound), target)
    tvm_target = tvm_backend._tvm_target(target)
    info = tvm_tuning.tune(lowered, tvm_target, folder,
                           tvm_tuning.TuneOptions(trials, builder_timeout=timeout),
                           tvm_backend._schedule_rules("winnow"))
    database = tvm_tuning.union_database([folder])
    info["kernels_searched"] = (0 if database is None else tvm_tuning.searched_kernels(
        lowered, tvm_target, database, tvm_backend._schedule_rules("winnow")))
    return database, info


def add_packaged(runners: dict[str, Any], builds: dict[str, float], errors: dict[str, float],
                 bound: Any, feeds: dict[str, np.ndarray], reference: list[np.ndarray]) -> None:
    """Add the variant built with the tuning databases shipped in the package (what
    `winnow compile --backend tvm` applies), when they hold records for this model's kernels."""
    from winnow.backends import tvm as tvm_backend
    from winnow.backends import tvm_tuning

    cpu = tvm_backend.resolve_target("host").tvm.get("mcpu")
    database = tvm_tuning.union_database(tvm_tuning.packaged_databases(), cpu)
    if database is None:
        return
    report: dict[str, Any] = {}
    runner, seconds = tvm_runner(bound, feeds, "winnow", database, report)
    applied = report.get("kernels_applied", [])
    if applied:
        label = f"TVM tuned (packaged database, {len(applied)} kernels applied)"
        runners[label], builds[label] = runner, seconds
        errors[label] = max_error(runner, reference)


def bench_model(name: str, seq: int, repeats: int, tune: dict[str, Any] | None = None
                ) -> list[list[str]]:
    """One table row per variant of zoo model `name` (with `tune`: trials, dir, timeout)."""
    from winnow.measure.timing import paired_ratios, session_runner, time_interleaved, timing_session

    bound, feeds = bound_model(name, seq)
    session = timing_session(bound)
    reference = session.run(None, feeds)
    runners, builds, errors = {"ORT": session_runner(session, feeds)}, {"ORT": 0.0}, {"ORT": 0.0}
    for label, schedules in VARIANTS.items():
        runners[label], builds[label] = tvm_runner(bound, feeds, schedules)
        errors[label] = max_error(runners[label], reference)
    if tune:
        shape_tag = "-".join("x".join(map(str, v.shape)) for v in feeds.values())
        database, info = tuned_database(bound, Path(tune["dir"]) / f"{name}-{shape_tag}",
                                        tune["trials"], tune["timeout"])
        report: dict[str, Any] = {}
        runner, build_seconds = tvm_runner(bound, feeds, "winnow", database, report)
        label = (f"TVM tuned ({tune['trials']} trials, {len(report.get('kernels_applied', []))}/"
                 f"{info['kernels']} kernels applied, {info['kernels_searched']} of them "
                 f"searched, tuned {info['seconds']:.0f} s now)")
        runners[label], builds[label] = runner, build_seconds
        errors[label] = max_error(runners[label], reference)
    else:
        add_packaged(runners, builds, errors, bound, feeds, reference)
    shape = " ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in feeds.items())
    timings = time_interleaved(runners, repeats=repeats, warmup=2, desc=name)
    rows = []
    for label, timing in timings.items():
        ratio = paired_ratios(timings["ORT"], timing)["median"] if label != "ORT" else 1.0
        rows.append([name, shape, label, f"{timing.median * 1e3:.2f} ({timing.min * 1e3:.2f}-"
                     f"{timing.max * 1e3:.2f})", f"{1 / ratio:.2f}x",
                     f"{builds[label]:.1f}" if label != "ORT" else "-", f"{errors[label]:.1e}"])
    return rows


def markdown(rows: list[list[str]]) -> str:
    """The table as markdown."""
    head = ["model", "feeds", "variant", "median ms (min-max)", "time / ORT", "build s",
            "max abs err vs ORT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse options, time every model, print and save the table."""
    from winnow.measure.timing import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seq", type=int, default=128, help="MiniLM's sequence length")
    parser.add_argument("--tune-trials", type=int, default=0,
                        help="add a MetaSchedule-tuned variant with N trials per model")
    parser.add_argument("--tuning-dir", default=str(Path.home() / ".cache/winnow/tvm-tuning"),
                        help="where the tuning databases are kept (one folder per model+shape)")
    parser.add_argument("--tune-timeout", type=float, default=120.0,
                        help="seconds each candidate's build may take")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    tune = ({"trials": args.tune_trials, "dir": args.tuning_dir, "timeout": args.tune_timeout}
            if args.tune_trials > 0 else None)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args.seq, args.repeats, tune)
    info = machine_info()
    text = (f"# TVM vs ORT ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)\n\n"
            f"host: {info}\n\ncommand: python bench/tvm.py {' '.join(sys.argv[1:])}\n\n"
            + markdown(rows) + "\n")
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"tvm-{datetime.datetime.now(datetime.UTC):%Y-%m-%d-%H%M}.md"
        path.write_text(text)
        print(f"saved {path}")


if __name__ == "__main__":
    main()

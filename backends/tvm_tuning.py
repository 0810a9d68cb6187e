"""MetaSchedule tuning for the TVM backend: tune a model's kernels within a trial budget, keep the
records in a JSON database (in the artifact folder, so a second compile reuses them), and apply a
database's schedules to every kernel whose workload it holds.

The kernels tuned are the fused PrimFuncs of the backend's own lowering (layout passes, library
dispatch, legalization and fusion), so a record found here matches the kernel `build` schedules.
Kernels no record matches keep winnow's schedule rules. The databases of the small zoo models
ship with the package (`backends/tvm_databases/<model>-<shapes>/`, each kernel's best record,
gzipped); `build` applies them, on the CPU they were measured on, when a kernel matches, so
tests, benchmarks and the demo never tune.

The search replays random traces of MetaSchedule's design space (`replay-trace`), one round of
`trials / kernels` candidates per kernel, each built and timed, and winnow's rule schedule of
each kernel is timed beside them, so a searched schedule is applied only where it measured
faster: the evolutionary search's learned cost model (XGBoost, a heavy extra package) needs far
more trials than a 2-core host affords.

MetaSchedule imports `tvm.s_tir.tensor_intrin` in the tuner and in every builder process. TVM's
script decorator calls `inspect.stack()` for each of its few hundred intrinsics, which resolves
every frame's module and source file: about 150-300 s on a 2-core host, inside the first build's
timeout, so every candidate failed (1e10 s) and no record was ever valid to apply. The import now
runs once per process with a frame walk that keeps what the decorator reads (frames, their locals,
each one's source line), about 12 s, in the builder pool's initializer outside any build's timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import inspect
import json
import linecache
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

__all__ = ["TUNING_DIR", "PACKAGED_DIR", "DEFAULT_BUILDER_TIMEOUT", "TuneOptions", "open_database",
           "packaged_databases", "record_count", "valid_record_count", "extract_tasks", "tune",
           "union_database", "import_tensor_intrinsics", "package_database", "searched_kernels"]

TUNING_DIR = "tuning"  # in an artifact folder: MetaSchedule's workload.json and tuning_record.json
PACKAGED_DIR = Path(__file__).resolve().parent / "tvm_databases"  # the zoo models' databases
WORKLOAD_FILE, RECORD_FILE = "workload.json", "tuning_record.json"
DEFAULT_BUILDER_TIMEOUT = 120.0  # MetaSchedule's 30 s is too short for a loaded 2-core host
FAILED_SECONDS = 1e9  # MetaSchedule records a failed candidate as 1e10 s


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    """A tuning budget: `trials` candidates measured over all kernels (or only over the kernels
    named in `kernels`), each build given `builder_timeout` seconds, and the search's seed."""

    trials: int
    builder_timeout: float = DEFAULT_BUILDER_TIMEOUT
    seed: int = 0
    kernels: tuple[str, ...] = ()  # only these kernels, searched again even where held


def open_database(folder: str | Path) -> Any:
    """The JSON database in `folder` (created, empty, when the files do not exist)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(folder / WORKLOAD_FILE),
                                    path_tuning_record=str(folder / RECORD_FILE))


def _lines(folder: str | Path, name: str) -> list[str]:
    """The non-empty lines of database file `name` in `folder`, read from `name` or, for a
    packaged database, its gzip `name.gz`; none when neither exists."""
    path = Path(folder) / name
    if path.exists():
        text = path.read_text()
    elif path.with_name(name + ".gz").exists():
        text = gzip.decompress(path.with_name(name + ".gz").read_bytes()).decode()
    else:
        return []
    return [line for line in text.splitlines() if line.strip()]


def record_count(folder: str | Path) -> int:
    """How many tuning records the database in `folder` holds (0 when it has none)."""
    return len(_lines(folder, RECORD_FILE))


def valid_record_count(folder: str | Path) -> int:
    """How many of the database's records hold a measured time (a failed build or run is
    recorded as 1e10 s and is never applied)."""
    times = [json.loads(line)[1][1] for line in _lines(folder, RECORD_FILE)]
    return sum(1 for t in times if t and any(s < FAILED_SECONDS for s in t))


def packaged_databases() -> list[Path]:
    """The folders of the databases committed with the package."""
    if not PACKAGED_DIR.is_dir():
        return []
    return sorted(p for p in PACKAGED_DIR.iterdir() if record_count(p))


def _read_only(folder: Path, cpu: str | None = None) -> Any:
    """A database loaded from `folder`'s files without writing to them (a packaged database may
    sit in a read-only install); with `cpu`, only the records measured on that CPU (`mcpu`)."""
    db = ms.database.MemoryDatabase()
    parsed = [ms.database.Workload.from_json(json.loads(line))
              for line in _lines(folder, WORKLOAD_FILE)]
    for line in _lines(folder, RECORD_FILE):
        index, record = json.loads(line)
        if cpu is not None and (record[2] or {}).get("mcpu") != cpu:
            continue
        workload = db.commit_workload(parsed[index].mod)
        db.commit_tuning_record(ms.database.TuningRecord.from_json(record, workload))
    return db


def union_database(folders: list[Path], cpu: str | None = None) -> Any | None:
    """One database answering from every folder's records (the fastest record wins; with `cpu`,
    only records measured on that CPU), or None when none has any."""
    dbs = [_read_only(f, cpu) for f in folders if record_count(f)]
    if not dbs:
        return None
    return dbs[0] if len(dbs) == 1 else ms.database.UnionDatabase(*dbs)


def tuning_target(target: Any) -> Any:
    """`target` with the core count MetaSchedule's search needs (this machine's physical cores)."""
    config = {k: v for k, v in dict(target.export()).items() if k not in ("keys", "tag")}
    return tvm.target.Target({**config, "num-cores": ms.utils.cpu_count(logical=False)})


def extract_tasks(kernels: Any, target: Any) -> list[Any]:
    """The tuning tasks of a lowered module: one per distinct fused kernel."""
    return list(ms.relax_integration.extract_tasks(kernels, tuning_target(target)))


def matched(kernels: Any, target: Any, database: Any) -> int:
    """How many of the lowered module's kernels `database` holds a record for."""
    tasks = extract_tasks(kernels, target)
    return len(tasks) - len(_untuned(tasks, database))


def _untuned(tasks: list[Any], database: Any) -> list[Any]:
    """The tasks `database` holds no record for."""
    return [t for t in tasks  # a UnionDatabase answers queries only, not has_workload
            if database.query_tuning_record(t.dispatched[0], t.target, t.task_name) is None]


def _frame_infos(frame: Any) -> list[inspect.FrameInfo]:
    """`inspect.stack()` from `frame` outwards, each frame with its one source line, without the
    module and source-file lookups that make `inspect.stack` slow."""
    infos = []
    while frame is not None:
        code = frame.f_code
        line = linecache.getline(code.co_filename, frame.f_lineno, frame.f_globals)
        infos.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                       [line] if line else None, 0 if line else None))
        frame = frame.f_back
    return infos


@contextlib.contextmanager
def _fast_stack() -> Iterator[None]:
    """`inspect.stack` answered by `_frame_infos` while the block runs."""
    original = inspect.stack
    inspect.stack = lambda context=1: _frame_infos(sys._getframe(1))
    try:
        yield
    finally:
        inspect.stack = original


def import_tensor_intrinsics() -> None:
    """Import `tvm.s_tir.tensor_intrin` (MetaSchedule's tuner and builds need it) with the fast
    frame walk; a no-op once imported."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with _fast_stack():
        import tvm.s_tir.tensor_intrin  # noqa: F401


@contextlib.contextmanager
def _quiet_logs(work_dir: str) -> Iterator[None]:
    """MetaSchedule's per-task logs go to files in `work_dir`, not to the terminal."""
    import logging

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate


@derived_object
class PooledBuilder(ms.builder.PyBuilder):
    """MetaSchedule's LocalBuilder with one worker pool for the whole tuning run. LocalBuilder
    starts a fresh pool (a process importing TVM) for every round and once more to check
    itself; on a loaded 2-core host that start alone can outlast its 30 s timeout, which then
    fails every candidate. The worker imports the tensor intrinsics once, before its first build
    (`import_tensor_intrinsics`); each build then has `timeout_sec`."""

    def __init__(self, timeout_sec: float) -> None:
        super().__init__()
        self.timeout_sec = timeout_sec
        self.pool: Any = None

    def build(self, build_inputs: list[Any]) -> list[Any]:  # noqa: D102 - PyBuilder's hook
        from tvm.s_tir.meta_schedule.builder import local_builder as lb
        from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

        if self.pool is None:  # the initializer runs once, outside every build's timeout
            self.pool = PopenPoolExecutor(max_workers=1, timeout=self.timeout_sec,
                                          initializer=import_tensor_intrinsics)
        jobs = [(None, None, b.mod, b.target, lb._serialize_params(b.params)) for b in build_inputs]
        results = []
        for result in self.pool.map_with_error_catching(lambda x: lb._worker_func(*x), jobs):
            if result.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(result.value, None))
            elif result.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(
                    None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"build failed: {result.value}"))
        return results

    def shutdown(self) -> None:
        """Stop the worker pool."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


@derived_object
class CPURunner(ms.runner.PyRunner):
    """MetaSchedule's LocalRunner with the device named 'cpu': the tuner names it after the
    target kind ('llvm'), which tvm-ffi 0.1.14 no longer accepts as a device, so every
    measurement failed and every record said 1e10 s."""

    def __init__(self) -> None:
        super().__init__()
        self.runner = ms.runner.LocalRunner()

    def run(self, runner_inputs: list[Any]) -> list[Any]:  # noqa: D102 - PyRunner's hook
        return self.runner.run([ms.runner.RunnerInput(i.artifact_path, "cpu", i.args_info)
                                for i in runner_inputs])


def _rule_schedule(task: Any, rules: list[Any]) -> Any | None:
    """The schedule the first of `rules` that applies gives the task's kernel (None if none)."""
    from tvm.s_tir.dlight.base.transform import _apply_rules

    with task.target:
        space = _apply_rules(task.dispatched[0]["main"], task.target, rules, tunable=False)
    return space[0] if space else None


def commit_rule_schedules(tasks: list[Any], rules: list[Any], database: Any, builder: Any,
                          runner: Any) -> int:
    """Build and time the schedule `rules` give each task's kernel and commit it to `database`
    as one more candidate, so the database applies a searched schedule only where it measured
    faster than the rules' own; returns how many were committed."""
    committed = 0
    for task in tasks:
        sch = _rule_schedule(task, rules)
        if sch is None:
            continue
        (built,) = builder.build([ms.builder.BuilderInput(sch.mod, task.target)])
        if built.error_msg:
            continue
        args_info = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args_info)])
        result = future.result()
        if result.error_msg or not result.run_secs:
            continue
        workload = database.commit_workload(task.dispatched[0])
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, [float(t) for t in result.run_secs], task.target, args_info))
        committed += 1
    return committed


def searched_kernels(kernels: Any, target: Any, database: Any, rules: list[Any]) -> int:
    """How many kernels of the lowered module get a searched schedule from `database`: its best
    record is not the schedule `rules` give the kernel."""
    count = 0
    for task in extract_tasks(kernels, target):
        record = database.query_tuning_record(task.dispatched[0], task.target, task.task_name)
        if record is None:
            continue
        rule = _rule_schedule(task, rules)
        if rule is None or str(rule.trace) != str(record.trace):
            count += 1
    return count


def tune(kernels: Any, target: Any, folder: str | Path, options: TuneOptions,
         rules: list[Any] | None = None) -> dict[str, Any]:
    """Tune the kernels of `kernels` (a lowered module) that the database in `folder` does not
    hold yet, with `options.trials` trials in all, each kernel's schedule from `rules` timed
    beside the search's; returns what was done, for the manifest."""
    database = open_database(folder)
    tasks = extract_tasks(kernels, target)
    todo = ([t for t in tasks if t.task_name in options.kernels] if options.kernels
            else _untuned(tasks, database))
    info = {"trials_budget": options.trials, "kernels": len(tasks),
            "kernels_tuned_now": len(todo), "builder_timeout_s": options.builder_timeout,
            "cost_model": "random", "seconds": 0.0}
    if not todo or options.trials <= 0:
        info.update(records=record_count(folder), valid_records=valid_record_count(folder))
        return info
    start = time.perf_counter()
    import_tensor_intrinsics()  # before TuneContext imports it the slow way
    per_task = max(1, options.trials // len(todo))  # one round per kernel: a round costs a start
    builder = PooledBuilder(options.builder_timeout)
    with tempfile.TemporaryDirectory(prefix="winnow-tune-") as work_dir, _quiet_logs(work_dir):
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            todo, work_dir, strategy="replay-trace", seed=options.seed)
        runner = CPURunner()
        try:
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir,
                          max_trials_global=per_task * len(todo), max_trials_per_task=per_task,
                          num_trials_per_iter=per_task, builder=builder,
                          runner=runner, database=database,
                          cost_model="random", task_scheduler="round-robin")
            if rules:
                info["rule_schedules_timed"] = commit_rule_schedules(todo, rules, database,
                                                                     builder, runner)
        finally:
            builder.shutdown()
    info["seconds"] = round(time.perf_counter() - start, 2)
    info.update(records=record_count(folder), valid_records=valid_record_count(folder))
    return info


def package_database(src: str | Path, dst: str | Path) -> int:
    """Write into the empty folder `dst` only the best valid record of each kernel of the database
    in `src`, both files gzipped (what a packaged database keeps); returns the records written."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        from winnow.errors import OutputError

        raise OutputError(f"'{dst}' is not empty; package a tuning database into a new folder.")
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="winnow-prune-") as pruned:
        open_database(src).dump_pruned(open_database(pruned))
        for name in (WORKLOAD_FILE, RECORD_FILE):
            (dst / (name + ".gz")).write_bytes(gzip.compress((Path(pruned) / name).read_bytes(),
                                                             mtime=0))
    return record_count(dst)


def copy_database(src: str | Path, dst: str | Path) -> bool:
    """Copy the database files of folder `src` into `dst`; False when `src` holds none."""
    src, dst = Path(src), Path(dst)
    if not record_count(src):
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for name in (WORKLOAD_FILE, RECORD_FILE):
        shutil.copy2(src / name, dst / name)
    return True


"""The compile API: load a model, run a pass pipeline, check it against the source, emit."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassBase

from winnow import progress
from winnow.backends import BACKENDS, backend_module  # noqa: F401 - BACKENDS: the registry
from winnow.backends.manifest import (
    Artifact,
    check_output,
    io_spec,
    node_count,
    op_histogram,
    param_stats,
)
from winnow.errors import (
    ExecutionError,
    FidelityError,
    OutputError,
    PipelineError,
    UnsupportedModelError,
)
from winnow.measure.fidelity import array_agreement, evaluate_zoo, lossless_mismatch
from winnow.measure.fidelity import evaluate as evaluate_fidelity
from winnow.frontend import load
from winnow.ir.execute import fit_ir_version, get_session, run, runtime_limits_problem
from winnow.ir.inputs import feeds_for, feeds_origin
from winnow.ir.user_inputs import UserInputs, user_inputs_record
from winnow.passes.instruments import (
    DumpIRInstrument,
    LosslessGuard,
    RecordInstrument,
    TimingInstrument,
    VerifyInstrument,
)
from winnow.driver.timing import timing_feeds
from winnow.driver.source import (Source, dynamic_batch, max_drop_text, parse_max_drop,
                                  relative_drop, resolve, source_name, split_batches)
from winnow.passes.analysis.calibration import pick_calibration, split_batch
from winnow.passes.manager import (
    DEFAULT_PIPELINE,
    LOSSLESS_PIPELINE,
    PassContext,
    PassManager,
    pass_label,
)
from winnow.passes.pipeline import PassSpec, load_pipeline_file

Pipeline = str | Sequence[PassSpec | PassBase]
DEFAULT_MAX_DROP = 0.02
RUNTIME_BATCHES = (1, 8)  # the batch sizes the emitted model's thread count is tuned at
GUARD_SAMPLES = 2  # samples the lossless guard runs after each pass


@dataclasses.dataclass
class CompileResult:
    """What a compile produced: the artifact, pipeline, node and parameter counts, fidelity, timings."""

    artifact: Artifact
    source: str
    pipeline: str
    nodes_before: int
    nodes_after: int
    params_before: dict[str, int]
    params_after: dict[str, int]
    fidelity: dict[str, Any] | None
    timings: list[tuple[str, float, bool]]
    phases: dict[str, float]
    passes: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # see pass_entries

    def timing_table(self) -> str:
        """The per-pass timing table (empty records unless compiled with timings=True)."""
        inst = TimingInstrument()
        inst.records = list(self.timings)
        return inst.table()

    def file_sizes(self) -> dict[str, int]:
        """Bytes of each file written into the artifact folder."""
        return {name: (self.artifact.path / name).stat().st_size for name in self.artifact.files}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (the CLI's `--json` output)."""
        return {
            "source": self.source, "out": str(self.artifact.path), "pipeline": self.pipeline,
            "nodes": {"before": self.nodes_before, "after": self.nodes_after},
            "params": {"before": self.params_before, "after": self.params_after},
            "files": self.file_sizes(), "ort_format": self.artifact.manifest.get("ort_format"),
            "fidelity": self.fidelity, "phases": self.phases, "passes": self.passes,
            "timings": [{"pass": n, "seconds": s, "modified": m} for n, s, m in self.timings],
        }


@dataclasses.dataclass
class Rewritten:
    """A model the pipeline already made from this source (a search trial whose pipeline trains),
    with the RecordInstrument records of the passes that made it, one per pass in pipeline order:
    compile_model checks, judges and emits it instead of running the pipeline again."""

    model: ir.Model
    records: list[dict[str, Any]]


def get_backend(name: str) -> Callable[..., Artifact]:
    """The `emit` function of a backend, or a WinnowError listing the valid backends."""
    return backend_module(name).emit


def resolve_pipeline(pipeline: Pipeline | None, config: str | Path | None,
                     backend: str = "ort") -> Pipeline:
    """The pipeline to run: `pipeline`, the YAML file `config`, or the lossless default
    (DEFAULT_PIPELINE, then the finishing passes on the ORT backend: TVM compiles for fixed
    shapes, where a run-time crop of the sequence axis has nothing to gain)."""
    if config is not None:
        if pipeline is not None:
            raise PipelineError("give either a pipeline or a pipeline config file, not both.")
        return load_pipeline_file(config)
    if pipeline is None:
        return LOSSLESS_PIPELINE if backend == "ort" else DEFAULT_PIPELINE
    return pipeline


@contextlib.contextmanager
def _phase(phases: dict[str, float], name: str, message: str) -> Iterator[None]:
    start = time.perf_counter()
    with progress.step(message):
        yield
    phases[name] = time.perf_counter() - start


def compile_model(source: Any, out: str | Path, *, pipeline: Pipeline | None = None,
                  config: str | Path | None = None, backend: str = "ort", timings: bool = False,
                  dump_ir: str | Path | None = None, verify_each: bool = False,
                  overwrite: bool = False, check: bool = True, example_inputs: Any = None,
                  dynamic_shapes: Any = None, calibration: Any = None, evaluate: bool = False,
                  max_drop: float | str = DEFAULT_MAX_DROP, force: bool = False,
                  strict: bool = False, judge_data: Any = None,
                  user_inputs: UserInputs | None = None,
                  backend_options: Mapping[str, Any] | None = None,
                  rewritten: Rewritten | None = None,
                  tune_threads: bool = True) -> CompileResult:
    """Load `source`, run the pipeline (default DEFAULT_PIPELINE), check it and emit to `out`.

    `source` is anything `winnow.load` takes, or a `driver.source.Source` already resolved (the
    search hands its own; its model is then rewritten in place). `example_inputs` and
    `dynamic_shapes` go to `winnow.load` (needed for an nn.Module source).
    Lossy passes get `calibration` (default: the zoo model's calibration split, else example
    inputs). With `evaluate` (and always after a lossy pass) a zoo model is scored on its
    held-out split; a lossy result whose drop exceeds `max_drop` (a number, or 'N%' of the
    source's metric) is refused unless `force`.
    Other models are judged on a held-out part of `calibration` that the passes do not fit on
    (or on `judge_data` when given, and then all of `calibration` is fitted on); NaN/inf where
    the source has none, or a changed output count or shape, are refused.
    With `check`, each lossless pass is checked on the check inputs and rolled back when it
    changed the outputs (recorded in fidelity['rolled_back']); with `strict` that fails instead.
    `user_inputs` (--input-shapes / --example-inputs) are the check inputs and the default
    calibration data instead of invented ones; fidelity['check_inputs'] records them.
    `backend_options` go to the backend's emit (TVM: target, shapes, schedules). With
    `tune_threads` the ORT backend measures the emitted model's fastest thread count at batch 1
    and 8 (on the first calibration rows) and records it in the manifest.
    `rewritten` is what the first passes of `pipeline` (one per record) already made from this
    source (the search's trained trial): those do not run again (their entries say `reused`),
    the passes after them (the finishing ones) run on it, and the result is checked against the source, judged on held-out data and held to the budget all the same.
    """
    emit = get_backend(backend)
    max_drop, relative = check_max_drop(max_drop)
    check_output(Path(out), overwrite)
    timer = TimingInstrument() if timings else None
    verifier = VerifyInstrument() if verify_each else None
    recorder = RecordInstrument()
    instruments = [i for i in (timer, verifier, recorder) if i]
    manager = PassManager(resolve_pipeline(pipeline, config, backend), instruments)
    if dump_ir is not None:
        if Path(dump_ir).resolve().is_relative_to(Path(out).resolve()):
            raise OutputError(f"the IR dump folder '{dump_ir}' is inside the output folder "
                              f"'{out}'; put it elsewhere.")
        manager.instruments.append(DumpIRInstrument(dump_ir))
    phases: dict[str, float] = {}
    with _phase(phases, "load", "loading the model"):
        src = source if isinstance(source, Source) else resolve(
            source, calibration, user_inputs, example_inputs, dynamic_shapes)
    model = src.model
    notes = [n for n in (fit_ir_version(model),) if n]
    before = (node_count(model), param_stats(model))
    feeds, reference, guard = None, None, None
    if check:
        with _phase(phases, "reference", "running the source model"):
            feeds = feeds_for(model)
            reference = _run_source(model, feeds)
        guard = _lossless_guard(model, feeds, reference, strict)
    lossy = [pass_label(p) for p in manager.passes if not getattr(p, "lossless", True)]
    batches, origin = (pick_calibration(src.spec, model, calibration) if calibration is not None
                       else (src.calibration, src.origin))
    fit, judge, judged_on = _fit_and_judge(src, model, batches, origin)
    if judge_data is not None:
        fit, judge = batches, pick_calibration(src.spec, model, judge_data)[0]
        judged_on = f"{len(judge)} judging batches given apart from the calibration data"
    judge_reference = [run(model, feeds) for feeds in judge] if lossy else []
    ctx = PassContext(calibration=fit, training=src.training, options=dict(src.options))
    if rewritten is None:
        with _phase(phases, "passes", "running the pipeline"):
            model = manager.run(model, ctx, guard=guard).model
    else:
        model = rewritten.model
        fit_ir_version(model)
        recorder.records = [dict(record, reused=True) for record in rewritten.records]
        rest = manager.passes[len(rewritten.records):]
        if rest:  # the pipeline goes on past the kept model (the finishing passes)
            if guard is not None:  # judge them against the kept (trained) model, not the source
                guard.rebase(model)
            with _phase(phases, "passes", "running the rest of the pipeline"):
                model = PassManager(rest, instruments).run(model, ctx, guard=guard).model
    fidelity = None
    if check:
        with _phase(phases, "check", "checking against the source"):
            fidelity = dict(_fidelity(model, feeds, reference), rolled_back=guard.rolled_back)
            if notes:
                fidelity["notes"] = notes
    zoo_name = model.metadata_props.get("winnow.zoo")
    if zoo_name and (evaluate or lossy):
        with _phase(phases, "evaluate", f"scoring on the {zoo_name} held-out split"):
            fidelity = dict(fidelity or {},
                            heldout=evaluate_zoo(src.zoo or zoo_name, model).to_dict())
    elif lossy and judge:
        with _phase(phases, "evaluate", f"scoring on {judged_on}"):
            fidelity = dict(fidelity or {},
                            heldout=evaluate_fidelity(judge_reference, model, judge).to_dict())
    if lossy:
        fidelity = dict(fidelity or {}, lossy_passes=lossy, calibration=origin,
                        judged_on=judged_on)
        _enforce_budget(fidelity, max_drop, force, relative)
    name = src.name
    passes = pass_entries(manager.passes, recorder, verifier, guard)
    options = dict(backend_options or {})
    if backend == "ort" and tune_threads:
        options["runtime_feeds"] = timing_feeds(model, batches[0] if batches else feeds_for(model),
                                                RUNTIME_BATCHES)
    with _phase(phases, "emit", f"writing {out}"):
        artifact = emit(model, out, pipeline_text=manager.text, fidelity=fidelity, source=name,
                        overwrite=overwrite, passes=passes, **options)
    return CompileResult(artifact, name, manager.text, before[0], node_count(model), before[1],
                         param_stats(model), fidelity, timer.records if timer else [], phases,
                         passes)


def pass_entries(passes: Sequence[PassBase], recorder: RecordInstrument,
                 verifier: VerifyInstrument | None, guard: Any = None) -> list[dict[str, Any]]:
    """One manifest entry per pass run: name, every option, lossless, modified, seconds, node
    counts, its report; `verified` with --verify-each; `rolled_back` when the guard undid it;
    `reused` when it ran in a search trial whose model was emitted as it was."""
    from winnow.passes.config import config_fields

    rolled = {r.get("pass") for r in getattr(guard, "rolled_back", None) or []}
    entries = []
    for p, record in zip(passes, recorder.records):
        options = ({f["name"]: getattr(p.config, f["name"]) for f in config_fields(p.Config)}
                   if hasattr(p, "config") and hasattr(p, "Config") else {})
        entry = {**record, "options": options, "lossless": getattr(p, "lossless", True)}
        if verifier is not None:
            entry["verified"] = ("passed (checker, shape inference, lint)"
                                 if record["index"] in verifier.verified
                                 else "not needed (the pass changed nothing)")
        if record["name"] in rolled:
            entry["rolled_back"] = True
        entries.append(entry)
    return entries


def check_max_drop(max_drop: Any) -> tuple[float, bool]:
    """The fidelity budget as (drop, relative); a FidelityError for anything but a number from 0
    to 1 or a percentage."""
    try:
        return parse_max_drop(max_drop)
    except ValueError as exc:
        raise FidelityError(str(exc)) from None


def _fit_and_judge(src: Source, model: ir.Model, batches: list[dict[str, np.ndarray]],
                   origin: str) -> tuple[list, list, str]:
    """The batches lossy passes fit on, the batches that judge them, and that data in words.

    Zoo models are judged on their own held-out split. Explicit calibration data is split: the
    passes fit on the first part and are judged on the rest. Otherwise the check inputs judge,
    and they are what the passes fit on too (in-sample)."""
    zoo = model.metadata_props.get("winnow.zoo")
    if zoo and isinstance(src.spec, str) and src.spec.startswith(("zoo:", "onnx:")):
        return batches, [], f"the {zoo} held-out split"
    if origin == "explicit":
        fit, first, second = split_batches(batches, dynamic_batch(model))
        if first is not fit:
            judge = first + second
            return fit, judge, (f"{len(judge)} held-out calibration batches (the passes fit on "
                                f"the other {len(fit)})")
        return batches, [], ("the check inputs (the calibration data is too small to hold any "
                             "out)")
    return batches, [], f"the check inputs (in-sample: the passes fit on the {origin} too)"


def budget_drop(fidelity: Mapping[str, Any], relative: bool = False) -> tuple[float, str] | None:
    """The drop judged against the budget: the task-metric drop on held-out data when there is
    one (with `relative`, as a fraction of the source's metric), else 1 - cosine (held-out, or
    the differential check's)."""
    heldout = fidelity.get("heldout") or {}
    data = fidelity.get("judged_on") or "held-out data"
    if heldout.get("metric_drop") is not None:
        drop, name = float(heldout["metric_drop"]), heldout["metric_name"]
        if relative:
            return (relative_drop(drop, heldout.get("reference_metric")),
                    f"{name} drop on {data} relative to the source's {name}")
        return drop, f"{name} drop on {data}"
    if heldout.get("cosine") is not None:
        return 1.0 - float(heldout["cosine"]), f"1 - cosine on {data}"
    if fidelity.get("min_cosine") is not None:
        data = fidelity.get("judged_on") or "the check inputs"
        return 1.0 - float(fidelity["min_cosine"]), f"1 - cosine on {data}"
    return None


def _enforce_budget(fidelity: dict[str, Any], max_drop: float, force: bool,
                    relative: bool = False) -> None:
    _refuse_changed_outputs(fidelity)
    judged = budget_drop(fidelity, relative)
    if judged is None:
        if not force:
            raise FidelityError("the pipeline has lossy passes but no fidelity could be measured; "
                                "give a zoo model or check inputs, or pass --force.")
        return
    drop, what = judged
    nonfinite = int(fidelity.get("nonfinite_mismatch") or 0) + int(
        (fidelity.get("heldout") or {}).get("nonfinite_mismatch") or 0)
    fidelity["budget"] = {"max_drop": max_drop, "relative": relative, "drop": drop,
                          "measure": what, "forced": force, "nonfinite_mismatch": nonfinite}
    if force:
        return
    if nonfinite:
        raise FidelityError(f"the result misses the fidelity budget: its outputs have {nonfinite} "
                            "NaN/inf entries where the source's do not (or the other way round); "
                            "loosen the pipeline, or pass --force to write it anyway.")
    if not drop <= max_drop:
        raise FidelityError(f"the result misses the fidelity budget: {what} is {drop:.4f}, above "
                            f"--max-drop {max_drop_text(max_drop, relative)}; loosen the pipeline, raise --max-drop, or "
                            "pass --force to write it anyway.")


def _refuse_changed_outputs(fidelity: Mapping[str, Any]) -> None:
    """A lossy result with another output count or shape than its source is never written."""
    problems = [fidelity["error"]] if fidelity.get("error") else []
    problems += [f"output '{name}': {o['error']}" for name, o in
                 (fidelity.get("outputs") or {}).items() if isinstance(o, dict) and o.get("error")]
    if problems:
        raise FidelityError(f"the lossy passes changed the model's outputs ({problems[0]}); a "
                            "result whose outputs differ in number or shape from the source's "
                            "is not written, even with --force.")


def _run_source(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Source outputs, or {"measured": False, "reason": ...} when the check inputs don't suit it."""
    problem = runtime_limits_problem(model)
    if problem:
        raise UnsupportedModelError(f"ONNX Runtime cannot read the source model: {problem}")
    try:
        get_session(model)
    except ExecutionError as exc:
        raise ExecutionError(f"the source model does not load in ONNX Runtime ({exc}); pass "
                             "--no-check (check=False) to compile without the differential "
                             "check.") from exc
    try:
        return run(model, feeds)
    except ExecutionError as exc:
        return {"measured": False, "reason": _not_run_reason(model, exc)}


def _not_run_reason(model: ir.Model, exc: ExecutionError) -> str:
    """Why the check could not run, with the way out when winnow invented the inputs."""
    if user_inputs_record(model) is not None:
        return f"the source model does not run on the check inputs ({feeds_origin(model)}): {exc}"
    return (f"the source model does not run on the generated check inputs ({exc}); give inputs "
            "that fit it with --input-shapes or --example-inputs")


def _lossless_guard(model: ir.Model, feeds: dict[str, np.ndarray], reference: dict,
                    strict: bool) -> LosslessGuard:
    """A guard that checks each lossless pass on the first GUARD_SAMPLES samples of the check
    inputs (all of them when the batch axis is fixed), or only that the model still loads when
    the source does not run on them. The final check still uses every check input."""
    if reference.get("measured") is False:
        return LosslessGuard(get_session, lambda ref, got: None, None, strict)
    small = split_batch(feeds, GUARD_SAMPLES, model)[0]
    if any(np.shape(small[k]) != np.shape(v) for k, v in feeds.items()):
        reference = run(model, small)
    return LosslessGuard(lambda m: run(m, small), lossless_mismatch, reference, strict)


def _fidelity(model: ir.Model, feeds: dict[str, np.ndarray], reference: dict) -> dict[str, Any]:
    given = user_inputs_record(model)
    extra = {"check_inputs": given} if given is not None else {}
    if reference.get("measured") is False:
        return {**reference, **extra}
    fidelity = compare_outputs(reference, run(model, feeds))
    fidelity["feeds"] = feeds_origin(model)
    return {**fidelity, **extra}


def compare_outputs(reference: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """Max abs error and cosine of each output (matched by position) and the worst of each."""
    if len(reference) != len(result):
        return {"error": f"the model has {len(result)} outputs after the passes, "
                         f"{len(reference)} before", "outputs": {}}
    outputs = {name: _compare(np.asarray(ref), np.asarray(got))
               for (name, ref), got in zip(reference.items(), result.values())}
    errors = [o["max_abs_error"] for o in outputs.values() if "max_abs_error" in o]
    cosines = [o["cosine"] for o in outputs.values() if "cosine" in o]
    return {"outputs": outputs, "max_abs_error": max(errors, default=None),
            "min_cosine": min(cosines, default=None),
            "nonfinite_mismatch": sum(o.get("nonfinite_mismatch", 0) for o in outputs.values())}


def _compare(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Max abs error, cosine and NaN/inf mismatches of one output (the cosine is 0 when NaN or
    inf appear where the source has none)."""
    if ref.shape != got.shape:
        return {"error": f"shape {list(got.shape)} after the passes, {list(ref.shape)} before"}
    if ref.dtype.kind not in "biuf" or got.dtype.kind not in "biuf":
        return {"equal": bool(np.array_equal(ref, got))}
    stats = array_agreement(ref, got)
    if not stats["nonfinite_mismatch"]:
        del stats["nonfinite_mismatch"]
    return stats


def inspect_model(source: Any) -> dict[str, Any]:
    """Opsets, inputs/outputs, op histogram, parameters (and regions when available) of a model."""
    model = load(source)
    info = {
        "source": source_name(source, model),
        "ir_version": model.ir_version,
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p),
        "opset_imports": dict(model.opset_imports),
        **io_spec(model),
        "nodes": node_count(model),
        "ops": op_histogram(model),
        "params": param_stats(model),
    }
    regions = _regions(model)
    if regions is not None:
        info["regions"] = regions
    return info


def _regions(model: ir.Model) -> Any:
    try:
        from winnow.ir.regions import find_regions
    except ImportError:
        return None
    return find_regions(model).to_dict()

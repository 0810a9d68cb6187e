"""TVM backend: ONNX -> Relax -> a native library `model.so` for the host or aarch64 Linux.

The model's symbolic dims are bound to the example (or calibration) feeds' sizes first and
onnxscript's optimizer folds the shape arithmetic that then becomes constant: TVM's ONNX frontend
cannot import the exporter's dynamic Reshapes, and fixed shapes let every kernel be tiled for
its real extents. The cost: the library runs only at those shapes (the manifest lists them).
The artifact keeps that bound `model.onnx` beside `model.so`, so it can be rebuilt for another
target (`winnow export --edge --target aarch64`) and checked against ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.backends.manifest import (
    MANIFEST_FILE,
    Artifact,
    artifact_manifest,
    read_manifest,
    staging,
    verify_files,
    write_manifest,
)
from winnow.errors import (
    ExecutionError,
    ModelFormatError,
    TargetError,
    UnsupportedModelError,
    require_extra,
)
from winnow.ir.execute import check_feed_names

__all__ = ["emit", "load_artifact", "run_artifact", "prepare", "to_relax", "build",
           "export_library", "resolve_target", "TargetSpec", "TARGETS", "SCHEDULES"]

MODEL_FILE = "model.onnx"
LIBRARY_FILE = "model.so"
SCHEDULES = ("winnow", "dlight", "none")  # winnow's rules, TVM's dlight CPU rules, nothing
FRONTEND_HANDLED = {"If", "Constant"}  # ops TVM's ONNX importer handles outside its converter map


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A compile target: its name, TVM target dict, LLVM triple and (when cross) the compiler."""

    name: str
    tvm: dict[str, Any]
    triple: str
    compiler: str | None = None
    package: str | None = None  # the Debian package that provides `compiler`

    @property
    def runs_here(self) -> bool:
        """True when the library can be loaded on this machine."""
        return self.compiler is None


AARCH64 = TargetSpec("aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                 "mattr": ["+neon"]},
                     "aarch64-linux-gnu", "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
TARGETS = ("host", "aarch64")


def _require_tvm() -> None:
    require_extra("the TVM backend", "tvm", ("tvm",))


def resolve_target(name: str) -> TargetSpec:
    """The target `name` ('host': LLVM for this CPU; 'aarch64': Linux on 64-bit Arm)."""
    if name == "host":
        _require_tvm()
        from tvm.target import codegen

        cpu = codegen.llvm_get_system_cpu()
        return TargetSpec("host", {"kind": "llvm", "mcpu": cpu}, codegen.llvm_get_system_triple())
    if name == "aarch64":
        return AARCH64
    raise TargetError(f"unknown target '{name}'; valid targets are: {', '.join(TARGETS)}.")


def _cross_compiler(target: TargetSpec) -> str | None:
    """The cross compiler's path, or TargetError naming the package that provides it."""
    if target.compiler is None:
        return None
    path = shutil.which(target.compiler)
    if path is None:
        raise TargetError(f"target '{target.name}' needs the cross compiler {target.compiler}, "
                          f"which is not installed (apt-get install {target.package}).")
    return path


# ---- ONNX -> Relax -------------------------------------------------------------------------


def input_dims(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """Each real input's concrete shape, taken from `feeds`."""
    inits = model.graph.initializers
    shapes = {}
    for value in model.graph.inputs:
        if value.name in inits:
            continue
        if value.name not in feeds:
            raise UnsupportedModelError(f"no example shape for input '{value.name}'; give "
                                        "example inputs or calibration data to bind it.")
        shapes[value.name] = [int(d) for d in np.shape(feeds[value.name])]
    return shapes


def prepare(model: ir.Model, shapes: Mapping[str, list[int]]) -> ir.Model:
    """A copy of `model` with every input's shape fixed to `shapes` and the now-constant shape
    arithmetic folded by onnxscript's optimizer."""
    import onnxscript

    from winnow.progress import quiet_libraries

    bound = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    for value in bound.graph.inputs:
        if value.name in shapes:
            rank = None if value.shape is None else len(value.shape)
            if rank is not None and rank != len(shapes[value.name]):
                raise UnsupportedModelError(
                    f"input '{value.name}' has rank {rank}, the example shape "
                    f"{shapes[value.name]} rank {len(shapes[value.name])}.")
            value.shape = ir.Shape(shapes[value.name])
    for value in bound.graph.outputs:
        value.shape = None  # re-inferred from the fixed inputs
    with quiet_libraries():
        onnxscript.optimizer.optimize(bound)
    return bound


def check_supported(model: ir.Model) -> None:
    """UnsupportedModelError naming the first op (and its node) TVM's ONNX frontend lacks."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | FRONTEND_HANDLED
    missing = [node for node in model.graph if node.op_type not in known]
    if missing:
        ops = sorted({n.op_type for n in missing})
        node = missing[0]
        more = f" (all unsupported ops: {', '.join(ops)})" if len(ops) > 1 else ""
        raise UnsupportedModelError(
            f"TVM's ONNX frontend has no converter for op '{node.op_type}' (node "
            f"'{node.name or '?'}'){more}; compile with --backend ort.")


def to_relax(model: ir.Model) -> Any:
    """The shape-bound model as a Relax IRModule (weights become constants)."""
    _require_tvm()
    from tvm.relax.frontend.onnx import from_onnx

    check_supported(model)
    try:
        return from_onnx(ir.to_proto(model), dtype_dict=None, keep_params_in_input=False)
    except Exception as exc:  # noqa: BLE001 - the importer raises many unrelated types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise UnsupportedModelError(f"TVM's ONNX frontend cannot import the model: {reason}; "
                                    "compile with --backend ort.") from exc


# ---- Relax -> library ----------------------------------------------------------------------


def _schedule_rules(schedules: str) -> list[Any]:
    from winnow.backends import tvm_schedules

    if schedules not in SCHEDULES:
        raise TargetError(f"unknown schedules '{schedules}'; valid: {', '.join(SCHEDULES)}.")
    return {"winnow": tvm_schedules.winnow_rules, "dlight": tvm_schedules.default_rules,
            "none": list}[schedules]()


def _layout_passes(schedules: str) -> list[Any]:
    """Graph passes before legalization: winnow's rules tile convolutions as matmuls, which needs
    channels last (NHWC) and weights HWIO, so the output channel is the vectorized axis; Gelu's
    erf and Softmax's exp become polynomials that vectorize."""
    if schedules != "winnow":
        return []
    from winnow.backends.tvm_schedules import ChannelsLast, VectorizableGelu, VectorizableSoftmax

    return [ChannelsLast(), VectorizableGelu(), VectorizableSoftmax()]


def lowering_passes(target: Any, schedules: str) -> list[Any]:
    """The passes that turn the imported module into fused TIR kernels: the layout passes,
    library dispatch, legalization and fusion (the kernels rules and tuning schedule)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return (_layout_passes(schedules) + cpu.library_dispatch_passes(target)
            + cpu.legalize_passes(target))


def lower(mod: Any, target: TargetSpec, schedules: str = "winnow") -> Any:
    """The module's fused TIR kernels, unscheduled (what tuning extracts its tasks from)."""
    import tvm

    tvm_target = tvm.target.Target(target.tvm)
    with tvm_target:
        return tvm.transform.Sequential(lowering_passes(tvm_target, schedules))(mod)


def scheduled_kernels(mod: Any) -> list[str]:
    """The names of the module's TIR kernels marked scheduled (by a database or a rule)."""
    import tvm

    return sorted(gv.name_hint for gv, func in mod.functions.items()
                  if isinstance(func, tvm.tirx.PrimFunc) and func.attrs
                  and bool(func.attrs.get("tirx.is_scheduled", False)))


def _relax_pipeline(target: Any, schedules: str, database: Any = None,
                    report: dict[str, Any] | None = None) -> Any:
    """TVM's CPU pipeline after `lowering_passes`: the kernels a tuning `database` holds get its
    schedules, the rest winnow's (or TVM's) rules; `report['kernels_applied']` gets the names of
    the kernels the database scheduled."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir.dlight import ApplyDefaultSchedule

    rules = _schedule_rules(schedules)

    @tvm.transform.module_pass(opt_level=0, name="WinnowCPUPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            mod = tvm.transform.Sequential(lowering_passes(target, schedules))(mod)
            if database is not None:
                before = set(scheduled_kernels(mod))
                with database:
                    mod = relax.transform.MetaScheduleApplyDatabase()(mod)
                if report is not None:
                    report["kernels_applied"] = sorted(set(scheduled_kernels(mod)) - before)
            passes = [ApplyDefaultSchedule(*rules)] if rules else []
            passes += cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def build(mod: Any, target: TargetSpec, schedules: str = "winnow", database: Any = None,
          report: dict[str, Any] | None = None) -> Any:
    """Compile a Relax module for `target` with the given schedules (and a tuning database's,
    for the kernels it holds; their names go to `report['kernels_applied']`); returns TVM's
    Executable."""
    _require_tvm()
    import tvm

    tvm_target = tvm.target.Target(target.tvm)
    return tvm.compile(mod, target=tvm_target,
                       relax_pipeline=_relax_pipeline(tvm_target, schedules, database, report))


def export_library(executable: Any, path: Path, target: TargetSpec) -> None:
    """Write the shared library, linked by the target's cross compiler when it has one."""
    compiler = _cross_compiler(target)
    if compiler is None:
        executable.export_library(str(path))
        return
    from tvm.support import cc

    executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))


def compile_library(model: ir.Model, folder: Path, target: TargetSpec, schedules: str = "winnow",
                    tuning: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Import the shape-bound `model`, build it and write `model.so` into `folder`; returns the
    build's description for the manifest. For the host, `tuning` (`tvm_tuning.TuneOptions`
    fields) first tunes the kernels into `folder/tuning`, and every kernel that database or a
    packaged one holds gets its tuned schedule."""
    _cross_compiler(target)  # a missing cross compiler fails before the slow build
    start = time.perf_counter()
    mod = to_relax(model)
    info: dict[str, Any] = {}
    database = None
    if target.runs_here:  # tuned schedules were measured on this machine's CPU
        database, info = _tuning_database(mod, folder, target, schedules, tuning)
    report: dict[str, Any] = {}
    executable = build(mod, target, schedules, database, report)
    if "kernels_applied" in report:
        info["kernels_applied"] = len(report["kernels_applied"])
    export_library(executable, folder / LIBRARY_FILE, target)
    import tvm

    result = {"target": target.name, "target_spec": target.tvm, "triple": target.triple,
              "schedules": schedules, "tvm_version": tvm.__version__,
              "build_seconds": round(time.perf_counter() - start, 2), "library": LIBRARY_FILE}
    return {**result, "tuning": info} if info else result


def _tuning_database(mod: Any, folder: Path, target: TargetSpec, schedules: str,
                     tuning: Mapping[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """Tune into `folder/tuning` when asked; the database of that folder and the packaged ones,
    and what tuning did and how many kernels the database holds (empty when it holds none)."""
    from winnow.backends import tvm_tuning

    own = folder / tvm_tuning.TUNING_DIR
    folders = [own, *tvm_tuning.packaged_databases()]
    asked = bool(tuning and tuning.get("trials", 0) > 0)
    if not asked and not any(tvm_tuning.record_count(f) for f in folders):
        return None, {}  # nothing to tune, nothing to apply: no second lowering
    lowered = lower(mod, target, schedules)
    info: dict[str, Any] = {}
    if asked:
        info = tvm_tuning.tune(lowered, _tvm_target(target), own, tvm_tuning.TuneOptions(**tuning),
                               _schedule_rules(schedules))
    database = tvm_tuning.union_database(folders, target.tvm.get("mcpu"))  # tuned on this CPU
    if database is None:
        return None, info
    matched = tvm_tuning.matched(lowered, _tvm_target(target), database)
    if not matched and not info:
        return None, {}
    return database, {**info, "kernels_from_database": matched,
                      "database": tvm_tuning.TUNING_DIR if tvm_tuning.record_count(own) else None}


def _tvm_target(target: TargetSpec) -> Any:
    import tvm

    return tvm.target.Target(target.tvm)


# ---- the artifact --------------------------------------------------------------------------


def emit(model: ir.Model, out_dir: str | Path, *, pipeline_text: str,
         fidelity: dict[str, Any] | None = None, source: str | None = None,
         overwrite: bool = False, passes: list[dict[str, Any]] | None = None,
         target: str = "host", shapes: Mapping[str, list[int]] | None = None,
         schedules: str = "winnow", tune_trials: int = 0,
         tune_builder_timeout: float | None = None) -> Artifact:
    """Write the TVM artifact folder `out_dir` atomically: the shape-bound `model.onnx`, the
    library `model.so` for `target` and `manifest.json`. `shapes` (input name -> shape) defaults
    to the shapes of the model's example feeds (zoo: its calibration batch; --input-shapes),
    else every symbolic dim is 1. `tune_trials` > 0 tunes the kernels with MetaSchedule (each
    candidate's build given `tune_builder_timeout` seconds) into `out_dir/tuning`; the database
    an earlier compile left there is reused, so its kernels are not tuned again."""
    from winnow.backends.ort import write_model
    from winnow.frontend import example_feeds
    from winnow.ir.inputs import random_feeds

    _require_tvm()
    spec = resolve_target(target)
    tuning = _tune_options(spec, tune_trials, tune_builder_timeout)
    _cross_compiler(spec)
    feeds = example_feeds(model) or random_feeds(model, default_dim=1)  # unnamed sizes: 1
    bound = prepare(model, shapes if shapes is not None else input_dims(model, feeds))
    with staging(out_dir, overwrite) as tmp:
        names = write_model(bound, tmp, external_data=False)
        _reuse_tuning(Path(out_dir), tmp)
        tvm_info = compile_library(bound, tmp, spec, schedules, tuning)
        names.append(LIBRARY_FILE)
        if spec.runs_here:
            tvm_info["check"] = check_against_ort(tmp, bound, None if shapes is not None else feeds,
                                                  "example" if example_feeds(model) else "random")
        manifest = {**artifact_manifest(bound, "tvm", tmp, names, pipeline_text=pipeline_text,
                                        source=source or model.metadata_props.get("winnow.source"),
                                        passes=passes, fidelity=fidelity),
                    **_versions(), "tvm": tvm_info}
        write_manifest(tmp, manifest)
    return Artifact(Path(out_dir), [*names, MANIFEST_FILE], manifest)


def _tune_options(spec: TargetSpec, trials: int, builder_timeout: float | None) -> dict[str, Any]:
    """The tuning options, or TargetError when tuning is asked for a target not this machine."""
    if trials < 0:
        raise TargetError(f"--tune-trials must be 0 or more, not {trials}.")
    if trials and not spec.runs_here:
        raise TargetError(f"tuning measures kernels on this machine; target '{spec.name}' is "
                          "not this machine (tune with --target host).")
    if builder_timeout is not None and builder_timeout <= 0:
        raise TargetError(f"the tuning builder timeout must be positive, not {builder_timeout}.")
    options: dict[str, Any] = {"trials": trials}
    if builder_timeout is not None:
        options["builder_timeout"] = builder_timeout
    return options


def _reuse_tuning(previous: Path, tmp: Path) -> None:
    """Carry the tuning database of an earlier artifact at `previous` into the new one."""
    from winnow.backends import tvm_tuning

    if previous.is_dir():
        tvm_tuning.copy_database(previous / tvm_tuning.TUNING_DIR, tmp / tvm_tuning.TUNING_DIR)


def check_against_ort(folder: Path, model: ir.Model, feeds: Mapping[str, np.ndarray] | None = None,
                      described: str = "given") -> dict[str, Any]:
    """Max abs error and cosine of the library in `folder` against ONNX Runtime running the same
    shape-bound model, on `feeds` (default: random feeds of the bound shapes)."""
    import tvm

    from winnow.backends.manifest import io_spec
    from winnow.ir.execute import run
    from winnow.ir.inputs import random_feeds

    if feeds is None:
        feeds, described = random_feeds(model), "random (seed 0)"
    spec = io_spec(model)
    arrays = check_feeds(spec, feeds)
    vm = load_module(folder, {})
    got = vm_outputs(vm["main"](*[tvm.runtime.tensor(a) for a in arrays]))
    reference = list(run(model, feeds).values())
    errors, cosines = [], []
    for ref, out in zip(reference, got):
        ref, out = np.asarray(ref, np.float64).ravel(), np.asarray(out, np.float64).ravel()
        errors.append(float(np.max(np.abs(ref - out), initial=0.0)))
        norm = np.linalg.norm(ref) * np.linalg.norm(out)
        cosines.append(float(ref @ out / norm) if norm else float(np.array_equal(ref, out)))
    return {"vs": "onnxruntime", "feeds": described, "max_abs_error": max(errors, default=0.0),
            "min_cosine": min(cosines, default=1.0)}


def _versions() -> dict[str, str]:
    import tvm

    from winnow import __version__

    return {"winnow_version": __version__, "tvm_version": tvm.__version__,
            "onnx_ir_version": ir.__version__}


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read a TVM artifact's manifest (checking every file's checksum by default)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("backend") != "tvm":
        raise ModelFormatError(f"'{path}' is a {manifest.get('backend')} artifact, not a TVM one.")
    if verify:
        verify_files(path, manifest)
    return Artifact(path, [*manifest.get("files", {}), MANIFEST_FILE], manifest)


def load_module(path: str | Path, manifest: Mapping[str, Any]) -> Any:
    """A Relax VM over the artifact's library on this machine's CPU."""
    _require_tvm()
    import tvm
    from tvm import relax

    info = manifest.get("tvm") or {}
    if info.get("target", "host") != "host":
        raise ExecutionError(f"'{path}' was built for {info.get('target')} "
                             f"({info.get('triple')}) and cannot run on this machine; run its "
                             "edge bundle there (winnow export --edge).")
    try:
        library = tvm.runtime.load_module(str(Path(path) / LIBRARY_FILE))
    except Exception as exc:  # noqa: BLE001 - TVM raises several unrelated types
        raise ExecutionError(f"TVM cannot load '{Path(path) / LIBRARY_FILE}': "
                             f"{str(exc).strip().splitlines()[-1]}") from None
    return relax.VirtualMachine(library, tvm.cpu())


def check_feeds(manifest: Mapping[str, Any], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The feeds in input order, or ExecutionError naming a missing, unknown or misshaped one."""
    specs = manifest.get("inputs") or []
    check_feed_names([s["name"] for s in specs], feeds)
    arrays = []
    for spec in specs:
        array = np.ascontiguousarray(feeds[spec["name"]])
        if list(array.shape) != list(spec["shape"]) or array.dtype.name != spec["dtype"]:
            raise ExecutionError(
                f"input '{spec['name']}' is {array.dtype.name} {list(array.shape)}; this TVM "
                f"library was built for {spec['dtype']} {spec['shape']} (recompile with other "
                "example shapes to change it).")
        arrays.append(array)
    return arrays


def vm_outputs(result: Any) -> list[np.ndarray]:
    """The VM's return value (one tensor or a tuple of them) as numpy arrays."""
    import tvm

    if isinstance(result, tvm.runtime.Tensor):
        return [result.numpy()]
    return [item.numpy() for item in result]


def run_artifact(path: str | Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a TVM artifact's library on this machine; returns outputs by name."""
    import tvm

    artifact = load_artifact(path)
    vm = load_module(artifact.path, artifact.manifest)  # first: a library for another CPU
    arrays = check_feeds(artifact.manifest, feeds)
    try:
        result = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    except Exception as exc:  # noqa: BLE001
        raise ExecutionError(f"TVM failed to run '{artifact.path}': "
                             f"{str(exc).strip().splitlines()[-1]}.") from None
    names = [o["name"] for o in artifact.manifest.get("outputs") or []]
    return dict(zip(names, vm_outputs(result)))

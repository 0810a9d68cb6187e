"""Run an IR model with ONNX Runtime, optionally capturing intermediate values as extra outputs."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from winnow.errors import ExecutionError, UnsupportedModelError, runtime_detail

_SESSION_CACHE: OrderedDict[tuple[str, tuple[str, ...]], ort.InferenceSession] = OrderedDict()
_SESSION_CACHE_SIZE = 8


def model_bytes(model: ir.Model | onnx.ModelProto) -> bytes:
    """Serialize a model (with weights) to ONNX bytes."""
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    return proto.SerializeToString()


def session_options(threads: int = 0, optimize: bool = True) -> ort.SessionOptions:
    """ORT session options: thread count (0 = ORT default) and graph optimization level."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 4
    return so


# Above this many weight bytes a verification session maps the weights from their files instead
# of prepacking a copy, and the session cache keeps no other such session beside it.
LARGE_MODEL_BYTES = 256 * 1024**2
_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def external_folder(model: ir.Model) -> str | None:
    """The one folder every external initializer of the model is read from, else None (no
    external initializers, or several folders)."""
    folders = {os.path.abspath(tensor.base_dir) for tensor in _initializer_tensors(model)
               if isinstance(tensor, ir.ExternalTensor)}
    return folders.pop() if len(folders) == 1 else None


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer's data lies in an external file."""
    return any(isinstance(t, ir.ExternalTensor) for t in _initializer_tensors(model))


def _initializer_tensors(model: ir.Model) -> list[ir.TensorProtocol]:
    return [value.const_value for graph in model.graphs()
            for value in graph.initializers.values() if value.const_value is not None]


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the initializers of every graph (in memory or in external files)."""
    return sum(tensor.nbytes for tensor in _initializer_tensors(model))


def _with_captures(model: ir.Model, capture: Sequence[str]) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    if not capture:
        return proto
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    present = {o.name for o in proto.graph.output}
    for name in capture:
        if name not in values:
            raise ExecutionError(f"cannot capture '{name}': no value of that name in the model.")
        if name in present:
            continue
        value = values[name]
        elem = value.dtype.value if value.dtype is not None else onnx.TensorProto.FLOAT
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return proto


def _model_session_options(model: ir.Model, threads: int, optimize: bool,
                           large: bool) -> ort.SessionOptions:
    so = session_options(threads, optimize)
    folder = external_folder(model)
    if folder is not None:
        so.add_session_config_entry(_FOLDER_KEY, folder)
    if large and not optimize:  # a timing session keeps ORT's prepacked weights
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def get_session(model: ir.Model, capture: Sequence[str] = (), threads: int = 0,
                optimize: bool = False) -> ort.InferenceSession:
    """An ORT session for the model (plus capture outputs), cached by model content.

    A model above LARGE_MODEL_BYTES of weights is not copied into the session: weights in
    external files are mapped from there, large weights in memory are handed over as arrays
    (neither goes through protobuf, so past 2 GB works), and the session replaces any other large
    session in the cache, so that verifying it holds about one copy of the weights."""
    large = weight_bytes(model) > LARGE_MODEL_BYTES
    folder = external_folder(model)
    if folder is None:
        ir.external_data.load_to_model(model)
    arrays = _handed_over(model) if large else {}
    with _placeholders(model, arrays):
        proto = _with_captures(model, tuple(capture))
    data = proto.SerializeToString()
    digest = hashlib.sha1(data)
    for array in arrays.values():
        digest.update(memoryview(array).cast("B"))
    key = (digest.hexdigest(), (str(threads), str(optimize), folder or ""))
    session = _SESSION_CACHE.get(key)
    if session is not None:
        _SESSION_CACHE.move_to_end(key)
        return session
    if large:
        release_large_sessions()
    so = _model_session_options(model, threads, optimize, large)
    handed = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
    if handed:
        so.add_external_initializers(list(arrays), handed)
    try:
        session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        raise ExecutionError(f"ONNX Runtime cannot load the model: {runtime_detail(exc)}") from exc
    session.winnow_large, session.winnow_arrays = large, (arrays, handed)  # ORT reads them
    _SESSION_CACHE[key] = session
    if len(_SESSION_CACHE) > _SESSION_CACHE_SIZE:
        _SESSION_CACHE.popitem(last=False)
    return session


HAND_OVER_BYTES = 1024**2  # in-memory weights from this size go to ORT as arrays (large models)
_PLACEHOLDER = "winnow-weights-in-memory"


def _handed_over(model: ir.Model) -> dict[str, np.ndarray]:
    """The main graph's in-memory weights of HAND_OVER_BYTES or more in a plain numpy dtype,
    as contiguous arrays by name."""
    arrays = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if (tensor is None or isinstance(tensor, ir.ExternalTensor)
                or tensor.nbytes < HAND_OVER_BYTES):
            continue
        array = np.ascontiguousarray(tensor.numpy())
        if array.dtype.kind in "biuf" and array.dtype.isnative and array.dtype.name in _PLAIN:
            arrays[name] = array
    return arrays


_PLAIN = {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "float32", "float64"}


@contextlib.contextmanager
def _placeholders(model: ir.Model, arrays: Mapping[str, np.ndarray]) -> Iterator[None]:
    """Serialize `arrays`' initializers as data-less external tensors (ORT gets the arrays)."""
    values = [model.graph.initializers[name] for name in arrays]
    originals = [v.const_value for v in values]
    try:
        for value, tensor in zip(values, originals):
            value.const_value = ir.ExternalTensor(_PLACEHOLDER, None, None, tensor.dtype,
                                                  shape=tensor.shape, name=value.name)
        yield
    finally:
        for value, tensor in zip(values, originals):
            value.const_value = tensor


def check_feed_names(expected: Sequence[str], feeds: Mapping[str, Any],
                     allow_extra: bool = False) -> None:
    """ExecutionError naming the missing (or, unless `allow_extra`, unknown) inputs in `feeds`."""
    missing = [n for n in expected if n not in feeds]
    unknown = [] if allow_extra else sorted(set(feeds) - set(expected))
    if missing or unknown:
        problem = (f"missing input(s) {', '.join(missing)}" if missing
                   else f"unknown input(s) {', '.join(unknown)}")
        raise ExecutionError(f"{problem}; the model takes {', '.join(expected) or 'no inputs'}.")


def run(model: ir.Model, feeds: Mapping[str, np.ndarray], capture: Sequence[str] = (),
        threads: int = 0, optimize: bool = False) -> dict[str, np.ndarray]:
    """Run the model on one batch of feeds; returns graph outputs plus captured values by name.
    With `optimize`, ORT's graph optimizations run first, as in a deployed session (a QDQ model
    then runs ORT's integer kernels, whose rounding and saturation differ from the QDQ math)."""
    session = get_session(model, capture, threads, optimize)
    expected = sorted(i.name for i in session.get_inputs())
    check_feed_names(expected, feeds, allow_extra=True)
    names = [o.name for o in session.get_outputs()]
    try:
        outs = session.run(names, {k: v for k, v in feeds.items() if k in expected})
    except Exception as exc:  # noqa: BLE001
        raise ExecutionError(f"ONNX Runtime failed to run the model: {runtime_detail(exc)}") from exc
    return dict(zip(names, outs))


def clear_cache() -> None:
    """Drop every cached ORT session."""
    _SESSION_CACHE.clear()


def release_large_sessions() -> None:
    """Drop the cached sessions of models above LARGE_MODEL_BYTES (and the weights they map)."""
    for key in [k for k, s in _SESSION_CACHE.items() if getattr(s, "winnow_large", False)]:
        del _SESSION_CACHE[key]


def _loads(ir_version: int, opset: int) -> bool:
    """Whether ONNX Runtime loads a one-Relu model with this IR version and ai.onnx opset."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                   ir_version=ir_version)
    try:
        ort.InferenceSession(model.SerializeToString(), session_options(),
                             providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any refusal means "not readable"
        return False
    return True


@functools.cache
def runtime_limits() -> tuple[int, int]:
    """The highest IR version and ai.onnx opset the installed ONNX Runtime loads (probed once)."""
    max_ir = next((v for v in range(onnx.IR_VERSION, 3, -1) if _loads(v, 13)), 3)
    max_opset = next((v for v in range(onnx.defs.onnx_opset_version(), 7, -1)
                      if _loads(max_ir, v)), 7)
    return max_ir, max_opset


def fit_ir_version(model: ir.Model) -> str | None:
    """Lower the model's IR version to the highest ONNX Runtime reads when that is the only
    thing it cannot read (its ai.onnx opset is one ORT supports); returns a note saying so."""
    max_ir, max_opset = runtime_limits()
    if model.ir_version <= max_ir or model.opset_imports.get("", 0) > max_opset:
        return None
    before, model.ir_version = model.ir_version, max_ir
    return (f"lowered the IR version from {before} to {max_ir}, the highest ONNX Runtime "
            f"{ort.__version__} reads (the model uses opset {model.opset_imports.get('', '-')}, "
            "which it supports).")


def runtime_limits_problem(model: ir.Model) -> str | None:
    """One sentence when the model's IR version or ai.onnx opset is above what ONNX Runtime
    reads (after fit_ir_version), else None."""
    max_ir, max_opset = runtime_limits()
    opset = model.opset_imports.get("", 0)
    if model.ir_version <= max_ir and opset <= max_opset:
        return None
    parts = []
    if model.ir_version > max_ir:
        parts.append(f"IR version {model.ir_version} (ONNX Runtime {ort.__version__} reads IR "
                     f"versions up to {max_ir})")
    if opset > max_opset:
        parts.append(f"ai.onnx opset {opset} (it supports opsets up to {max_opset})")
    fix = (f"re-export it with opset {max_opset} or lower (onnx.version_converter can convert "
           "it), or upgrade onnxruntime" if opset > max_opset else "upgrade onnxruntime")
    return f"the model has {' and '.join(parts)}; {fix}."

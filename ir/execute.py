"""Run an IR model with ONNX Runtime, optionally capturing intermediate values as extra outputs."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from winnow.errors import ExecutionError

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


def _with_captures(model: ir.Model, capture: Sequence[str]) -> onnx.ModelProto:
    # ORT gets the model as bytes and cannot resolve external data: bring those tensors in.
    ir.external_data.load_to_model(model)
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


def get_session(model: ir.Model, capture: Sequence[str] = (), threads: int = 0,
                optimize: bool = False) -> ort.InferenceSession:
    """An ORT session for the model (plus capture outputs), cached by model content."""
    proto = _with_captures(model, tuple(capture))
    data = proto.SerializeToString()
    key = (hashlib.sha1(data).hexdigest(), (str(threads), str(optimize)))
    session = _SESSION_CACHE.get(key)
    if session is not None:
        _SESSION_CACHE.move_to_end(key)
        return session
    try:
        session = ort.InferenceSession(data, session_options(threads, optimize),
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        raise ExecutionError(
            f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from exc
    _SESSION_CACHE[key] = session
    if len(_SESSION_CACHE) > _SESSION_CACHE_SIZE:
        _SESSION_CACHE.popitem(last=False)
    return session


def run(model: ir.Model, feeds: Mapping[str, np.ndarray], capture: Sequence[str] = (),
        threads: int = 0) -> dict[str, np.ndarray]:
    """Run the model on one batch of feeds; returns graph outputs plus captured values by name."""
    session = get_session(model, capture, threads)
    expected = {i.name for i in session.get_inputs()}
    missing = expected - set(feeds)
    if missing:
        raise ExecutionError(f"missing input(s) {', '.join(sorted(missing))}; the model takes "
                             f"{', '.join(sorted(expected))}.")
    names = [o.name for o in session.get_outputs()]
    try:
        outs = session.run(names, {k: v for k, v in feeds.items() if k in expected})
    except Exception as exc:  # noqa: BLE001
        raise ExecutionError(f"ONNX Runtime failed to run the model: {str(exc).splitlines()[0]}") from exc
    return dict(zip(names, outs))


def clear_cache() -> None:
    """Drop every cached ORT session."""
    _SESSION_CACHE.clear()

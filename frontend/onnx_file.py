"""Load an ONNX file into the IR, refusing corrupt files and external data outside its folder."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import onnx_ir as ir
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

from winnow.errors import ModelFormatError, SourceError


def _read_proto(path: Path) -> onnx.ModelProto:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (google.protobuf.message.DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise ModelFormatError(
            f"'{path}' is not a readable ONNX model (truncated or corrupt: {type(exc).__name__}); "
            "re-export it or check the download.") from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.graph.output:
        raise ModelFormatError(
            f"'{path}' does not hold an ONNX model graph (no IR version or no outputs); "
            "give a .onnx file written by an ONNX exporter.")
    _check_text(proto.graph)
    _check_opsets(proto)
    _check_single_producers(proto.graph)
    _check_io_types(proto.graph)
    _check_attribute_types(proto.graph)
    return proto


def _check_attribute_types(graph: onnx.GraphProto) -> None:
    """Every node attribute must say its type (an untyped one cannot be read or written back)."""
    for node in _nodes(graph):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.UNDEFINED and not attr.ref_attr_name:
                raise ModelFormatError(f"{_node_label(node)} has attribute '{attr.name}' without "
                                       "a type; re-export the model.")


def _check_io_types(graph: onnx.GraphProto) -> None:
    """Graph inputs and outputs that are tensors must name an element type."""
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            tensor = value.type.tensor_type if value.type.HasField("tensor_type") else None
            if tensor is not None and tensor.elem_type == onnx.TensorProto.UNDEFINED:
                raise ModelFormatError(f"graph {kind} '{value.name}' is a tensor without an "
                                       "element type (UNDEFINED); re-export the model.")


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of a graph and of its If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(sub)


def _check_text(graph: onnx.GraphProto) -> None:
    """Names, op types and domains must be UTF-8 text (protobuf hands back bytes otherwise)."""
    values = [*graph.input, *graph.output, *graph.initializer]
    fields = [(f"graph '{graph.name}'", v.name) for v in values]
    for node in _nodes(graph):
        fields += [("a node", text) for text in (node.op_type, node.domain, node.name,
                                                 *node.input, *node.output)]
    for where, text in fields:
        if not isinstance(text, str):
            raise ModelFormatError(f"{where} holds a name or op type that is not UTF-8 text "
                                   f"({bytes(text)[:20]!r}); the file is corrupt, re-export it.")


def _node_label(node: onnx.NodeProto) -> str:
    return f"node '{node.name}' ({node.op_type})" if node.name else f"an unnamed {node.op_type} node"


def _check_opsets(proto: onnx.ModelProto) -> None:
    """Every domain a node uses must have an opset import (or be a model-local function's)."""
    imported = {d or "ai.onnx" for d in (o.domain for o in proto.opset_import)}
    imported |= {f.domain for f in proto.functions}
    for node in _nodes(proto.graph):
        if (node.domain or "ai.onnx") not in imported:
            raise ModelFormatError(
                f"{_node_label(node)} uses the operator domain "
                f"'{node.domain or 'ai.onnx'}', for which the model imports no opset; add an "
                "opset_import for it (onnx.helper.make_opsetid) or re-export the model.")


def _check_single_producers(graph: onnx.GraphProto) -> None:
    """Each value name is defined once per graph: by an input, an initializer or one node."""
    defined = {v.name: "a graph input" for v in graph.input}
    for init in graph.initializer:
        defined.setdefault(init.name, "an initializer")
    for node in graph.node:
        for name in node.output:
            if name and name in defined:
                raise ModelFormatError(
                    f"value '{name}' in graph '{graph.name}' is produced by {_node_label(node)} "
                    f"but is already {defined[name]}; every value needs one producer, re-export "
                    "the model.")
            if name:
                defined[name] = f"the output of {_node_label(node)}"
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _check_single_producers(sub)


def check_external_data(proto: onnx.ModelProto, folder: Path) -> None:
    """Refuse external-data locations that escape the model's folder, do not exist, or are
    shorter than the tensors they hold."""
    root = folder.resolve()
    for tensor in _get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(tensor)
        location = info.location
        target = (root / location).resolve()
        if not location:
            raise ModelFormatError(f"tensor '{tensor.name}' is stored externally but names no "
                                   "data file; re-export the model.")
        if Path(location).is_absolute() or not target.is_relative_to(root):
            raise ModelFormatError(
                f"tensor '{tensor.name}' stores its data at '{location}', outside the model's "
                f"folder '{root}'; winnow only reads external data inside that folder.")
        if not target.is_file():
            raise ModelFormatError(
                f"tensor '{tensor.name}' needs external data file '{location}', which is missing "
                f"from '{root}'; copy it next to the model.")
        _check_external_size(tensor, info, target)


def _external_info(tensor: onnx.TensorProto) -> ExternalDataInfo:
    try:
        return ExternalDataInfo(tensor)
    except ValueError as exc:
        raise ModelFormatError(f"tensor '{tensor.name}' has unreadable external data fields "
                               f"({str(exc).splitlines()[0]}); re-export the model.") from None


def _check_external_size(tensor: onnx.TensorProto, info: ExternalDataInfo, target: Path) -> None:
    """The file must hold the tensor's bytes from its offset on (its `length`, or dims x item size)."""
    offset = info.offset or 0
    needed = info.length
    itemsize = _ITEM_BYTES.get(tensor.data_type)
    if needed is None and itemsize is not None:
        needed = math.prod(tensor.dims) * itemsize
    if needed is None:
        return
    size = target.stat().st_size
    if offset + needed > size:
        raise ModelFormatError(
            f"tensor '{tensor.name}' needs {needed:,} bytes at offset {offset:,} of external "
            f"data file '{info.location}', which has only {size:,} bytes (truncated or "
            "overwritten); copy the complete file next to the model.")


_ITEM_BYTES = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)).itemsize
               for t in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                         onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                         onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
                         onnx.TensorProto.BOOL)}


def load_onnx(path: str | Path) -> ir.Model:
    """Load a .onnx file (external data allowed inside its folder) into an onnx-ir Model."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"ONNX file '{path}' does not exist; check the path.")
    proto = _read_proto(path)
    check_external_data(proto, path.parent)
    try:
        model = ir.load(path)
    except Exception as exc:  # noqa: BLE001 - onnx-ir raises several types on bad files
        raise ModelFormatError(f"'{path}' could not be read into the IR: {exc}") from None
    _sort_nodes(model, path)
    model.metadata_props["winnow.source"] = str(path)
    return model


def _sort_nodes(model: ir.Model, path: Path) -> None:
    """Put the nodes of the graph and its subgraphs in topological order (ONNX requires it,
    some writers do not keep it), refusing a graph whose nodes form a cycle."""
    try:
        model.graph.sort()
    except ValueError:
        raise ModelFormatError(f"'{path}' is not a valid ONNX model: the graph is not acyclic "
                               "(some node depends on its own output); re-export the "
                               "model.") from None

"""Load an ONNX file into the IR, refusing corrupt files and external data outside its folder."""

from __future__ import annotations

from pathlib import Path

import google.protobuf.message
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
    return proto


def check_external_data(proto: onnx.ModelProto, folder: Path) -> None:
    """Refuse external-data locations that escape the model's folder or do not exist."""
    root = folder.resolve()
    for tensor in _get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = ExternalDataInfo(tensor).location
        target = (root / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(root):
            raise ModelFormatError(
                f"tensor '{tensor.name}' stores its data at '{location}', outside the model's "
                f"folder '{root}'; winnow only reads external data inside that folder.")
        if not target.is_file():
            raise ModelFormatError(
                f"tensor '{tensor.name}' needs external data file '{location}', which is missing "
                f"from '{root}'; copy it next to the model.")


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
    model.metadata_props["winnow.source"] = str(path)
    return model

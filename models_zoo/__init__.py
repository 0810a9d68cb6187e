"""The model zoo: real models with real data, by name (`zoo:NAME`, `onnx:NAME`)."""

from __future__ import annotations

import functools

import onnx_ir as ir

from winnow.errors import SourceError
from winnow.models_zoo.base import OnnxZooModel, TaskMetric, TorchZooModel, ZooModel

__all__ = ["ZooModel", "TorchZooModel", "OnnxZooModel", "TaskMetric", "names", "onnx_names",
           "get", "load_named"]

DEFAULT = "minilm"


@functools.cache
def _zoo() -> dict[str, ZooModel]:
    """The curated entries, in display order (built lazily; nothing heavy happens here)."""
    from winnow.models_zoo import digits, minilm, ppocr, tiny_gpt

    entries = [minilm.MiniLM(), *digits.models(), tiny_gpt.TinyGPTModel(), *ppocr.models()]
    return {m.name: m for m in entries}


@functools.cache
def _onnx_zoo() -> dict[str, ZooModel]:
    """The onnx package's shipped test models, by name."""
    from winnow.models_zoo import onnx_tests

    return {m.name: m for m in onnx_tests.models()}


def names() -> list[str]:
    """Names of the curated zoo models (`zoo:NAME`)."""
    return list(_zoo())


def onnx_names() -> list[str]:
    """Names of the onnx package's test models (`onnx:NAME`)."""
    return list(_onnx_zoo())


def _unknown(kind: str, name: str, available: list[str]) -> SourceError:
    shown = ", ".join(available[:40]) + (f", ... ({len(available)} in all)"
                                         if len(available) > 40 else "")
    return SourceError(f"unknown {kind} model '{name}'; available: {shown}.")


def get(name: str) -> ZooModel:
    """The zoo entry for 'NAME', 'zoo:NAME' or 'onnx:NAME'; SourceError lists the names if unknown."""
    prefix, _, bare = name.rpartition(":")
    if prefix == "onnx":
        if bare not in _onnx_zoo():
            raise _unknown("onnx test", bare, onnx_names())
        return _onnx_zoo()[bare]
    if prefix not in ("", "zoo"):
        raise SourceError(f"'{name}' is not a zoo name; write 'zoo:NAME' or 'onnx:NAME'.")
    if bare in _zoo():
        return _zoo()[bare]
    if prefix == "" and bare in _onnx_zoo():
        return _onnx_zoo()[bare]
    raise _unknown("zoo", bare, names())


def load_named(name: str) -> ir.Model:
    """Load 'zoo:NAME' or 'onnx:NAME' into the IR, with example feeds in its metadata."""
    return get(name).load_ir()

"""The model zoo: real models with real data, by name (`zoo:NAME`, `onnx:NAME`)."""

from __future__ import annotations

import functools
import importlib

import onnx_ir as ir

from winnow.errors import SourceError, require_extra
from winnow.models_zoo.base import OnnxZooModel, TaskMetric, TorchZooModel, ZooModel

__all__ = ["ZooModel", "TorchZooModel", "OnnxZooModel", "TaskMetric", "names", "onnx_names",
           "get", "load_named", "EXTRA"]

DEFAULT = "minilm"
EXTRA = "zoo"
_TORCH = ("torch", "safetensors")
# name -> (module in winnow.models_zoo, the packages of the `zoo` extra it imports), in display
# order. A module is imported only when one of its models is asked for, so a missing optional
# package stops only the models that need it.
CURATED: dict[str, tuple[str, tuple[str, ...]]] = {
    "minilm": ("minilm", (*_TORCH, "transformers", "tokenizers", "scipy")),
    "digits-cnn": ("digits", (*_TORCH, "sklearn")),
    "digits-vit": ("digits", (*_TORCH, "sklearn")),
    "tiny-gpt": ("tiny_gpt", _TORCH),
    "ppocr-det": ("ppocr", ("PIL", "matplotlib", "yaml")),
    "ppocr-rec": ("ppocr", ("PIL", "matplotlib", "yaml")),
}


@functools.cache
def _module_models(module: str) -> dict[str, ZooModel]:
    """The entries one zoo module defines (`models()`), by name."""
    return {m.name: m for m in importlib.import_module(f"winnow.models_zoo.{module}").models()}


def _curated(name: str) -> ZooModel:
    """The curated entry `name`, after checking that the packages it imports are installed."""
    module, packages = CURATED[name]
    require_extra(f"zoo:{name}", EXTRA, packages)
    return _module_models(module)[name]


@functools.cache
def _onnx_zoo() -> dict[str, ZooModel]:
    """The onnx package's shipped test models, by name."""
    from winnow.models_zoo import onnx_tests

    return {m.name: m for m in onnx_tests.models()}


def names() -> list[str]:
    """Names of the curated zoo models (`zoo:NAME`)."""
    return list(CURATED)


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
    if bare in CURATED:
        return _curated(bare)
    if prefix == "" and bare in _onnx_zoo():
        return _onnx_zoo()[bare]
    raise _unknown("zoo", bare, names())


def load_named(name: str) -> ir.Model:
    """Load 'zoo:NAME' or 'onnx:NAME' into the IR, with example feeds in its metadata."""
    return get(name).load_ir()

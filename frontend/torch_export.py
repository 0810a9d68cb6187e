"""Load a torch.nn.Module into the IR: torch.export (FX graph) -> torch.onnx (dynamo) -> onnx-ir."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch.utils import _pytree

from winnow import progress
from winnow.errors import UnsupportedModelError
from winnow.frontend import EXAMPLE_FEEDS_KEY


def load_module(module: torch.nn.Module, example_inputs: Any, dynamic_shapes: Any = None,
                output_names: list[str] | None = None, label: str | None = None) -> ir.Model:
    """Export `module` (in eval mode, without grad) on `example_inputs` into an onnx-ir Model.

    `dynamic_shapes` follows torch.export; a string axis name (`{0: "batch"}`) makes that axis
    dynamic and names it in the ONNX graph. `label` names the module in progress and errors.
    """
    args = _as_tuple(example_inputs)
    name = label or type(module).__name__
    was_training = module.training
    module.eval()
    try:
        with progress.step(f"exporting {name} with torch.export"), _quiet_exporter():
            model = _export(module, name, args, dynamic_shapes, output_names)
    finally:
        module.train(was_training)
    model.metadata_props["winnow.source"] = f"torch:{name}"
    feeds = _example_feeds(model, args)
    if feeds is not None:
        model.meta[EXAMPLE_FEEDS_KEY] = feeds
    return model


def _export(module: torch.nn.Module, name: str, args: tuple, dynamic_shapes: Any,
            output_names: list[str] | None) -> ir.Model:
    try:
        with torch.no_grad():
            program = torch.export.export(module, args, dynamic_shapes=_export_dims(dynamic_shapes))
            onnx_program = torch.onnx.export(program, args, dynamo=True, verbose=False,
                                             dynamic_shapes=dynamic_shapes,
                                             output_names=output_names)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many unrelated types
        raise UnsupportedModelError(
            f"torch.export could not export {name}: {first_line(exc)}") from exc
    return onnx_program.model


def _export_dims(dynamic_shapes: Any) -> Any:
    """Named string axes (`{0: "batch"}`) become Dim.DYNAMIC for torch.export; Dims pass through."""
    if dynamic_shapes is None:
        return None
    return _pytree.tree_map(
        lambda d: torch.export.Dim.DYNAMIC if isinstance(d, str) else d, dynamic_shapes)


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _example_feeds(model: ir.Model, args: tuple) -> dict[str, np.ndarray] | None:
    tensors = [t for t in _pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    if len(tensors) != len(inputs):
        return None
    return {v.name: t.detach().cpu().numpy() for v, t in zip(inputs, tensors)}


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if there is none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class _MuteThisThread(io.TextIOBase):
    """A stderr that drops the calling thread's writes and passes other threads' (the spinner)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._owner = threading.get_ident()

    def write(self, text: str) -> int:
        if threading.get_ident() == self._owner:
            return len(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's log lines, warnings and its partial-graph dump on failure."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(_MuteThisThread(sys.stderr)):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)

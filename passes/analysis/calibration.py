"""Calibration data for analyses: the batches to run, reference outputs and the fidelity loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from winnow.errors import SourceError
from winnow.frontend import example_feeds
from winnow.ir.execute import run
from winnow.ir.inputs import feeds_for, feeds_origin
from winnow.ir.user_inputs import user_inputs_record


def calibration_batches(model: ir.Model, ctx: Any) -> list[dict[str, np.ndarray]]:
    """The context's calibration batches (a list of feed dicts), else the model's example feeds."""
    data = getattr(ctx, "calibration", None) if ctx is not None else None
    if data is None:
        return [feeds_for(model)]
    if isinstance(data, Mapping):
        return [dict(data)]
    batches = [dict(b) for b in data]
    return batches or [feeds_for(model)]


def _as_batches(data: Any) -> list[dict[str, np.ndarray]]:
    if isinstance(data, Mapping):
        data = [data]
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence) or not all(
            isinstance(b, Mapping) for b in data):
        raise SourceError("calibration data must be a feed dict (input name -> array) or a list "
                          f"of feed dicts; got a {type(data).__name__}.")
    if not data:
        raise SourceError("the calibration data is an empty list; give at least one feed dict.")
    return [{k: np.asarray(v) for k, v in b.items()} for b in data]


def pick_calibration(source: Any, model: ir.Model, calibration: Any = None, zoo: Any = None
                     ) -> tuple[list[dict[str, np.ndarray]], str]:
    """The calibration batches and where they came from: explicit, the inputs the user gave
    (--input-shapes / --example-inputs), the zoo model's calibration split, the frontend's
    example feeds, or random feeds (seed 0). `zoo`: the source's zoo entry when the caller
    already looked it up."""
    if calibration is not None:
        return _as_batches(calibration), "explicit"
    if user_inputs_record(model) is not None:
        return [feeds_for(model)], feeds_origin(model)
    entry = zoo if zoo is not None else zoo_entry(source, model)
    if entry is not None:
        batches = entry.calibration()
        if batches:
            return _as_batches(batches), f"{entry.source} calibration split"
    if example_feeds(model) is not None:
        return [feeds_for(model)], "example inputs"
    return [feeds_for(model)], "random inputs (seed 0)"


def task_options(source: Any, model: ir.Model, zoo: Any = None) -> dict[str, Any]:
    """Pass-context options a zoo model contributes: its per-batch `task_loss` when it has one
    (das-skip then rewards the task itself, e.g. an LM's cross-entropy, not output cosine) and
    its `model_kind` (distill matches a causal LM's logits by KL divergence).
    `zoo`: the source's zoo entry when the caller already looked it up."""
    entry = zoo if zoo is not None else zoo_entry(source, model)
    if entry is None:  # a plain file never imports the zoo (nor torch through it)
        return {}
    from winnow.models_zoo.base import ZooModel

    options: dict[str, Any] = {"model_kind": entry.kind}
    if type(entry).task_loss is not ZooModel.task_loss:
        options["task_loss"] = entry.task_loss
    return options


def zoo_entry(source: Any, model: ir.Model) -> Any:
    """The zoo entry behind a 'zoo:NAME' / 'onnx:NAME' source, else None."""
    if not (isinstance(source, str) and source.startswith(("zoo:", "onnx:"))
            and model.metadata_props.get("winnow.zoo")):
        return None
    from winnow.models_zoo import get

    return get(source)


def reference_outputs(model: ir.Model, batches: Sequence[Mapping[str, np.ndarray]]
                      ) -> list[dict[str, np.ndarray]]:
    """The unmodified model's graph outputs on each batch."""
    return [run(model, batch) for batch in batches]


def _per_sample(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        return x.reshape(1, 1)
    return x.reshape(x.shape[0], -1)


def fidelity_loss(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> float:
    """Mean over outputs and samples (first axis) of 1 - cosine of the flattened outputs.

    Outputs that are not floating point (indices, masks) are skipped; a zero vector against a
    zero vector counts as identical.
    """
    losses = []
    for name, r in ref.items():
        r = np.asarray(r)
        if name not in out or not np.issubdtype(r.dtype, np.floating):
            continue
        a, b = _per_sample(r), _per_sample(out[name])
        dot = np.sum(a * b, axis=1)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        denom = na * nb
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0),
                       np.where((na == 0) & (nb == 0), 1.0, 0.0))
        losses.append(1.0 - cos)
    if not losses:
        return 0.0
    return float(np.mean(np.concatenate(losses)))


def split_batch(feeds: Mapping[str, np.ndarray], rows: int, model: ir.Model | None = None
                ) -> list[dict[str, np.ndarray]]:
    """Split a feed dict into mini-batches of `rows` along the first axis.

    Only when every array feed of rank >= 1 has the same first-axis size and, given the model,
    each of those inputs has a symbolic first axis (else the batch is kept whole). A 2-D
    `attention_mask` lets trailing columns that are padding in every row of a mini-batch be
    trimmed from all 2-D feeds of the same shape (right-padded tokens), where the second axis
    is symbolic too.
    """
    arrays = {k: np.asarray(v) for k, v in feeds.items()}
    sizes = {v.shape[0] for v in arrays.values() if v.ndim >= 1}
    if rows <= 0 or len(sizes) != 1 or not _dynamic_axis(model, arrays, 0):
        return [dict(arrays)]
    (n,) = sizes
    trim = _dynamic_axis(model, {k: v for k, v in arrays.items() if v.ndim == 2}, 1)
    out = []
    for lo in range(0, n, rows):
        part = {k: (v[lo:lo + rows] if v.ndim >= 1 else v) for k, v in arrays.items()}
        out.append(_trim_padding(part) if trim else part)
    return out


def _dynamic_axis(model: ir.Model | None, arrays: Mapping[str, np.ndarray], axis: int) -> bool:
    if model is None:
        return True
    inputs = {v.name: v for v in model.graph.inputs}
    for name, array in arrays.items():
        value = inputs.get(name)
        if value is None or array.ndim <= axis:
            continue
        if value.shape is None or len(value.shape) <= axis or isinstance(value.shape[axis], int):
            return False
    return True


def _trim_padding(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mask = feeds.get("attention_mask")
    if mask is None or mask.ndim != 2 or not mask.any():
        return feeds
    used = np.flatnonzero(mask.any(axis=0))
    length = int(used[-1]) + 1
    if length == mask.shape[1]:
        return feeds
    return {k: (v[:, :length] if v.ndim == 2 and v.shape == mask.shape else v)
            for k, v in feeds.items()}

"""Closed-form refit of the weights that read pruned conv channels (ThiNet-style reconstruction):
each reader (a Conv or ConvTranspose of one group, or a Gemm) is refitted by ridge least squares
so that, on the pruned model's own activations, it reproduces what the unpruned model's reader
computed. Convs are fitted on sampled output positions through their input patches (im2col of
the kept channels, strides, pads and dilations as the node has them; for a ConvTranspose the
input pixels that reach each output pixel). The readers are refitted in a few stages by depth
(readers upstream of none still being fitted share one stage): one session and one run per
calibration batch capture every input a stage reads, so each fit absorbs the error of the
stages before it without re-running the model once per reader."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from winnow.ir.execute import get_session
from winnow.ir.pruning import const_array, refit_linear, set_const_input

ROWS_PER_BATCH = 2048  # output positions sampled per calibration batch and reader
STAGES = 6  # refit rounds (each one session and one run per calibration batch)
MIN_ROWS = 32  # a reader with fewer sampled rows than this or than its inputs is left as pruned


@dataclasses.dataclass
class ReaderTargets:
    """What one reader computed on the unpruned model at sampled positions."""

    node: ir.Node
    positions: list[np.ndarray]  # per batch: (n, oh, ow) index rows, or sample rows for Gemm
    outputs: np.ndarray  # [rows, out_channels]


def refittable(node: ir.Node) -> bool:
    """Readers this module can refit: 2-D Conv / ConvTranspose of one group with explicit pads (no
    output_shape), or a plain Gemm."""
    if node.op_type in ("Conv", "ConvTranspose"):
        weight = const_array(node.inputs[1])
        pad = node.attributes.get("auto_pad")
        return weight is not None and weight.ndim == 4 and _attr(node, "group", 1) == 1 \
            and (pad is None or pad.as_string() == "NOTSET") \
            and "output_shape" not in node.attributes
    if node.op_type == "Gemm":
        alpha = node.attributes.get("alpha")
        beta = node.attributes.get("beta")
        return not _attr(node, "transA", 0) and const_array(node.inputs[1]) is not None \
            and (alpha is None or alpha.as_float() == 1.0) and (beta is None or beta.as_float() == 1.0)
    return False


def capture_targets(model: ir.Model, readers: Sequence[ir.Node], batches: Sequence[dict],
                    seed: int = 0) -> list[ReaderTargets]:
    """Run the unpruned model once per batch and keep each reader's output at sampled positions."""
    rng = np.random.default_rng(seed)
    names = [r.outputs[0].name for r in readers]
    targets = [ReaderTargets(r, [], np.zeros((0, 0))) for r in readers]
    chunks: list[list[np.ndarray]] = [[] for _ in readers]
    for captured in _runs(model, names, batches):
        for k, reader in enumerate(readers):
            y = np.asarray(captured[names[k]], np.float64)
            pos = _sample_positions(y.shape, rng)
            targets[k].positions.append(pos)
            chunks[k].append(_rows(y, pos))
    for k, t in enumerate(targets):
        t.outputs = np.concatenate(chunks[k])
    return targets


def refit_readers(model: ir.Model, targets: Sequence[ReaderTargets], batches: Sequence[dict],
                  ridge: float, kept_outputs: Mapping[ir.Node, np.ndarray] | None = None,
                  stages: int = STAGES) -> dict[str, float]:
    """Refit every reader on the (pruned) model's inputs at the sampled positions (only the
    output channels `kept_outputs` keeps of a reader whose own filters were pruned too), stage
    by stage in depth order; {node: R^2} of the readers refitted (one with fewer sampled rows
    than MIN_ROWS or than input features keeps its pruned weights)."""
    kept_outputs = kept_outputs or {}
    scores = {}
    for stage in _stages(model, [t.node for t in targets], stages):
        chosen = [t for t in targets if t.node in stage]
        names = list(dict.fromkeys(t.node.inputs[0].name for t in chosen))
        features: list[list[np.ndarray]] = [[] for _ in chosen]
        for b, captured in enumerate(_runs(model, names, batches)):
            for k, t in enumerate(chosen):
                x = np.asarray(captured[t.node.inputs[0].name], np.float64)
                features[k].append(_features(t.node, x, t.positions[b]))
        for k, t in enumerate(chosen):
            x = np.concatenate(features[k])
            if len(x) < max(MIN_ROWS, x.shape[1]):
                continue  # e.g. an SE conv on pooled channels: one row per image would overfit
            y = t.outputs[:, kept_outputs[t.node]] if t.node in kept_outputs else t.outputs
            weight, bias = refit_linear(x, y, ridge)
            resid = y - x @ weight - bias
            total = ((y - y.mean(0)) ** 2).sum()
            scores[t.node.name] = 1.0 - float((resid ** 2).sum() / max(total, 1e-12))
            _set_reader(model.graph, t.node, weight, bias)
    return scores


def _runs(model: ir.Model, names: Sequence[str], batches: Sequence[dict]):
    """The captured values `names` on each batch, from one session."""
    session = get_session(model, names)
    inputs = {i.name for i in session.get_inputs()}
    for feeds in batches:
        outs = session.run(list(names), {k: v for k, v in feeds.items() if k in inputs})
        yield dict(zip(names, outs))


def _stages(model: ir.Model, readers: Sequence[ir.Node], count: int) -> list[set[ir.Node]]:
    """Readers split into at most `count` stages by how many readers lie upstream of each."""
    wanted = set(readers)
    depth: dict[ir.Value, int] = {}
    level = {}
    for node in model.graph:  # topological order
        d = max((depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        if node in wanted:
            level[node] = d
        for v in node.outputs:
            depth[v] = d + (node in wanted)
    top = max(level.values(), default=0) + 1
    stages: dict[int, set[ir.Node]] = {}
    for node in readers:
        stages.setdefault(level[node] * count // top, set()).add(node)
    return [stages[k] for k in sorted(stages)]


def _sample_positions(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Up to ROWS_PER_BATCH (sample, spatial...) index rows of an output of `shape`."""
    grid = [shape[0], *shape[2:]]
    total = int(np.prod(grid))
    flat = rng.choice(total, size=min(total, ROWS_PER_BATCH), replace=False)
    return np.stack(np.unravel_index(np.sort(flat), grid), axis=1)


def _rows(y: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Output channels at the sampled positions: [rows, channels]."""
    if y.ndim == 2:
        return y[pos[:, 0]]
    return y[(pos[:, 0], slice(None), *pos[:, 1:].T)]  # advanced indices around a slice: [R, C]


def _features(node: ir.Node, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The reader's input features at the sampled output positions (im2col for a Conv)."""
    if node.op_type == "Gemm":
        return x[pos[:, 0]]
    kh, kw = const_array(node.inputs[1]).shape[2:]
    strides = _ints(node, "strides", [1, 1])
    dilations = _ints(node, "dilations", [1, 1])
    pads = _ints(node, "pads", [0, 0, 0, 0])
    if node.op_type == "ConvTranspose":
        return _transposed_features(x, pos, (kh, kw), strides, dilations, pads)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    rows = pos[:, 1:2] * strides[0] + np.arange(kh)[None, :] * dilations[0]  # [R, kh]
    cols = pos[:, 2:3] * strides[1] + np.arange(kw)[None, :] * dilations[1]  # [R, kw]
    patch = xp[pos[:, 0][:, None, None, None], np.arange(x.shape[1])[None, :, None, None],
               rows[:, None, :, None], cols[:, None, None, :]]  # [R, C, kh, kw]
    return patch.reshape(len(pos), -1)


def _transposed_features(x: np.ndarray, pos: np.ndarray, kernel: tuple[int, int],
                         strides: list[int], dilations: list[int], pads: list[int]) -> np.ndarray:
    """[R, C*kh*kw]: the input pixel that kernel tap (kh, kw) carries to each sampled output
    pixel of a ConvTranspose (out = in * stride + tap * dilation - pad), 0 where none does."""
    taps, valid = [], []
    for axis in (0, 1):
        t = pos[:, 1 + axis, None] + pads[axis] - np.arange(kernel[axis])[None, :] * dilations[axis]
        ok = (t >= 0) & (t % strides[axis] == 0) & (t // strides[axis] < x.shape[2 + axis])
        taps.append(np.where(ok, t // strides[axis], 0))
        valid.append(ok)
    patch = x[pos[:, 0][:, None, None, None], np.arange(x.shape[1])[None, :, None, None],
              taps[0][:, None, :, None], taps[1][:, None, None, :]]  # [R, C, kh, kw]
    patch = patch * (valid[0][:, None, :, None] & valid[1][:, None, None, :])
    return patch.reshape(len(pos), -1)


def _set_reader(graph: ir.Graph, node: ir.Node, weight: np.ndarray, bias: np.ndarray) -> None:
    """Write a fitted [features, out] matrix and bias back in the node's own layout."""
    old = const_array(node.inputs[1])
    if node.op_type == "Conv":
        new = weight.T.reshape(old.shape[0], *old.shape[1:])
    elif node.op_type == "ConvTranspose":  # features (in, kh, kw); the weight [in, out, kh, kw]
        new = weight.reshape(old.shape[0], *old.shape[2:], old.shape[1]).transpose(0, 3, 1, 2)
    else:
        new = weight.T if _attr(node, "transB", 0) else weight
    set_const_input(graph, node, 1, new.astype(old.dtype))
    bias = bias.astype(old.dtype)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        shape = const_array(node.inputs[2]).shape
        set_const_input(graph, node, 2, bias.reshape(shape) if np.prod(shape) == bias.size
                        else bias)  # a scalar Gemm C becomes a per-output bias
        return
    node.resize_inputs(3)
    set_const_input(graph, node, 2, bias)


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else default


def _attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default

"""`trim-padding`: crop the trailing sequence positions that every row of a batch masks out, at
the top of the graph, so the model computes only up to the longest real row.

A sentence encoder deployed with inputs padded to a fixed length (tokenizer `padding=max_length`)
spends most of its time on padding: zoo:minilm's held-out sentences are 26 tokens on average,
padded to 64. Attention gives a masked key exactly zero weight and masked pooling drops masked
positions, so when no output carries the sequence axis, the trailing positions every row masks
cannot change an output. The pass inserts, before the first node:

    length = max(1, 1 + the last position any row's mask keeps)
    x[:, :length] for the mask and every other [batch, seq] input on the same sequence axis

Preconditions, checked on the graph: one rank-2 mask input (named by `mask`, or the one input
whose name contains "mask") whose second axis is symbolic; every input that uses that axis is
[batch, seq] on it; every output's shape is known and none carries it. Then, like `fuse`, the
rewritten copy must match the original within `tolerance` on calibration feeds and on the same
feeds padded on the right with other tokens behind the padding (proving the padding is ignored);
else the model is left as it was, with the reason. Lossless: a position is cropped only when
every row masks it, so left padding or padding in the middle is never cropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from winnow.errors import PassConfigError
from winnow.passes.base import register_pass
from winnow.passes.checked import CheckedRewrite, CheckOptions, check_batches
from winnow.passes.config import option
from winnow.passes.manager import PassContext

CHECK_SEED = 0


@dataclass(frozen=True)
class PaddedInputs:
    """The mask input and every input cropped with it (the mask included), on axis 1."""

    mask: ir.Value
    cropped: tuple[ir.Value, ...]


@register_pass
class TrimPaddingPass(CheckedRewrite):
    """Crop the sequence positions every row's mask drops before the model runs on them."""

    name = "trim-padding"
    description = ("Crop trailing sequence positions that every row's attention mask drops, at the "
                   "graph's inputs (padded encoders whose outputs have no sequence axis); kept only "
                   "when outputs match on padded feeds.")
    unchanged_report = {"trimmed": []}
    checked_on = "padded feeds: the outputs read masked positions"

    @dataclass(frozen=True)
    class Config(CheckOptions):
        """Options of trim-padding."""

        mask: str = option("", "name of the mask input (default: the one rank-2 input whose name "
                           "contains 'mask')")
        tolerance: float = option(1e-4, "largest absolute output difference the trimmed model may "
                                  "show against the original on padded calibration feeds", min=0.0)
        samples: int = option(8, "calibration samples the check runs", min=1)

    def precondition(self, model: ir.Model) -> str | None:
        """Why the model cannot be trimmed, if it cannot."""
        found = padded_inputs(model, self.config.mask)
        return found if isinstance(found, str) else None

    def check_feeds(self, model: ir.Model, ctx: PassContext) -> list | str:
        """Calibration feeds padded at the end, so that trimming has positions to drop."""
        found = padded_inputs(model, self.config.mask)
        feeds = padded_check_feeds(check_batches(model, ctx, self.config.samples), found)
        return feeds or "no calibration feeds carry the mask input"

    def rewrite(self, model: ir.Model, feeds: list) -> dict:
        """Insert the crop at the inputs."""
        found = padded_inputs(model, self.config.mask)
        insert_trim(model, [v.name for v in found.cropped], found.mask.name)
        return {"trimmed": [v.name for v in found.cropped], "mask": found.mask.name}


def padded_inputs(model: ir.Model, mask_name: str = "") -> PaddedInputs | str:
    """The mask and the inputs cropped with it, or why the model cannot be trimmed."""
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    mask = _mask_input(inputs, mask_name)
    if isinstance(mask, str):
        return mask
    seq = mask.shape[1]
    if not isinstance(seq, ir.SymbolicDim) or seq.value is None:
        return f"the mask '{mask.name}' has a fixed or unnamed sequence axis ({seq})"
    cropped = []
    for value in inputs:
        axes = [i for i, d in enumerate(value.shape or ()) if d == seq]
        if not axes:
            continue
        if axes != [1] or len(value.shape) != 2:
            return (f"input '{value.name}' carries the sequence axis '{seq}' other than as "
                    "[batch, seq]")
        cropped.append(value)
    for out in model.graph.outputs:
        if out.shape is None:
            return f"output '{out.name}' has no known shape (run shape-inference first)"
        if any(d == seq for d in out.shape):
            return f"output '{out.name}' carries the sequence axis '{seq}': cropping would change it"
    return PaddedInputs(mask, tuple(cropped))


def _mask_input(inputs: Sequence[ir.Value], mask_name: str) -> ir.Value | str:
    """The named mask input (a PassConfigError listing the inputs when it does not exist), or the
    one rank-2 input whose name says mask, or why there is none."""
    if mask_name:
        match = [v for v in inputs if v.name == mask_name]
        if not match:
            raise PassConfigError(f"trim-padding: the model has no input '{mask_name}'; its inputs "
                                  f"are {', '.join(v.name for v in inputs)}.")
        mask = match[0]
    else:
        named = [v for v in inputs if "mask" in v.name.lower()]
        if len(named) != 1:
            return (f"{len(named)} inputs are named like a mask "
                    f"({', '.join(v.name for v in named) or 'none'}); name one with mask=...")
        mask = named[0]
    if mask.shape is None or len(mask.shape) != 2:
        return f"the mask '{mask.name}' is not [batch, seq]"
    return mask


def insert_trim(model: ir.Model, names: Sequence[str], mask_name: str) -> None:
    """Insert the length computation and one Slice per input in `names`, before the first node,
    and make every consumer (and graph output) read the cropped value instead."""
    graph = model.graph
    by_name = {v.name: v for v in graph.inputs}
    users = {name: list(by_name[name].uses()) for name in names}  # before the prologue reads them
    prologue = Prologue(f"{mask_name}_trim")
    length = kept_length(prologue, by_name[mask_name])
    start, axis = prologue.const("start", [0]), prologue.const("axis", [1])
    for name in names:
        value = by_name[name]
        outputs = [i for i, o in enumerate(graph.outputs) if o is value]
        cropped = prologue.add("Slice", [value, start, length, axis])
        cropped.name, cropped.dtype = f"{name}_trimmed", value.dtype
        cropped.shape = ir.Shape([value.shape[0], ir.SymbolicDim(f"{value.shape[1]}_trimmed")])
        for user, index in users[name]:
            user.replace_input_with(index, cropped)
        for i in outputs:
            graph.outputs[i] = cropped
    if len(graph):
        graph.insert_before(graph.node(0), prologue.nodes)
    else:
        graph.extend(prologue.nodes)


class Prologue:
    """Nodes built in order, to go before a graph's first node; names share one stem."""

    def __init__(self, stem: str) -> None:
        self.stem, self.nodes = stem, []

    def add(self, op: str, inputs: list[ir.Value], **attributes: object) -> ir.Value:
        """Append an `op` node and return its (only) output."""
        node = ir.node(op, inputs, attributes=attributes,
                       name=f"{self.stem}_{op.lower()}_{len(self.nodes)}")
        node.outputs[0].name = f"{self.stem}_{len(self.nodes)}"
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, name: str, value: float | list[int]) -> ir.Value:
        """A Constant: an int64 vector for a list, else a float32 scalar."""
        array = (np.asarray(value, np.int64) if isinstance(value, list)
                 else np.asarray(value, np.float32))
        out = self.add("Constant", [], value=ir.tensor(array, name=f"{self.stem}_{name}"))
        out.name, out.shape = f"{self.stem}_{name}", ir.Shape(array.shape)
        out.dtype = ir.DataType.INT64 if isinstance(value, list) else ir.DataType.FLOAT
        return out


def kept_length(prologue: Prologue, mask: ir.Value) -> ir.Value:
    """max(1, 1 + the last position any row of `mask` keeps), as an int64 [1]."""
    add = prologue.add
    kept = add("Cast", [add("Cast", [mask], to=ir.DataType.BOOL)], to=ir.DataType.FLOAT)
    any_row = add("ReduceMax", [kept, prologue.const("batch_axis", [0])], keepdims=0)
    seq = add("Cast", [add("Shape", [mask], start=1, end=2)], to=ir.DataType.FLOAT)
    one = prologue.const("one", 1.0)
    positions = add("Range", [one, add("Squeeze", [add("Add", [seq, one])]), one])
    last = add("ReduceMax", [add("Mul", [any_row, positions])], keepdims=1)
    length = add("Cast", [add("Max", [last, one])], to=ir.DataType.INT64)
    length.dtype, length.shape = ir.DataType.INT64, ir.Shape([1])
    return length


def padded_check_feeds(batches: Sequence[Mapping[str, np.ndarray]], found: PaddedInputs
                       ) -> list[dict[str, np.ndarray]]:
    """Each calibration batch as it is, and padded on the right at random lengths (each row keeps
    at most half its positions) with other tokens of the batch behind the padding."""
    rng = np.random.default_rng(CHECK_SEED)
    out = []
    for feeds in batches:
        if found.mask.name not in feeds:
            continue
        mask = np.asarray(feeds[found.mask.name])
        rows, length = mask.shape
        keep = rng.integers(1, max(2, length // 2 + 1), rows)
        behind = np.arange(length)[None, :] >= keep[:, None]
        padded = {**feeds, found.mask.name: np.where(behind, 0, mask).astype(mask.dtype)}
        for value in found.cropped:
            if value is not found.mask:
                data = np.asarray(feeds[value.name]).copy()
                data[behind] = rng.choice(data.reshape(-1), int(behind.sum()))
                padded[value.name] = data
        out += [dict(feeds), padded]
    return out

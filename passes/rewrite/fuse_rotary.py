"""Rotary position embeddings over constant cos/sin tables -> ONNX Runtime's
`com.microsoft.RotaryEmbedding` (a helper of `fuse`).

onnxscript's `fuse_rotary_embedding` turns the rotate-half pattern `x*cos + cat(-x2, x1)*sin` into
an intermediate RotaryEmbedding(x, cos, sin) that only its `fuse_cos_sin_cache` lowers to ORT's op,
and only when cos/sin are computed from inv_freq x position_ids (Hugging Face style). Models that
keep precomputed tables [max_seq, head_dim] and take rows [start, start + seq) of them are lowered
here, straight to ORT's op: onnxscript's pattern and check, then a check and a rewrite of our own.
ORT's op reads the first half of each row (cos_cache / sin_cache [max_seq, head_dim / 2]) at
positions start + s (position_ids [start], or [batch, seq] for onnxscript's GQA fusion), which
equals the pattern only when both halves of every row are equal, so the rule checks that on the
tables before it rewrites (a refused match is left as it was).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.ort_fusions.rotary_embedding import RotaryEmbeddingFusion


@dataclass(frozen=True)
class TableRows:
    """Rows [start, start + n) of a constant table, as [max_seq, head_dim]."""

    table: ir.Value
    rows: np.ndarray
    start: int


class RotaryFromTables(RotaryEmbeddingFusion):
    """x*cos + rotate_half(x)*sin on x [B, H, S, D] (onnxscript's pattern) whose cos and sin are
    rows of constant half-split tables -> com.microsoft.RotaryEmbedding(x, positions, cos_cache,
    sin_cache)."""

    def __init__(self, per_token_positions: bool = False) -> None:
        pattern.RewriteRuleClassBase.__init__(self, "RotaryEmbeddingFromTables")
        self.per_token_positions = per_token_positions
        self._shared: dict[object, ir.Value] = {}  # made once per graph, read by every match

    def check(self, context, x, cos, sin, **slices) -> pattern.MatchResult:
        """onnxscript's check (x is [batch, heads, seq, head_dim], split in equal halves), then:
        cos and sin are the same rows of half-split tables."""
        result = super().check(context, x=x, cos=cos, sin=sin, **slices)
        if not result:
            return result
        if x.shape[3] % 2:
            return result.fail("head_dim is odd.", x)
        cos_rows, sin_rows = table_rows(cos, x), table_rows(sin, x)
        if cos_rows is None or sin_rows is None:
            return result.fail("cos / sin are not rows [start, start + seq) of constant tables "
                               "[max_seq, head_dim] of x's dtype.", [cos, sin])
        if cos_rows.start != sin_rows.start:
            return result.fail("cos and sin start at different rows.", [cos, sin])
        if not (is_half_split(cos_rows.rows) and is_half_split(sin_rows.rows)):
            return result.fail("the two halves of the cos / sin table rows differ.", [cos, sin])
        return result

    def rewrite(self, op, x, cos, sin, **_):
        """ORT's op on the first half of each table, from position `start`."""
        cos_rows, sin_rows = table_rows(cos, x), table_rows(sin, x)
        return op.RotaryEmbedding(x, self._positions(op, x, cos_rows.start),
                                  self._half_table(op, cos_rows),
                                  self._half_table(op, sin_rows), interleaved=0,
                                  num_heads=x.shape[1], _domain="com.microsoft")

    def _positions(self, op, x: ir.Value, start: int) -> ir.Value:
        """position_ids: [start] (ORT's offset form, a constant), or with `per_token_positions`
        [batch, seq] = start + arange(seq), the form onnxscript's GQA fusion reads, one per
        (start, batch, seq) dims."""
        if not self.per_token_positions:
            key = ("offset", start)
            if key not in self._shared:
                self._shared[key] = op.Constant(value=ir.tensor(np.array([start], np.int64)))
            return self._shared[key]
        key = ("positions", start, str(x.shape[0]), str(x.shape[2]))
        if key not in self._shared:
            batch, seq = op.Shape(x, start=0, end=1), op.Shape(x, start=2, end=3)
            first = op.Constant(value=ir.tensor(np.array(start, np.int64)))
            last = op.Add(first, op.Squeeze(seq))
            row = op.Range(first, last, op.Constant(value=ir.tensor(np.array(1, np.int64))))
            self._shared[key] = op.Expand(row, op.Concat(batch, seq, axis=0))
        return self._shared[key]

    def _half_table(self, op, rows: TableRows) -> ir.Value:
        """The first half of each row of the table, one Constant per table."""
        if id(rows.table) not in self._shared:
            half = np.ascontiguousarray(rows.rows[:, :rows.rows.shape[1] // 2])
            self._shared[id(rows.table)] = op.Constant(value=ir.tensor(half))
        return self._shared[id(rows.table)]

    def cleanup(self) -> None:
        """Forget the values made for the graph just rewritten."""
        self._shared.clear()


def table_rows(value: ir.Value, x: ir.Value) -> TableRows | None:
    """`value` as rows [start, start + seq) of a constant table [.., max_seq, head_dim] (leading
    dims 1) whose row count is x's sequence axis, or None when it is not one."""
    shape = value.shape
    if shape is None or not 2 <= shape.rank() <= 4 or shape[-1] != x.shape[3]:
        return None
    unknown_rows = not isinstance(shape[-2], int) and shape[-2].value is None
    if unknown_rows or shape[-2] != x.shape[2]:
        return None
    if any(d != 1 for d in shape[:-2]) or value.dtype != x.dtype:
        return None
    if _constant(value) is not None:
        return TableRows(value, _constant(value).reshape(shape[-2], -1), 0)
    node = value.producer()
    if node is None or node.op_type != "Slice" or node.domain not in ("", "ai.onnx"):
        return None
    table = _constant(node.inputs[0])
    start = _ir_utils.get_singleton_value(node.inputs[1], rank=1)
    if table is None or table.ndim != shape.rank() or not isinstance(start, int):
        return None
    if start < 0 or not _slices_rows(node, table.ndim):
        return None
    return TableRows(node.inputs[0], table.reshape(table.shape[-2], -1), start)


def _slices_rows(node: ir.Node, rank: int) -> bool:
    """A Slice with unit step along axis rank-2 alone."""
    axes = node.inputs[3] if len(node.inputs) > 3 else None
    steps = node.inputs[4] if len(node.inputs) > 4 else None
    axis = 0 if axes is None else _ir_utils.get_singleton_value(axes, rank=1)
    step_ok = steps is None or _ir_utils.is_singleton_value(steps, 1, rank=1)
    return isinstance(axis, int) and axis in (rank - 2, -2) and step_ok


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (not a graph input another caller could override)."""
    if value is None or value.is_graph_input():
        return None
    return _ir_utils.get_numpy_value(value)


def is_half_split(table: np.ndarray) -> bool:
    """Whether every row is [a, a]: the half-split (rotate-half) layout ORT's op assumes."""
    half = table.shape[-1] // 2
    return table.shape[-1] % 2 == 0 and np.array_equal(table[:, :half], table[:, half:])


def fuse_rotary_tables(model: ir.Model, per_token_positions: bool = False) -> int:
    """Lower rotary embeddings over constant half-split tables to com.microsoft.RotaryEmbedding in
    place (after shape inference: the rule reads x's shape); returns how many. Attention fusions
    that follow want `per_token_positions` (position_ids [batch, seq], not [start])."""
    ShapeInferencePass()(model)
    rules = pattern.RewriteRuleSet([RotaryFromTables.rule(per_token_positions)])
    return rules.apply_to_model(model)

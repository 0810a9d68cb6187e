"""Number formats as numpy references (the single source of truth the rewrites are tested
against): L-Mul products (`lmul`) and block floating point (`bfp`), and the mark a rewrite
leaves on the nodes it changed so the cost model can price them."""

from __future__ import annotations

import json
from typing import Any

import onnx_ir as ir

from winnow.numerics.bfp import FORMATS, bfp_quantize
from winnow.numerics.lmul import lmul, lmul_matmul, round_mantissa

NODE_KEY = "winnow.numerics"  # node.metadata_props key: JSON of what a numerics rewrite did

__all__ = ["FORMATS", "NODE_KEY", "bfp_quantize", "lmul", "lmul_matmul", "mark", "marks",
           "round_mantissa"]


def mark(node: ir.Node, **fields: Any) -> None:
    """Record on `node` (merged with what is there) what a numerics rewrite did to it, e.g.
    `op="lmul", m=3` or `format="bfp12", block=32, operand="weight"`."""
    node.metadata_props[NODE_KEY] = json.dumps({**marks(node), **fields}, sort_keys=True)


def marks(node: ir.Node) -> dict[str, Any]:
    """What numerics rewrites recorded on `node` (empty when none)."""
    text = node.metadata_props.get(NODE_KEY)
    return json.loads(text) if text else {}

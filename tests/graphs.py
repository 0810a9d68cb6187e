"""Tiny ONNX graphs for unit tests, written in ONNX text format."""

from __future__ import annotations

import onnx
import onnx.parser
import onnx_ir as ir


def parse(text: str) -> ir.Model:
    """Parse ONNX text format into an onnx-ir Model (checked first)."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


HEADER = '<ir_version: 8, opset_import: ["" : 18]>'

FOLDABLE = HEADER + """
agraph (float[2] x) => (float[2] y) {
    a = Constant <value = float[2] {1.0, 2.0}> ()
    b = Constant <value = float[2] {3.0, 4.0}> ()
    c = Add (a, b)
    y = Mul (x, c)
}
"""

DUPLICATED = HEADER + """
agraph (float[2] x) => (float[2] y) {
    r1 = Relu (x)
    r2 = Relu (x)
    y = Add (r1, r2)
}
"""

DEAD = HEADER + """
agraph (float[2] x) => (float[2] y) {
    unused = Sigmoid (x)
    y = Relu (x)
}
"""

IDENTITY_CHAIN = HEADER + """
agraph (float[2] x) => (float[2] y) {
    i1 = Identity (x)
    i2 = Identity (i1)
    y = Relu (i2)
}
"""

UNSHAPED = HEADER + """
agraph (float[3, 4] x) => (float[3, 4] y) {
    t = Relu (x)
    y = Sigmoid (t)
}
"""


def model(text: str) -> ir.Model:
    """A fresh IR model from one of the texts above."""
    return parse(text)

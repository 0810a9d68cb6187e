"""bench/width.py: the FLOPs column and the lines where fewer FLOPs did not give less time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]


def _width_script():
    """bench/width.py as a module (bench scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location("width_bench", REPO / "bench" / "width.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mlp(hidden: int) -> ir.Model:
    """x[b, 64] @ w1[64, hidden] @ w2[hidden, 64]: a two-layer MLP of `hidden` channels."""
    w1 = numpy_helper.from_array(np.ones((64, hidden), np.float32), "w1")
    w2 = numpy_helper.from_array(np.ones((hidden, 64), np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])], [w1, w2])
    return ir.serde.deserialize_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def test_flops_ratio_of_a_halved_mlp_is_two():
    width = _width_script()
    ratio = width.flops_ratio(_mlp(256), _mlp(128), {"x": np.ones((8, 64), np.float32)})
    assert abs(ratio - 2.0) < 1e-6  # 2*8*64*256*2 / 2*8*64*128*2


def test_a_line_only_where_fewer_flops_gave_no_speed_up():
    width = _width_script()
    rows = [["m", "-", 0.0, "original", False, 1.0, None, None, 1.0, 1.0],
            ["m", "channels", 0.25, "activation", False, 0.9, None, None, 1.3, 0.97],
            ["m", "channels", 0.25, "weight", False, 0.8, None, None, 1.3, 0.97],
            ["m", "channels", 0.5, "activation", False, 0.9, None, None, 1.9, 1.40]]
    assert width.flops_without_time(rows) == [
        "m channels 0.25 refit=no: 1.30x fewer FLOPs but latency ratio 0.97x"]
    assert "| 1.30x | 0.97x |" in width.table(rows[1:2])

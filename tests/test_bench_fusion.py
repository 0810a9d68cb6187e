"""bench/fusion.py: held-out batches, the per-op profile and the table's verdicts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]


def _fusion_script():
    """bench/fusion.py as a module (bench scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location("fusion_bench", REPO / "bench" / "fusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch_of_joins_heldout_batches_and_keeps_scalars():
    fusion = _fusion_script()
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    got = fusion.batch_of([{"x": a, "t": np.float32(2)}, {"x": b, "t": np.float32(2)}], 8)
    np.testing.assert_array_equal(got["x"], np.vstack([a, b])[:8])
    assert got["t"] == 2 and got["x"].shape == (8, 3)


def test_op_profile_names_the_ops_the_model_runs():
    fusion = _fusion_script()
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 64])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8)
    model = ir.serde.deserialize_model(proto)
    prof = fusion.op_profiles({"a": model, "b": model}, {"x": np.ones((4, 64), np.float32)}, runs=3)
    assert set(prof) == {"a", "b"}
    assert all({"MatMul", "Relu"} <= set(t) and min(t.values()) >= 0 for t in prof.values())


def test_table_flags_unequal_outputs_and_slower_fusions():
    fusion = _fusion_script()
    ratio = {1: {"median": 0.9, "min": 0.8, "max": 1.0}, 8: {"median": 1.2, "min": 1.1, "max": 1.3}}
    rows = [{"model": "a", "fused": {"Attention": 2}, "error": 2e-4, "heldout_samples": 4,
             "ratios": ratio},
            {"model": "b", "fused": {}, "error": 0.0, "heldout_samples": 4, "ratios": ratio}]
    lines = fusion.table(rows).splitlines()
    assert "| NO |" in lines[2] and "Attention 2" in lines[2] and "0.90x (0.80-1.00)" in lines[2]
    assert "none matched" in lines[3] and "| yes |" in lines[3]
    assert fusion.slower_lines(rows) == ["a b1: fused is slower (0.90x)"]

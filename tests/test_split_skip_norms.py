"""split-skip-norms: SkipLayerNormalization back to Sum + LayerNormalization, and residual Adds
into a LayerNormalization as Sum, so ORT does not run its fused kernel. Outputs are checked
against numpy (the layer norm written out) and ORT's own optimizer is asked what it fuses."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from winnow.passes import PassContext, PassManager

B, S, D = 2, 5, 16
RNG = np.random.default_rng(0)
GAMMA = RNG.normal(size=D).astype(np.float32)
BETA = RNG.normal(size=D).astype(np.float32)
BIAS = RNG.normal(size=D).astype(np.float32)
EPS = 1e-5


def _layer_norm(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + EPS) * GAMMA + BETA).astype(np.float32)


def _model(nodes, outputs, opset: int = 17) -> onnx.ModelProto:
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [D], v)
             for n, v in (("gamma", GAMMA), ("beta", BETA), ("bias", BIAS))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", D])
                     for n in ("x", "s")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", D]) for n in outputs],
        inits)
    return helper.make_model(graph, ir_version=9, opset_imports=[
        helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def _skip_norm(outputs=("y", "", "", "sum")) -> onnx.NodeProto:
    return helper.make_node("SkipLayerNormalization", ["x", "s", "gamma", "beta", "bias"],
                            list(outputs), domain="com.microsoft", epsilon=EPS)


def _feeds() -> dict[str, np.ndarray]:
    return {n: RNG.normal(size=(B, S, D)).astype(np.float32) for n in ("x", "s")}


def _run_pass(proto: onnx.ModelProto) -> tuple[ir.Model, dict]:
    model = ir.serde.deserialize_model(proto)
    ctx = PassContext(calibration=[_feeds()])
    model = PassManager("split-skip-norms").run(model, ctx).model
    return model, ctx.report["split-skip-norms"]


def _ort_ops(model: ir.Model | onnx.ModelProto, tmp_path) -> collections.Counter:
    """Op types of the graph ORT runs after its own load-time optimizations."""
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)


def _run(model: ir.Model, feeds) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_skip_norm_becomes_sum_and_layer_norm_with_the_same_outputs():
    model, report = _run_pass(_model([_skip_norm()], ["y", "sum"]))
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops == {"Sum": 1, "LayerNormalization": 1} and report["split"] == 1
    feeds = _feeds()
    y, total = _run(model, feeds)
    want_sum = feeds["x"] + feeds["s"] + BIAS
    np.testing.assert_allclose(total, want_sum, rtol=0, atol=1e-6)
    np.testing.assert_allclose(y, _layer_norm(want_sum), rtol=0, atol=1e-5)
    assert [v.name for v in model.graph.outputs] == ["y", "sum"]


def test_residual_add_into_layer_norm_is_a_sum_ort_does_not_fuse(tmp_path):
    nodes = [helper.make_node("Add", ["x", "s"], ["t"]),
             helper.make_node("LayerNormalization", ["t", "gamma", "beta"], ["y"], axis=-1,
                              epsilon=EPS)]
    source = _model(nodes, ["y"])
    assert _ort_ops(source, tmp_path)["SkipLayerNormalization"] == 1  # what ORT does unaided
    model, report = _run_pass(source)
    assert report["sums"] == 1
    assert _ort_ops(model, tmp_path)["SkipLayerNormalization"] == 0
    feeds = _feeds()
    np.testing.assert_allclose(_run(model, feeds)[0], _layer_norm(feeds["x"] + feeds["s"]),
                               rtol=0, atol=1e-5)


def test_an_add_read_elsewhere_too_is_left_alone():
    nodes = [helper.make_node("Add", ["x", "s"], ["t"]),
             helper.make_node("LayerNormalization", ["t", "gamma", "beta"], ["y"], axis=-1),
             helper.make_node("Relu", ["t"], ["r"])]
    model, report = _run_pass(_model(nodes, ["y", "r"]))
    assert report["sums"] == 0 and "Add" in {n.op_type for n in model.graph}


def test_a_skip_norm_whose_mean_is_read_is_left_alone():
    node = _skip_norm(("y", "mean", "", ""))
    mean_out = helper.make_tensor_value_info("mean", TensorProto.FLOAT, None)
    proto = _model([node], ["y"])
    proto.graph.output.append(mean_out)
    model, report = _run_pass(proto)
    assert report["split"] == 0
    assert "SkipLayerNormalization" in {n.op_type for n in model.graph}


def test_below_opset_17_no_layer_norm_is_written():
    model, report = _run_pass(_model([_skip_norm(("y",))], ["y"], opset=14))
    assert report["split"] == 0
    assert "LayerNormalization" not in {n.op_type for n in model.graph}


@pytest.mark.parametrize("zoo_name", ["digits-vit"])
def test_fused_zoo_model_matches_its_source(zoo_name):
    """Differential: the zoo model after `fuse` (SkipLayerNormalization written) and this pass
    against the exported source, on held-out data; no SkipLayerNormalization is left."""
    from winnow import models_zoo

    zm = models_zoo.get(zoo_name)
    source = zm.load_ir()
    ctx = PassContext(calibration=zm.calibration()[:2])
    fused = PassManager("fuse").run(zm.load_ir(), ctx).model
    assert any(n.op_type == "SkipLayerNormalization" for n in fused.graph)
    split = PassManager("split-skip-norms").run(fused, ctx).model
    assert ctx.report["split-skip-norms"]["split"] >= 1
    assert not any(n.op_type == "SkipLayerNormalization" for n in split.graph)
    for feeds in zm.heldout()[:2]:
        np.testing.assert_allclose(_run(split, feeds)[0], _run(source, feeds)[0],
                                   rtol=0, atol=1e-4)

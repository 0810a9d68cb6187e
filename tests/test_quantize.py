"""quantize and quant-sensitivity: every mode differential on a tiny MLP, exclusions, bad input,
and the gated model that scores one node at a time."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from winnow.errors import PassConfigError, PassFailedError, UnsupportedModelError
from winnow.ir.execute import run
from winnow.passes import PassContext, PassManager
from winnow.passes.analysis.quant_sensitivity import GatedQuant
from winnow.passes.rewrite.quantize import QuantSpec, quantizable_nodes

D, H = 64, 128


def mlp(outlier: float = 1.0) -> ir.Model:
    """x[b,16,64] -> MatMul(fc1) + b1 -> Relu -> MatMul(fc2) -> y; `outlier` scales one weight
    row of fc2 (one activation channel then dominates fc2's input range)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((D, H)) / np.sqrt(D)).astype(np.float32)
    w2 = (rng.standard_normal((H, D)) / np.sqrt(H)).astype(np.float32)
    w1[:, 0] *= outlier
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.full(H, 0.1, np.float32), "b1")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
             helper.make_node("Relu", ["h1"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16, D])],
                              initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def batches(n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 16, D)).astype(np.float32)} for _ in range(n)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.min(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def quantize(model: ir.Model, pipeline: str) -> PassContext:
    ctx = PassContext(calibration=batches(2, seed=7))
    PassManager(pipeline).run(model, ctx)
    return ctx


@pytest.mark.parametrize("mode,op,min_cos", [
    ("int8-dynamic", "MatMulInteger", 0.995),
    ("int8-static", "QuantizeLinear", 0.99),
    ("int4-weight", "MatMulNBits", 0.95),
    ("int8-weight", "MatMulNBits", 0.999),
    ("fp16", "Cast", 0.9999),
])
def test_every_mode_stays_close_to_float_and_changes_the_graph(mode, op, min_cos):
    model, held = mlp(), batches(seed=3)
    want = [run(model, f)["y"] for f in held]
    ctx = quantize(model, f"quantize{{mode={mode}}}")
    assert op in {n.op_type for n in model.graph}
    got = [run(model, f)["y"] for f in held]
    worst = min(cosine(w, g) for w, g in zip(want, got))
    assert min_cos <= worst < 1.0  # changed, and bounded from above in error
    assert ctx.report["quantize"]["quantized"] == 2


def test_fp16_model_is_topologically_sorted_and_clones():
    """ORT's float16 converter appends the input Cast after the node that reads it; the pass
    sorts the graph (ONNX requires it), so later passes can clone the model."""
    model = mlp()
    quantize(model, "quantize{mode=fp16}")
    produced = {v.name for v in model.graph.inputs} | set(model.graph.initializers)
    for node in model.graph:
        assert all(v is None or v.name in produced for v in node.inputs), node.op_type
        produced |= {v.name for v in node.outputs}
    model.clone()  # onnx_ir refuses a value read before the node that makes it


def test_excluding_a_node_by_name_keeps_it_float():
    model = mlp()
    ctx = quantize(model, "quantize{exclude=[fc2]}")
    assert ctx.report["quantize"]["excluded"] == ["fc2"]
    fc2 = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].name == "w2"]
    assert len(fc2) == 1  # still a float MatMul on the original weight
    assert "MatMulInteger" in {n.op_type for n in model.graph}


def test_a_selector_that_matches_nothing_is_an_error():
    with pytest.raises(PassFailedError) as err:
        quantize(mlp(), "quantize{exclude=[fc9]}")
    assert isinstance(err.value.__cause__, PassConfigError)
    assert "fc9" in str(err.value) and "fc1" in str(err.value)


def test_a_model_with_nothing_to_quantize_is_an_error():
    model = ir.serde.deserialize_model(helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    with pytest.raises(PassFailedError) as err:
        quantize(model, "quantize")
    assert isinstance(err.value.__cause__, UnsupportedModelError)


def test_unknown_mode_is_a_config_error():
    with pytest.raises(Exception, match="mode"):
        PassManager("quantize{mode=int3}")


def test_gated_model_is_float_when_closed_and_quantized_when_open():
    model, held = mlp(), batches(2, seed=5)
    names = quantizable_nodes(model, ("MatMul",))
    gated = GatedQuant(model, QuantSpec("int8-dynamic"), names, held)
    assert sorted(gated.gated) == ["fc1", "fc2"]
    closed = gated._run(held[0], set())["y"]
    np.testing.assert_allclose(closed, run(model, held[0])["y"], atol=1e-5)
    ref = mlp()
    quantize(ref, "quantize")
    np.testing.assert_allclose(gated._run(held[0], {"fc1", "fc2"})["y"],
                               run(ref, held[0])["y"], atol=1e-4)
    assert 0 < gated.loss({"fc1"}) < gated.loss({"fc1", "fc2"}) + 1e-6


def test_sensitivity_ranks_the_node_with_an_outlier_channel_first():
    model = mlp(outlier=40.0)
    ctx = PassContext(calibration=batches(2, seed=7))
    result = ctx.get_analysis("quant-sensitivity", model, samples=8)
    scores = result["modes"]["int8-dynamic"]["nodes"]
    assert result["ranking"]["int8-dynamic"][0] == "fc2"
    assert scores[0]["loss"] > 3 * scores[1]["loss"]
    fc2 = next(a for a in result["activations"] if a["node"] == "fc2")
    assert fc2["outlier_channels"] >= 1 and fc2["max_over_p99_9"] > 1.0


def test_auto_exclusion_meets_the_budget_by_excluding_the_sensitive_node():
    model = mlp(outlier=40.0)
    ctx = quantize(model, "quantize{exclude=[auto],budget=0.0005,samples=8}")
    auto = ctx.report["quantize"]["auto"]
    assert auto["met"] and ctx.report["quantize"]["excluded"][0] == "fc2"
    assert auto["steps"][-1]["loss"] <= 0.0005 < auto["steps"][0]["loss"]


def test_smoothing_is_lossless_in_float_and_tames_the_outlier_channel():
    model, held = mlp(outlier=40.0), batches(2, seed=3)
    want = [run(model, f)["y"] for f in held]
    ctx = quantize(model, "smooth-activations{alpha=0.5}")
    report = ctx.report["smooth-activations"]
    assert report["smoothed"] == 2 and report["inserted_mul"] == 2
    for f, w in zip(held, want):
        np.testing.assert_allclose(run(model, f)["y"], w, rtol=1e-4, atol=1e-4)


def test_smoothing_folds_into_a_layernorm_that_feeds_only_matmuls():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((D, D)).astype(np.float32)
    inits = [numpy_helper.from_array(np.ones(D, np.float32), "g"),
             numpy_helper.from_array(np.zeros(D, np.float32), "b"),
             numpy_helper.from_array(w, "w")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w"], ["y"], name="fc")]
    proto = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16, D])], initializer=inits),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model, held = ir.serde.deserialize_model(proto), batches(1, seed=3)
    want = run(model, held[0])["y"]
    ctx = quantize(model, "smooth-activations")
    assert ctx.report["smooth-activations"]["folded_into_norm"] == 1
    assert [n.op_type for n in model.graph] == ["LayerNormalization", "MatMul"]
    np.testing.assert_allclose(run(model, held[0])["y"], want, rtol=1e-4, atol=1e-4)


def test_the_report_draws_the_sensitivity_section():
    from winnow.driver.report_html import render

    model = mlp(outlier=40.0)
    ctx = PassContext(calibration=batches(1, seed=7))
    result = ctx.get_analysis("quant-sensitivity", model, samples=4)
    page, plots = render({"analyses": {"quant-sensitivity": result}})
    assert "Quantization sensitivity" in page and "fc2" in page
    assert plots == ["quant-sensitivity-int8-dynamic"]


def test_split_outliers_is_lossless_in_float_and_rescues_int8():
    model, held = mlp(outlier=40.0), batches(2, seed=3)
    want = [run(model, f)["y"] for f in held]
    plain = mlp(outlier=40.0)
    quantize(plain, "quantize")
    ctx = quantize(model, "split-outliers")
    assert ctx.report["split-outliers"]["split"] == {"h": [0]}
    for f, w in zip(held, want):
        np.testing.assert_allclose(run(model, f)["y"], w, rtol=1e-4, atol=1e-4)
    ctx = quantize(model, "quantize")
    assert ctx.report["quantize"]["quantized"] == 2  # the float outlier path is not a candidate
    split_cos = min(cosine(w, run(model, f)["y"]) for f, w in zip(held, want))
    plain_cos = min(cosine(w, run(plain, f)["y"]) for f, w in zip(held, want))
    assert 1 - split_cos < 0.5 * (1 - plain_cos)


@pytest.mark.slow
def test_digits_vit_int8_with_split_outliers_stays_close_on_held_out_data():
    from winnow import models_zoo
    from winnow.measure.fidelity import evaluate_zoo

    zm = models_zoo.get("digits-vit")
    model = zm.load_ir()
    ctx = PassContext(calibration=zm.calibration())
    PassManager("split-outliers,quantize{mode=int8-dynamic}").run(model, ctx)
    assert ctx.report["quantize"]["quantized"] >= 16
    fidelity = evaluate_zoo(zm, model)
    assert 0.998 <= fidelity.cosine < 1.0
    assert fidelity.metric_drop is not None and fidelity.metric_drop <= 0.01


def gelu_mlp(fused: bool) -> ir.Model:
    """mlp() with Gelu for Relu: Gelu(Add(MatMul, b1)), or ORT's fused BiasGelu(MatMul, b1)."""
    proto = ir.serde.serialize_model(mlp(outlier=40.0))
    nodes = list(proto.graph.node)
    if fused:
        del proto.graph.node[:]
        proto.graph.node.extend([nodes[0], helper.make_node(
            "BiasGelu", ["h0", "b1"], ["h"], name="gelu", domain="com.microsoft"), nodes[3]])
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    else:
        nodes[2].op_type = "Gelu"
    proto.opset_import[0].version = 20
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("fused", [False, True], ids=["Gelu", "BiasGelu"])
def test_split_outliers_after_gelu_adds_no_pass_over_the_activation(fused):
    model, held = gelu_mlp(fused), batches(2, seed=3)
    want = [run(model, f)["y"] for f in held]
    ctx = quantize(model, "split-outliers")
    assert ctx.report["split-outliers"]["split"] == {"h": [0]}
    ops = [n.op_type for n in model.graph]
    gelu = "BiasGelu" if fused else "Gelu"
    assert "Mul" not in ops and "Gather" not in ops and ops.count(gelu) == 2
    for f, w in zip(held, want):
        np.testing.assert_allclose(run(model, f)["y"], w, rtol=1e-4, atol=1e-4)


def test_split_outliers_free_only_splits_where_the_mask_folds_and_nowhere_else():
    relu = mlp(outlier=40.0)  # a Relu makes the outlier activation: its mask would cost a Mul
    ctx = quantize(relu, "split-outliers{free_only=true}")
    assert ctx.report["split-outliers"]["split"] == {}
    assert [n.op_type for n in relu.graph] == ["MatMul", "Add", "Relu", "MatMul"]
    gelu, held = gelu_mlp(fused=True), batches(1, seed=5)
    want = run(gelu, held[0])["y"]
    ctx = quantize(gelu, "split-outliers{free_only=true}")
    assert ctx.report["split-outliers"]["split"] == {"h": [0]}
    np.testing.assert_allclose(run(gelu, held[0])["y"], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-static"])
def test_uint8_weights_are_stored_as_uint8_and_stay_close(mode):
    model, held = mlp(), batches(seed=3)
    want = [run(model, f)["y"] for f in held]
    quantize(model, f"quantize{{mode={mode},weight_type=uint8}}")
    weights = [v for v in model.graph.initializers.values()
               if v.const_value is not None and tuple(v.const_value.shape) == (D, H)]
    assert [w.const_value.dtype for w in weights] == [ir.DataType.UINT8]
    worst = min(cosine(w, g) for w, g in zip(want, [run(model, f)["y"] for f in held]))
    assert 0.99 <= worst < 1.0

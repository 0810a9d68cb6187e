"""fuse: onnxscript's ORT fusions on tiny graphs (differential), the check that refuses a wrong
fusion, and a real transformer."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from winnow.ir.execute import run
from winnow.passes import PassContext, PassManager
from winnow.passes.rewrite import fuse as fuse_module

D = 32


def residual_norm_gelu() -> ir.Model:
    """y = LayerNorm(x + skip) -> MatMul + bias -> Gelu: a SkipLayerNorm and a BiasGelu."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "b")]
    nodes = [helper.make_node("Add", ["x", "skip"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["n"], axis=-1,
                              epsilon=1e-5),
             helper.make_node("MatMul", ["n", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["mb"]),
             helper.make_node("Gelu", ["mb"], ["y"])]
    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 8, D]) for n in ("x", "skip")]
    graph = helper.make_graph(nodes, "g", spec,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8, D])],
                              initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    return ir.serde.deserialize_model(proto)


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((2, 8, D)).astype(np.float32) for n in ("x", "skip")}


def test_fuse_makes_contrib_ops_and_keeps_outputs():
    model = residual_norm_gelu()
    want = run(model, feeds(1))["y"]
    ctx = PassContext(calibration=[feeds(2)])
    result = PassManager("fuse").run(model, ctx)
    assert result.modified
    fused = ctx.report["fuse"]["fused"]
    assert fused.get("SkipLayerNormalization") == 1 and fused.get("BiasGelu") == 1
    assert "LayerNormalization" not in {n.op_type for n in model.graph}
    np.testing.assert_allclose(run(model, feeds(1))["y"], want, atol=1e-5)


def test_a_fusion_that_changes_outputs_is_refused(monkeypatch):
    real = fuse_module.fuse_for_ort

    def wrong(model, attention=True):
        counts = real(model, attention)
        out = model.graph.outputs[0]
        scale = ir.node("Constant", [], {"value": ir.tensor(np.float32(1.01))})
        bad = ir.node("Mul", [out, scale.outputs[0]])
        model.graph.extend([scale, bad])
        bad.outputs[0].name, out.name = out.name, out.name + ".pre"
        bad.outputs[0].shape, bad.outputs[0].type = out.shape, out.type
        model.graph.outputs[0] = bad.outputs[0]
        return counts

    monkeypatch.setattr(fuse_module, "fuse_for_ort", wrong)
    model = residual_norm_gelu()
    before = [n.op_type for n in model.graph]
    ctx = PassContext(calibration=[feeds(2)])
    result = PassManager("fuse").run(model, ctx)
    assert not result.modified
    assert [n.op_type for n in model.graph] == before
    assert "differ" in ctx.report["fuse"]["skipped"]


def test_a_model_without_patterns_is_left_alone():
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = ir.serde.deserialize_model(proto)
    ctx = PassContext()
    assert not PassManager("fuse").run(model, ctx).modified
    assert ctx.report["fuse"]["fused"] == {}


@pytest.mark.slow
def test_digits_vit_fuses_every_attention_block_losslessly():
    from winnow import models_zoo

    zm = models_zoo.get("digits-vit")
    model = zm.load_ir()
    reference = model.clone()
    ctx = PassContext(calibration=zm.calibration())
    PassManager("fuse").run(model, ctx)
    fused = ctx.report["fuse"]["fused"]
    assert fused.get("Attention") == 4 and fused.get("SkipLayerNormalization") == 8
    data = zm.heldout()[0]
    np.testing.assert_allclose(run(model, data)["logits"], run(reference, data)["logits"],
                               atol=1e-4)


@pytest.mark.slow
def test_without_attention_only_norms_and_activations_fuse():
    """fuse{attention=false} on digits-vit: the same SkipLayerNorm fusions, no attention op, and
    the outputs of the unfused model."""
    from winnow import models_zoo

    zm = models_zoo.get("digits-vit")
    model = zm.load_ir()
    reference = model.clone()
    ctx = PassContext(calibration=zm.calibration())
    assert PassManager("fuse{attention=false}").run(model, ctx).modified
    fused = ctx.report["fuse"]["fused"]
    assert fused.get("SkipLayerNormalization") == 8
    assert not {"Attention", "MultiHeadAttention", "GroupQueryAttention"} & set(fused)
    assert sum(n.op_type == "Softmax" for n in model.graph) == 4  # attention stays unfused
    data = zm.heldout()[0]
    np.testing.assert_allclose(run(model, data)["logits"], run(reference, data)["logits"],
                               atol=1e-4)

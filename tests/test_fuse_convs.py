"""fuse-convs: a PP-LCNet-like block (Conv, scalar affine, decomposed HardSwish, scalar affine,
padded depthwise Conv, pointwise Conv) against ONNX's reference evaluator on the source graph;
the check that refuses a wrong rewrite; and the real PP-OCRv4 recognizer (slow)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from winnow.ir.execute import run
from winnow.passes import PassContext, PassManager
from winnow.passes.rewrite import fuse_convs as fuse_convs_module

C = 8


def _scalar(name: str, value: float):
    return numpy_helper.from_array(np.array([value], np.float32), name)


def _hardswish(x: str, out: str, tag: str) -> list:
    """x * Clip(x + 3, 0, 6) / 6, as paddle2onnx writes it."""
    return [helper.make_node("Add", [x, "three"], [f"{tag}_a"]),
            helper.make_node("Clip", [f"{tag}_a", "zero", "six"], [f"{tag}_c"]),
            helper.make_node("Mul", [x, f"{tag}_c"], [f"{tag}_m"]),
            helper.make_node("Div", [f"{tag}_m", "six1"], [out])]


def _affine(x: str, out: str, tag: str, scale: float, offset: float) -> tuple[list, list]:
    nodes = [helper.make_node("Mul", [f"{tag}_s", x], [f"{tag}_y"]),
             helper.make_node("Add", [f"{tag}_y", f"{tag}_t"], [out])]
    return nodes, [_scalar(f"{tag}_s", scale), _scalar(f"{tag}_t", offset)]


def lcnet_block() -> ir.Model:
    """x -> Conv3x3 -> affine -> hswish -> affine -> depthwise 3x3 (pad 1) -> affine -> hswish
    -> affine -> Conv1x1 -> y, opset 12 (HardSwish does not exist there)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((C, 3, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "b0"),
             numpy_helper.from_array(rng.standard_normal((C, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((4, C, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b2"),
             _scalar("three", 3.0), numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(6.0, np.float32), "six"), _scalar("six1", 6.0)]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1])]
    chain = [("c0", "a0", 1.4, 0.6), ("h0", "a1", 0.2, -0.3),
             ("c1", "a2", 2.1, 1.0), ("h1", "a3", 0.3, 0.5)]
    for i, (src, dst, scale, offset) in enumerate(chain):
        more, consts = _affine(src, dst, f"lab{i}", scale, offset)
        nodes += more
        inits += consts
        if i == 0:
            nodes += _hardswish("a0", "h0", "hs0")
        elif i == 1:
            nodes.append(helper.make_node("Conv", ["a1", "w1", "b1"], ["c1"], kernel_shape=[3, 3],
                                          pads=[1, 1, 1, 1], group=C))
        elif i == 2:
            nodes += _hardswish("a2", "h1", "hs1")
    nodes.append(helper.make_node("Conv", ["a3", "w2", "b2"], ["y"], kernel_shape=[1, 1],
                                  pads=[0, 0, 0, 0]))
    graph = helper.make_graph(
        nodes, "lcnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 6, 10])],
        initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)
    return ir.serde.deserialize_model(proto)


def feeds(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 3, 6, 10)).astype(np.float32)}


def reference(model: ir.Model, x: dict[str, np.ndarray]) -> np.ndarray:
    """The source graph's output by ONNX's reference evaluator (no ORT, no rewriting)."""
    return ReferenceEvaluator(ir.serde.serialize_model(model)).run(None, x)[0]


def op_counts(model: ir.Model) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in model.graph:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def test_affines_and_hardswish_fold_and_outputs_match_the_reference():
    model = lcnet_block()
    want = reference(model, feeds(1))
    ctx = PassContext(calibration=[feeds(2)])
    assert PassManager("fuse-convs").run(model, ctx).modified
    ops = op_counts(model)
    # both HardSwish spelled out -> HardSwish; the affine after each Conv folded into it, the one
    # before the pointwise Conv folded into it, the one before the padded depthwise Conv kept as
    # a BatchNormalization (its offset cannot fold through zero padding)
    assert ops == {"Conv": 3, "HardSwish": 2, "BatchNormalization": 1}, ops
    assert model.opset_imports[""] == 14
    assert ctx.report["fuse-convs"]["fusions"] == {"conv_affine": 2, "hardswish": 2,
                                                   "affine_conv": 1, "affine_batchnorm": 1,
                                                   "global_pool": 0}
    np.testing.assert_allclose(run(model, feeds(1))["y"], want, rtol=1e-4, atol=1e-4)


def test_an_offset_folded_through_padding_is_refused(monkeypatch):
    """Folding the offset before a padded conv into its bias is wrong at the borders: the check
    must catch it and leave the model as it was."""
    from onnxscript.rewriter.rules.common import _fuse_conv_affine

    class ThroughPadding(_fuse_conv_affine.AffineConvFusion):
        def pattern(self, op, x, w, b, scale, offset):
            return op.Conv(x * scale + offset, w, b, _allow_other_attributes=True,
                           _outputs=["conv_out"])

    monkeypatch.setattr("onnxscript.rewriter.rules.common.affine_conv_fusion_rule",
                        ThroughPadding().rule())
    model = lcnet_block()
    before = op_counts(model)
    ctx = PassContext(calibration=[feeds(2)])
    assert not PassManager("fuse-convs").run(model, ctx).modified
    assert "differ" in ctx.report["fuse-convs"]["skipped"]
    assert op_counts(model) == before and model.opset_imports[""] == 12


def pooled_head(reduce_op: str, keepdims: int, axes: list[int]) -> ir.Model:
    """x -> Conv3x3 -> Relu -> `reduce_op` over `axes` -> y (opset 18: axes is an input)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((C, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(axes, np.int64), "axes")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node(reduce_op, ["r", "axes"], ["y"], keepdims=keepdims)]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["n", 3, 7, 9])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], inits)
    return ir.serde.deserialize_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9))


@pytest.mark.parametrize("reduce_op,keepdims,pool", [("ReduceMean", 0, "GlobalAveragePool"),
                                                     ("ReduceMax", 1, "GlobalMaxPool")])
def test_a_spatial_reduction_becomes_a_global_pool(reduce_op, keepdims, pool):
    model = pooled_head(reduce_op, keepdims, [2, -1])
    x = np.random.default_rng(2).standard_normal((2, 3, 7, 9)).astype(np.float32)
    want = reference(model, {"x": x})
    ctx = PassContext(calibration=[{"x": x}])
    assert PassManager("fuse-convs").run(model, ctx).modified
    ops = op_counts(model)
    assert ops.get(pool) == 1 and reduce_op not in ops
    assert ops.get("Flatten", 0) == (1 - keepdims)
    got = run(model, {"x": x})["y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_reduction_over_other_axes_stays():
    model = pooled_head("ReduceMean", 0, [1, 2])
    ctx = PassContext(calibration=[{"x": np.ones((1, 3, 7, 9), np.float32)}])
    assert not PassManager("fuse-convs").run(model, ctx).modified
    assert "ReduceMean" in op_counts(model)


def test_nothing_to_fuse_leaves_the_model():
    model = lcnet_block()
    model.graph.remove([n for n in model.graph if n.op_type != "Conv" or n.outputs[0].name != "y"],
                       safe=False)
    model.graph.node(0).replace_input_with(0, model.graph.inputs[0])
    model.graph.inputs[0].shape = ir.Shape(["n", C, 6, 10])
    ctx = PassContext(calibration=[{"x": np.zeros((1, C, 6, 10), np.float32)}])
    assert not PassManager("fuse-convs").run(model, ctx).modified
    assert ctx.report["fuse-convs"]["note"] == "no pattern matched"


@pytest.mark.slow
def test_ppocr_rec_elementwise_ops_fold_losslessly():
    """The real PP-OCRv4 recognizer: its 28 decomposed HardSwish become HardSwish, the affine
    blocks fold or become BatchNormalization, and the outputs match the source (cosine, max
    error, and every greedy CTC sequence) on held-out lines."""
    from winnow import models_zoo
    from winnow.models_zoo.ppocr import ctc_decode
    from winnow.passes.analysis.calibration import task_options
    from winnow.passes.manager import DEFAULT_PIPELINE

    zm = models_zoo.get("ppocr-rec")
    source = zm.load_ir()
    model = source.clone()
    ctx = PassContext(calibration=zm.calibration(), options=task_options("zoo:ppocr-rec", model))
    PassManager(f"{DEFAULT_PIPELINE},fuse-convs").run(model, ctx)
    fusions = ctx.report["fuse-convs"]["fusions"]
    assert fusions["hardswish"] == 28 and fusions["conv_affine"] >= 28
    ops = op_counts(model)
    assert "Clip" not in ops and ops.get("Div", 0) <= 5  # the neck's LayerNorms keep theirs
    for feeds_ in zm.heldout()[:2]:
        want, got = run(source, feeds_), run(model, feeds_)
        for name, value in want.items():
            assert np.max(np.abs(got[name] - value)) < 1e-4
            assert ctc_decode(got[name]) == ctc_decode(value)

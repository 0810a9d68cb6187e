"""ir/attention_mask.py: fused Attention gets the raw padding mask (so ORT can make QAttention),
only when its additive bias is proven to be exactly that mask."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from winnow.ir.attention_mask import (
    MASK_INPUT,
    bias_is_padding_mask,
    index_attention_masks,
    synthetic_masks,
)
from winnow.ir.execute import run

HIDDEN, HEADS, SEQ = 8, 2, 5


def attention_model(bias_kind: str) -> ir.Model:
    """x (B,S,8) and mask (B,S) int64 -> one com.microsoft.Attention whose additive bias is built
    from the mask: `padding` (0 kept / -1e9 masked), `causal` (padding plus a causal term) or
    `soft` (masked positions get -1: not a padding mask)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((HIDDEN, 3 * HIDDEN)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3 * HIDDEN).astype(np.float32), "b")
    scale = -1.0 if bias_kind == "soft" else -1e9
    consts = [w, b, numpy_helper.from_array(np.array(1.0, np.float32), "one"),
              numpy_helper.from_array(np.array(scale, np.float32), "scale"),
              numpy_helper.from_array(np.array([1, 2], np.int64), "axes")]
    nodes = [helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "maskf"], ["inv"]),
             helper.make_node("Mul", ["inv", "scale"], ["neg"]),
             helper.make_node("Unsqueeze", ["neg", "axes"], ["pad_bias"])]
    # ORT wants the bias as (B or 1, 1 or H, S, S): broadcast over queries by adding a square term
    square = np.zeros((SEQ, SEQ), np.float32)
    if bias_kind == "causal":
        square = np.triu(np.full((SEQ, SEQ), -1e9, np.float32), 1)
    consts.append(numpy_helper.from_array(square[None, None], "square"))
    nodes.append(helper.make_node("Add", ["pad_bias", "square"], ["bias"]))
    bias = "bias"
    nodes.append(helper.make_node("Attention", ["x", "w", "b", "", "", bias], ["y"],
                                  domain="com.microsoft", num_heads=HEADS,
                                  qkv_hidden_sizes=[HIDDEN] * 3))
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, HIDDEN]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", SEQ])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SEQ, HIDDEN])], consts)
    proto = helper.make_model(graph, ir_version=9, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ir.serde.deserialize_model(proto)


def padded_feeds(seed: int = 1) -> dict[str, np.ndarray]:
    """Three rows of x, the mask padding the last positions of two of them."""
    rng = np.random.default_rng(seed)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], np.int64)
    return {"x": rng.standard_normal((3, SEQ, HIDDEN)).astype(np.float32), "mask": mask}


def attention(model: ir.Model) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "Attention")


def test_padding_bias_becomes_mask_index_with_the_same_outputs():
    model, feeds = attention_model("padding"), padded_feeds()
    want = run(model, feeds)["y"]
    counts = index_attention_masks(model, [feeds])
    assert counts == {"mask_index": 1, "qkv_hidden_sizes_dropped": 1}
    node = attention(model)
    assert node.inputs[MASK_INPUT].producer().op_type == "Cast"
    assert len(node.inputs) == MASK_INPUT + 1 and "qkv_hidden_sizes" not in node.attributes
    for check in (feeds, padded_feeds(seed=7)):
        expected = want if check is feeds else None
        got = run(model, check)["y"]
        if expected is None:  # a second input: compare with a fresh, unrewritten model
            expected = run(attention_model("padding"), check)["y"]
        rows = check["mask"].astype(bool)  # padded query rows are never read downstream
        np.testing.assert_allclose(got[rows], expected[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["causal", "soft"])
def test_a_bias_that_is_not_a_padding_mask_is_kept(kind):
    model, feeds = attention_model(kind), padded_feeds()
    counts = index_attention_masks(model, [feeds])
    assert "mask_index" not in counts
    node = attention(model)
    assert node.inputs[MASK_INPUT] is None and node.inputs[5] is not None


def test_without_calibration_data_nothing_is_claimed():
    model = attention_model("padding")
    assert "mask_index" not in index_attention_masks(model, [])
    assert attention(model).inputs[5] is not None


def test_bias_is_padding_mask_by_hand():
    mask = np.array([[1, 1, 0]])
    assert bias_is_padding_mask(np.array([[[[0.0, 0.0, -1e9]]]]), mask)
    assert not bias_is_padding_mask(np.array([[[[0.0, 0.0, -1.0]]]]), mask)  # too weak
    assert not bias_is_padding_mask(np.array([[[[0.0, -1e9, -1e9]]]]), mask)  # masks a kept key
    causal = np.array([[[[0.0, -1e9, -1e9], [0.0, 0.0, -1e9], [0.0, 0.0, -1e9]]]])
    assert not bias_is_padding_mask(causal, mask)
    assert not bias_is_padding_mask(np.zeros((1, 1, 1, 4)), mask)  # wrong key length


def test_synthetic_masks_pad_both_sides_and_keep_a_key_per_row():
    base = np.ones((6, 9), np.int64)
    patterns = synthetic_masks(base)
    assert patterns[0] is base and len(patterns) == 4
    right, left, scattered = patterns[1:]
    assert (right[:, 0] == 1).all() and (left[:, -1] == 1).all() and (scattered[:, 0] == 1).all()
    assert (right == 0).any() and (left == 0).any() and (scattered == 0).any()
    for p in patterns:
        assert p.shape == base.shape and p.dtype == base.dtype and (p.sum(axis=1) >= 1).all()


@pytest.mark.slow
def test_minilm_fused_then_quantized_makes_qattention_within_the_int8_error():
    from winnow import models_zoo
    from winnow.measure.fidelity import evaluate_zoo
    from winnow.passes import PassContext, PassManager

    zm = models_zoo.get("minilm")
    model = zm.load_ir()
    ctx = PassContext(calibration=zm.calibration())
    PassManager("fuse,quantize{mode=int8-dynamic}").run(model, ctx)
    assert ctx.report["fuse"]["fusions"]["mask_index"] == 6
    ops = [n.op_type for n in model.graph]
    assert ops.count("QAttention") == 6 and "Attention" not in ops
    fid = evaluate_zoo(zm, model)  # held-out data, against the fp32 source
    assert fid.cosine > 0.99

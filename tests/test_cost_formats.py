"""Cost model: the numerics rewrites' node marks priced as their formats (BFP bytes, an L-Mul
product as an integer add of its bit width, int8/int4 bytes as stored), on tiny graphs against
hand-computed values."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from winnow.cost_model import load_target, predict
from winnow.cost_model.energy import compute_pj, op_pj
from winnow.cost_model.op_costs import node_costs
from winnow.passes import PassContext, PassManager

F = TensorProto.FLOAT
AVX2 = load_target("x86-avx2")  # Horowitz's table: int8 add 0.03, int32 add 0.1, fp32 0.9 / 3.7 pJ


def model(op: str, inputs: dict, weights: dict | None = None, attrs: dict | None = None,
          domain: str = "") -> ir.Model:
    """y = op(inputs..., weights...) with concrete input shapes."""
    weights = weights or {}
    graph = helper.make_graph(
        [helper.make_node(op, [*inputs, *weights], ["y"], name="node", domain=domain, **(attrs or {}))],
        "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", F, None)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    opsets = [helper.make_opsetid("", 20)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets, ir_version=10))


def rewritten(m: ir.Model, pipeline: str) -> ir.Model:
    PassManager(pipeline).run(m, PassContext())
    return m


def weight(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_bfp_weight_bytes_and_ops_by_hand():
    # W [40, 3] in BFP12 (4-bit significands), blocks of 32 along K = 40: 2 blocks per column
    m = rewritten(model("MatMul", {"x": [2, 40]}, {"w": weight(40, 3)}), "bfp{format=bfp12,block=32}")
    (c,) = node_costs(m)[0]
    assert c.marks["format"] == "bfp12"
    assert c.weight_bytes == (40 * 3 * 4 + 3 * 2 * 8) / 8 == 66.0
    assert (c.act_read, c.act_write, c.flops) == (2 * 40 * 4, 2 * 3 * 4, 2 * 2 * 40 * 3)
    # 240 fp32 MACs, 120 elements decoded by one 8-bit add each
    assert compute_pj(c, AVX2) == pytest.approx(240 * (3.7 + 0.9) + 120 * 0.03)
    (plain,) = node_costs(m, formats=False)[0]
    assert plain.weight_bytes == 40 * 3 * 4 and not plain.ops


def test_bfp16_gemm_with_transposed_weight_blocks_along_its_k():
    # Gemm transB: W [N=5, K=64]; BFP16 blocks of 16 along axis 1 -> 4 exponents per row
    m = rewritten(model("Gemm", {"x": [3, 64]}, {"w": weight(5, 64)}, {"transB": 1}),
                  "bfp{format=bfp16,block=16}")
    (c,) = node_costs(m)[0]
    assert c.weight_bytes == (5 * 64 * 8 + 5 * 4 * 8) / 8 == 340.0


def test_lmul_matmul_priced_as_integer_adds_of_its_width():
    m = rewritten(model("MatMul", {"x": [2, 5], "z": [5, 3]}), "lmul{m=3}")
    costs, _ = node_costs(m)
    (node,) = [c for c in costs if c.marks.get("op") == "lmul"]
    products = 2 * 5 * 3
    assert (node.kind, node.dtype, node.flops) == ("matmul", "lmul", 2 * products)
    assert node.ops == {"int12_add": products, "fp32_add": products}  # bits = m + 9
    assert (node.weight_bytes, node.act_read, node.act_write) == (0.0, (10 + 15) * 4, 6 * 4)
    # a 12-bit add between Horowitz's 8-bit (0.03 pJ) and 32-bit (0.1 pJ) adds
    assert op_pj("int12_add", AVX2.energy) == pytest.approx(0.03 + 4 * 0.07 / 24)
    assert compute_pj(node, AVX2) == pytest.approx(products * (0.03 + 4 * 0.07 / 24 + 0.9))
    others = [c for c in costs if c is not node]
    assert len(others) > 50 and all(c.kind == "emulated" and c.bytes == 0 for c in others)
    report = predict(m, AVX2)
    (kernel,) = report.kernels  # the emulation makes no kernel
    assert kernel.kernel.launches == 1
    int8_peak = 140.8e9 * 8
    assert kernel.compute_s == pytest.approx(2 * products / int8_peak)
    assert report.latency_s == pytest.approx(20e-6 + 2e-6 + (100 + 24) / 400e9)
    emulated = predict(m, AVX2, formats=False)
    assert emulated.latency_s > 10 * report.latency_s  # the float graph ORT would run


def test_lmul_gemm_reads_its_weight_and_bias_once():
    m = rewritten(model("Gemm", {"x": [4, 8]}, {"w": weight(8, 6), "b": weight(6)}), "lmul{m=2}")
    (node,) = [c for c in node_costs(m)[0] if c.marks.get("op") == "lmul"]
    assert node.ops == {"int11_add": 4 * 8 * 6, "fp32_add": 4 * 8 * 6}
    assert (node.weight_bytes, node.act_read) == ((8 * 6 + 6) * 4, 4 * 8 * 4)


def test_lmul_elementwise_mul_is_one_add_per_product():
    m = rewritten(model("Mul", {"x": [4, 6], "z": [4, 6]}), "lmul{m=4}")
    (node,) = [c for c in node_costs(m)[0] if c.marks.get("op") == "lmul"]
    assert (node.kind, node.flops, node.ops) == ("elementwise", 24, {"int13_add": 24})
    assert (node.act_read, node.act_write) == (2 * 24 * 4, 24 * 4)


def test_int4_and_int8_weights_priced_by_their_stored_bytes():
    # MatMulNBits: K = 64, N = 8, blocks of 32: B packed [8, 2, 16] uint8, scales [16] fp32
    b = numpy_helper.from_array(np.zeros((8, 2, 16), np.uint8), "b")
    s = numpy_helper.from_array(np.ones(16, np.float32), "s")
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft",
                            K=64, N=8, bits=4, block_size=32)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F, [2, 64])],
                              [helper.make_tensor_value_info("y", F, None)], [b, s])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid("com.microsoft", 1)])
    (c,) = node_costs(ir.serde.deserialize_model(proto))[0]
    assert c.weight_bytes == 8 * 64 / 2 + 16 * 4  # 4 bits a weight, plus the fp32 scales
    assert c.flops == 2 * 2 * 8 * 64
    # MatMulInteger: uint8 activations, int8 weight [64, 8] and its zero point
    w = numpy_helper.from_array(np.ones((64, 8), np.int8), "w")
    zp = numpy_helper.from_array(np.zeros(8, np.int8), "zp")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["x", "w", "", "zp"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)], [w, zp])
    (q,) = node_costs(ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])))[0]
    assert (q.weight_bytes, q.act_read, q.act_write, q.dtype) == (64 * 8 + 8, 2 * 64, 2 * 8 * 4, "int8")


def test_bfp_k_operand_of_attention_read_in_bfp_and_its_emulation_free():
    import math

    from winnow.cost_model.op_costs import infer_shapes, resolve_dims
    from winnow.passes.rewrite.bfp import attention_scores
    from winnow.testing import random_inputs, transformer_block

    m = transformer_block(dim=64, heads=4, kv_heads=2, layers=1, seed=3)
    feeds = random_inputs(m, seed=0, batch=2, seq=12)
    PassManager("bfp{format=bfp12,block=8,weights=false,keys=true}").run(
        m, PassContext(calibration=[feeds]))
    sizes = {"batch": 2, "seq": 12}
    (_, score), = attention_scores(m)
    k_shape = infer_shapes(m, resolve_dims(m, sizes)[0])[score.inputs[1].name][0]
    assert k_shape[-2] == 16  # K^T: the head dimension is the contraction axis
    costs = {c.name: c for c in node_costs(m, sizes)[0]}
    plain = {c.name: c for c in node_costs(m, sizes, formats=False)[0]}
    numel = math.prod(k_shape)
    stored = (numel * 4 + numel // 16 * 2 * 8) / 8  # 4-bit significands, 2 exponents per 16
    assert plain[score.name].act_read - costs[score.name].act_read == numel * 4 - stored
    emulation = [c for c in costs.values() if c.marks.get("op") == "bfp-qdq"]
    assert emulation and all(c.kind == "emulated" and c.bytes == 0 and c.flops == 0 for c in emulation)
    assert all(plain[c.name].bytes > 0 or plain[c.name].kind in ("free", "view") for c in emulation)

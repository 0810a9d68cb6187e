"""quantize on graphs ORT's quantizers do not take as they come (Constant-node weights, opset 12
with per-channel QDQ) and the int4 options (accuracy_level, embeddings as GatherBlockQuantized)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from winnow.ir.execute import run
from winnow.passes import PassContext, PassManager

C, K, V, E = 8, 16, 64, 64


def conv_net(opset: int) -> ir.Model:
    """x[b,8,12,12] -> Conv(3x3, weight from a Constant node) -> Relu -> Conv(1x1) -> y."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((K, C, 3, 3)) / np.sqrt(C * 9)).astype(np.float32)
    w2 = (rng.standard_normal((C, K, 1, 1)) / np.sqrt(K)).astype(np.float32)
    w1[0] *= 30.0  # one output channel 30x the others: per-tensor scales would flatten the rest
    nodes = [helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1")),
             helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2, "w2")),
             helper.make_node("Conv", ["x", "w1"], ["h0"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h0"], ["h"], name="relu"),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", C, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", C, 12, 12])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    return ir.serde.deserialize_model(proto)


def embedder(project: bool = True) -> ir.Model:
    """ids[b,t] -> Gather(table[V,E]) (-> MatMul(w[E,E])) -> y."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((V, E)).astype(np.float32)
    w = (rng.standard_normal((E, E)) / np.sqrt(E)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb" if project else "y"], name="embed")]
    inits = [numpy_helper.from_array(table, "table")]
    if project:
        nodes.append(helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj"))
        inits.append(numpy_helper.from_array(w, "w"))
    graph = helper.make_graph(
        nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", E])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def images(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, C, 12, 12)).astype(np.float32)} for _ in range(n)]


def worst_cosine(want: np.ndarray, got: np.ndarray) -> float:
    a, b = want.reshape(len(want), -1), got.reshape(len(got), -1)
    return float(np.min(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.mark.parametrize("opset", [12, 17])
def test_static_int8_quantizes_constant_node_weights_per_channel(opset):
    model, held = conv_net(opset), images(2, seed=3)
    want = [run(model, f)["y"] for f in held]
    ctx = PassContext(calibration=images(2, seed=7))
    PassManager("quantize{mode=int8-static}").run(model, ctx)
    assert ctx.report["quantize"]["quantized"] == 2
    weights = {n.inputs[0].name: n for n in model.graph if n.op_type == "DequantizeLinear"
               and n.inputs[0].const_value is not None}
    int8 = [v for v in weights if weights[v].inputs[0].const_value.dtype == ir.DataType.INT8]
    assert len(int8) == 2  # both weights are int8 initializers, not calibrated activations
    assert all(len(weights[v].inputs[1].shape) == 1 for v in int8)  # one scale per channel
    got = [run(model, f)["y"] for f in held]
    assert 0.995 <= min(worst_cosine(w, g) for w, g in zip(want, got)) < 1.0


def test_int4_with_embeddings_quantizes_the_table_and_stays_close():
    model = embedder()
    ids = {"ids": np.random.default_rng(2).integers(0, V, (3, 7)).astype(np.int64)}
    want = run(model, ids)["y"]
    PassManager("quantize{mode=int4-weight,embeddings=true,accuracy_level=1}").run(
        model, PassContext(calibration=[ids]))
    ops = {n.op_type: n for n in model.graph}
    assert set(ops) == {"GatherBlockQuantized", "MatMulNBits"}
    assert ops["MatMulNBits"].attributes["accuracy_level"].as_int() == 1
    assert 0.98 <= worst_cosine(want, run(model, ids)["y"]) < 1.0


def test_int4_embedding_rows_are_within_half_a_step_of_the_table():
    model = embedder(project=False)
    table = model.graph.initializers["table"].const_value.numpy().copy()
    ids = {"ids": np.arange(V, dtype=np.int64)[None]}
    PassManager("quantize{mode=int4-weight,embeddings=true,block_size=32}").run(
        model, PassContext(calibration=[ids]))
    rows = run(model, ids)["y"][0]
    # ORT's symmetric int4: step = max|x| / 8 per block of 32 along the embedding axis, the
    # extreme maps to -8, so only a value of the other sign may clip at +7 (error below a step);
    # every other element rounds to within half a step
    err = np.abs(rows - table).reshape(V, E // 32, 32)
    step = np.abs(table).reshape(V, E // 32, 32).max(-1, keepdims=True) / 8
    assert 0 < err.max() and np.all(err <= step * 1.001)
    assert np.mean(err > step / 2 * 1.001) < 0.02


def test_int4_without_embeddings_leaves_the_gather_float():
    model = embedder()
    ctx = PassContext(calibration=[{"ids": np.zeros((1, 4), np.int64)}])
    PassManager("quantize{mode=int4-weight}").run(model, ctx)
    assert [n.op_type for n in model.graph] == ["Gather", "MatMulNBits"]
    assert ctx.report["quantize"]["quantized"] == 1


def test_excluding_every_node_leaves_the_model_float():
    model, held = conv_net(17), images(1, seed=3)
    want = run(model, held[0])["y"]
    ctx = PassContext(calibration=images(1, seed=7))
    PassManager("quantize{mode=int8-static,exclude=[conv1,conv2]}").run(model, ctx)
    assert ctx.report["quantize"]["quantized"] == 0
    assert {n.op_type for n in model.graph} == {"Conv", "Relu"}
    np.testing.assert_allclose(run(model, held[0])["y"], want, rtol=1e-5, atol=1e-5)

"""smooth-activations{convs=true}: Conv input/output channel scales folded into the constant
affine ops around the convs (PP-LCNet style blocks), lossless in float, and what it buys static
int8 whose activations have one scale per tensor."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from winnow.ir.execute import run
from winnow.passes import PassContext, PassManager

C = 8


def lcnet_block(spread: float = 30.0, dw_multiplier: int = 1) -> ir.Model:
    """x[b,4,8,8] -> pointwise Conv 4->8 -> Mul/Add by scalars -> Relu -> Mul/Add by scalars
    (a learnable affine block, scalars as Constant nodes) -> depthwise 3x3 Conv -> Mul by a
    scalar -> Relu -> pointwise Conv 8->4 -> y. The first conv's output channels span `spread`
    in range, so the depthwise conv's input does too."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((C, 4, 1, 1)).astype(np.float32)
    w1 *= np.geomspace(1.0, spread, C, dtype=np.float32)[:, None, None, None]
    out_dw = C * dw_multiplier
    wd = rng.standard_normal((out_dw, 1, 3, 3)).astype(np.float32)
    wd *= np.geomspace(1.0, spread, out_dw, dtype=np.float32)[::-1, None, None, None]
    w2 = (rng.standard_normal((4, out_dw, 1, 1)) / np.sqrt(out_dw)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(wd, "wd"),
             numpy_helper.from_array(np.linspace(-1, 1, out_dw).astype(np.float32), "bd"),
             numpy_helper.from_array(w2, "w2")]

    def scalar(name: str, v: float) -> object:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.array([v], np.float32), name))

    nodes = [scalar("a0", 1.3), scalar("b0", 0.2), scalar("a1", 0.9), scalar("b1", -0.1),
             scalar("a2", 1.1),
             helper.make_node("Conv", ["x", "w1"], ["c1"], name="pw1"),
             helper.make_node("Mul", ["a0", "c1"], ["m0"]),
             helper.make_node("Add", ["m0", "b0"], ["h0"]),
             helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("Mul", ["a1", "r0"], ["m1"]),
             helper.make_node("Add", ["m1", "b1"], ["h1"]),
             helper.make_node("Conv", ["h1", "wd", "bd"], ["c2"], name="dw", group=C,
                              pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c2", "a2"], ["m2"]),
             helper.make_node("Relu", ["m2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w2"], ["y"], name="pw2")]
    graph = helper.make_graph(nodes, "lcnet",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def images(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 4, 8, 8)).astype(np.float32)} for _ in range(n)]


def compile_(model: ir.Model, pipeline: str) -> PassContext:
    ctx = PassContext(calibration=images(4, seed=7))
    PassManager(pipeline).run(model, ctx)
    return ctx


def rel_error(want: list[np.ndarray], got: list[np.ndarray]) -> float:
    return max(float(np.abs(w - g).max() / np.abs(w).max()) for w, g in zip(want, got))


def mean_error(want: list[np.ndarray], got: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(w - g).mean() / np.abs(w).mean() for w, g in zip(want, got)]))


def channel_spread(model: ir.Model, value: str, feeds: dict) -> float:
    """max over channels / min over channels of per-channel max |x|."""
    x = np.abs(run(model, feeds, capture=[value])[value])
    m = x.max(axis=(0, 2, 3))
    return float(m.max() / m.min())


def test_conv_smoothing_is_lossless_and_equalizes_the_depthwise_input_and_conv_outputs():
    model, held = lcnet_block(), images(3, seed=3)
    want = [run(model, f)["y"] for f in held]
    dw_in_before = channel_spread(model, "h1", held[0])
    ctx = compile_(model, "smooth-activations{convs=true}")
    report = ctx.report["smooth-activations"]
    # dw's and pw2's inputs (pw1 reads the graph input: nothing to fold into), pw1's and dw's outputs
    assert report["conv_inputs"] == 2 and report["conv_outputs"] == 2
    assert {n.op_type for n in model.graph} == {"Conv", "Mul", "Add", "Relu"}  # nothing inserted
    assert len(list(model.graph)) == 10  # the 5 Constant nodes became initializers
    got = [run(model, f)["y"] for f in held]
    assert rel_error(want, got) < 1e-5
    dw_in = next(n for n in model.graph if n.name == "dw").inputs[0].name
    pw1_out = next(n for n in model.graph if n.name == "pw1").outputs[0].name
    assert dw_in_before > 10
    assert channel_spread(model, dw_in, held[0]) < 3.0  # calibration-equalized, held-out image
    assert channel_spread(model, pw1_out, held[0]) < 3.0


def test_conv_smoothing_handles_a_depthwise_conv_with_a_channel_multiplier():
    model, held = lcnet_block(dw_multiplier=2), images(2, seed=4)
    want = [run(model, f)["y"] for f in held]
    compile_(model, "smooth-activations{convs=true}")
    assert rel_error(want, [run(model, f)["y"] for f in held]) < 1e-5


def test_conv_smoothing_cuts_static_int8_error():
    held = images(3, seed=5)
    reference = lcnet_block()
    want = [run(reference, f)["y"] for f in held]
    errors = {}
    for pipeline in ("quantize{mode=int8-static}",
                     "smooth-activations{convs=true},quantize{mode=int8-static}"):
        model = lcnet_block()
        compile_(model, pipeline)
        assert "QuantizeLinear" in {n.op_type for n in model.graph}
        errors[pipeline] = mean_error(want, [run(model, f)["y"] for f in held])
    plain, smoothed = errors.values()
    assert 0 < smoothed < 0.5 * plain and smoothed < 0.03, errors

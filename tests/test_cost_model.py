"""Cost model: hand-computed FLOPs and bytes, kernel grouping, monotone prediction, bad input."""

from __future__ import annotations

import math
import tomllib

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from winnow.cli import cli
from winnow.cost_model import load_target, predict
from winnow.cost_model.calibrate import _line, to_toml
from winnow.cost_model.kernels import group_kernels
from winnow.cost_model.op_costs import node_costs
from winnow.cost_model.targets import Correction, TargetError, parse_target

F = TensorProto.FLOAT


def build(nodes, inputs, outputs, weights=None, ms=False) -> ir.Model:
    """An IR model from onnx.helper parts; `inputs` maps names to shapes (dims may be names)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (weights or {}).items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F, s)
                                           for n, s in inputs.items()],
                              [helper.make_tensor_value_info(o, F, None) for o in outputs], inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets, ir_version=9))


def only(model: ir.Model, shapes=None):
    costs, _ = node_costs(model, shapes)
    return costs


def test_matmul_flops_and_bytes_by_hand():
    model = build([helper.make_node("MatMul", ["a", "w"], ["y"])], {"a": [2, 3]}, ["y"],
                  {"w": (3, 4)})
    (c,) = only(model)
    assert c.flops == 2 * 2 * 3 * 4 == 48
    assert (c.weight_bytes, c.act_read, c.act_write) == (3 * 4 * 4, 2 * 3 * 4, 2 * 4 * 4)
    assert c.kind == "matmul" and c.dtype == "fp32" and c.priced


def test_symbolic_dims_resolved_from_given_sizes():
    model = build([helper.make_node("MatMul", ["a", "w"], ["y"])], {"a": ["batch", "seq", 3]},
                  ["y"], {"w": (3, 4)})
    (c,) = only(model, {"batch": 8, "seq": 5})
    assert c.flops == 2 * 8 * 5 * 3 * 4
    (d,) = only(model, {"a": [2, 7, 3]})
    assert d.flops == 2 * 2 * 7 * 3 * 4


def test_conv_with_groups_strides_dilation_by_hand():
    # X [1,4,9,9], W [6,2,3,3], groups 2, stride 2, dilation 2, no pads:
    # effective kernel 5, output 3x3 -> 6*3*3 = 54 outputs, each 2 * (4/2) * 3*3 = 36 FLOPs, + bias
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, strides=[2, 2],
                            dilations=[2, 2], kernel_shape=[3, 3])
    (c,) = only(build([conv], {"x": [1, 4, 9, 9]}, ["y"], {"w": (6, 2, 3, 3), "b": (6,)}))
    assert c.flops == 54 * 36 + 54
    assert c.act_write == 54 * 4 and c.weight_bytes == (6 * 2 * 9 + 6) * 4
    assert c.kind == "dwconv"  # grouped: priced with its own correction


def test_conv_transpose_and_gemm_by_hand():
    ct = helper.make_node("ConvTranspose", ["x", "w"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    (c,) = only(build([ct], {"x": [1, 2, 3, 3]}, ["y"], {"w": (2, 4, 2, 2)}))
    assert c.flops == 2 * (2 * 3 * 3) * (4 * 2 * 2)
    gemm = helper.make_node("Gemm", ["a", "w", "b"], ["y"], transA=1)
    (g,) = only(build([gemm], {"a": [5, 2]}, ["y"], {"w": (5, 7), "b": (7,)}))
    assert g.flops == 2 * 2 * 7 * 5 + 2 * 7


def test_contrib_ops_get_shapes_and_feed_the_next_op():
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "s", "g", "be"], ["n"],
                              domain="com.microsoft"),
             helper.make_node("MatMul", ["n", "w"], ["y"])]
    model = build(nodes, {"x": [2, 3, 8], "s": [2, 3, 8]}, ["y"],
                  {"g": (8,), "be": (8,), "w": (8, 4)}, ms=True)
    skip, mm = only(model)
    assert skip.kind == "norm" and skip.priced and skip.act_write == 2 * 3 * 8 * 4
    assert mm.flops == 2 * 2 * 3 * 8 * 4


def test_unknown_op_is_flagged_and_priced_by_bytes_never_zero():
    node = helper.make_node("MysteryOp", ["x"], ["y"], domain="com.example")
    model = build([node], {"x": [4, 4]}, ["y"])
    model.opset_imports["com.example"] = 1
    (c,) = only(model)
    assert not c.priced and "MysteryOp" in c.note and c.act_read == 64
    report = predict(model, "x86-avx2")
    assert report.unpriced and report.kernels[0].latency_s > 0 and report.kernels[0].bound == "memory"
    assert "flagged" in report.table() and "MysteryOp" in report.table()


def test_conv_bias_relu_is_one_kernel():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "b"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
    model = build(nodes, {"x": [1, 2, 5, 5]}, ["y"], {"w": (4, 2, 3, 3), "b": (1, 4, 1, 1)})
    costs = only(model)
    (k,) = group_kernels(costs, ["y"])
    assert k.kind == "conv" and k.launches == 1 and sorted(k.nodes) == [0, 1, 2]
    # the intermediate tensors never reach memory: input + output only
    assert k.act_bytes == (1 * 2 * 5 * 5 + 1 * 4 * 5 * 5) * 4


def test_matmul_fusions_follow_ort_2d_gemm_and_bias_gelu():
    def kernels(rank3: bool, act: str):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
                 helper.make_node("Add", ["m", "b"], ["a"]), helper.make_node(act, ["a"], ["y"])]
        model = build(nodes, {"x": [2, 4, 8] if rank3 else [4, 8]}, ["y"], {"w": (8, 16), "b": (16,)})
        model.opset_imports[""] = 20
        return [(k.kind, k.nodes, k.launches) for k in group_kernels(only(model), ["y"])]

    # 2-D: MatMulAddFusion makes a Gemm, GemmActivationFusion takes a Relu but not a Gelu
    assert kernels(False, "Relu") == [("matmul", [0, 1, 2], 1)]
    assert kernels(False, "Gelu") == [("matmul", [0, 1], 1), ("elementwise", [2], 1)]
    # N-D: the MatMul stays alone; the bias Add and the Gelu become one BiasGelu kernel
    assert kernels(True, "Gelu") == [("matmul", [0], 1), ("elementwise", [1, 2], 1)]
    assert kernels(True, "Relu") == [("matmul", [0], 1), ("elementwise", [1, 2], 2)]
    shared = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"]),
              helper.make_node("Sigmoid", ["m"], ["z"])]
    kernels = group_kernels(only(build(shared, {"x": [4, 8]}, ["y", "z"], {"w": (8, 16)})),
                            ["y", "z"])
    assert len(kernels) == 3


def test_transpose_fuses_into_matmul_only_when_it_swaps_the_last_two_axes():
    def count(perm):
        nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=perm),
                 helper.make_node("MatMul", ["t", "z"], ["y"])]
        model = build(nodes, {"x": [2, 3, 4, 4], "z": [2, 3, 4, 5]} if perm[1] == 1 else
                      {"x": [2, 3, 4, 4], "z": [2, 4, 4, 5]}, ["y"])
        return len(group_kernels(only(model), ["y"]))

    assert count([0, 1, 3, 2]) == 1  # FusedMatMul transA
    assert count([0, 2, 1, 3]) == 2  # a head split: a kernel of its own


def test_residual_add_and_layernorm_are_one_skip_layernorm_kernel():
    nodes = [helper.make_node("Add", ["x", "r"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1),
             helper.make_node("Add", ["s", "y"], ["z"])]
    model = build(nodes, {"x": [2, 3, 8], "r": [2, 3, 8]}, ["z"], {"g": (8,), "b": (8,)})
    first, second = group_kernels(only(model), ["z"])
    assert first.kind == "norm" and first.nodes == [0, 1] and first.launches == 1
    # reads x and r, writes the sum (read again by the last Add) and y; never re-reads the sum
    assert first.act_bytes == 4 * 48 * 4


def test_elementwise_chain_is_one_kernel_with_a_launch_per_op():
    nodes = [helper.make_node("Add", ["x", "x"], ["a"]), helper.make_node("Mul", ["a", "a"], ["m"]),
             helper.make_node("Sigmoid", ["m"], ["y"])]
    (k,) = group_kernels(only(build(nodes, {"x": [16]}, ["y"])), ["y"])
    assert k.kind == "elementwise" and k.launches == 3


def _target_with_correction(overhead: float, scale: float, **split: float) -> dict:
    data = tomllib.loads(to_toml({k: v for k, v in vars_of("x86-avx2").items()}))
    data["correction"] = {"matmul": {"overhead_us": overhead, "scale": scale, **split}}
    return data


def vars_of(name: str) -> dict:
    return tomllib.loads(open(load_target(name).path, "rb").read().decode())


SPLIT = {"compute_scale": 1.5, "memory_scale": 0.7, "parallel_overhead_us": 40.0}


@pytest.mark.parametrize("overhead,scale,split", [(0.0, 1.0, {}), (30.0, 2.5, {}), (5.0, -1.0, {}),
                                                  (5.0, 1.0, SPLIT)])
def test_more_matmul_work_never_predicts_less(overhead, scale, split):
    target = parse_target(_target_with_correction(overhead, scale, **split),
                          load_target("x86-avx2").path)
    times = []
    for k in (16, 32, 64, 128, 256, 512, 1024, 4096):
        model = build([helper.make_node("MatMul", ["a", "w"], ["y"])], {"a": [64, k]}, ["y"],
                      {"w": (k, 64)})
        times.append(predict(model, target).latency_s)
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert times[-1] > times[0]


def test_energy_of_a_matmul_by_hand():
    model = build([helper.make_node("MatMul", ["a", "w"], ["y"])], {"a": [2, 3]}, ["y"],
                  {"w": (3, 4)})
    report = predict(model, "x86-avx2")
    assert math.isclose(report.compute_energy_j, 24 * (3.7 + 0.9) * 1e-12)
    assert math.isclose(report.memory_energy_j, (24 + 48 + 32) * 12.5 * 1e-12)


def test_shipped_targets_load_and_unknown_target_lists_them():
    for name in ("x86-avx2", "x86-avx512-vnni", "cortex-a76", "cortex-a55"):
        t = load_target(name)
        assert t.peak("int8") >= t.peak("fp32") > 0 and t.sources
    with pytest.raises(TargetError, match="known targets: .*cortex-a55.*x86-avx2"):
        load_target("no-such-target")


def test_target_file_missing_a_field_names_it(tmp_path):
    data = vars_of("cortex-a76")
    del data["memory"]["dram_gbps"]
    path = tmp_path / "broken.toml"
    path.write_text(to_toml(data))
    with pytest.raises(TargetError, match="memory.dram_gbps"):
        load_target(str(path))
    model = build([helper.make_node("Relu", ["a"], ["y"])], {"a": [2, 3]}, ["y"])
    ir.save(model, tmp_path / "m.onnx")
    out = CliRunner().invoke(cli, ["--quiet", "cost", str(tmp_path / "m.onnx"), "--target", str(path)])
    assert out.exit_code == 2 and "memory.dram_gbps" in out.output


def test_profile_written_by_calibration_round_trips():
    data = vars_of("x86-avx2")
    data["correction"] = {"conv": {"overhead_us": 12.5, "scale": 1.75},
                          "conv-int8": {"overhead_us": 40.0, "scale": 6.0}}
    target = parse_target(tomllib.loads(to_toml(data)), load_target("x86-avx2").path)
    assert target.correction("conv").scale == 1.75 and target.correction("norm").scale == 1.0
    assert target.correction("conv", "int8").overhead_us == 40.0
    data["correction"]["matmul"] = {"overhead_us": 3.0, "parallel_overhead_us": 25.0,
                                    "compute_scale": 1.25, "memory_scale": 0.0}
    split = parse_target(tomllib.loads(to_toml(data)), load_target("x86-avx2").path)
    assert split.correction("matmul") == Correction(3.0, 1.0, 1.25, 0.0, 25.0)


def test_correction_fit_recovers_a_known_line():
    # t = 12 + 2.5 compute + 0.5 memory at one thread: the fit gives back the three terms
    rng = np.random.default_rng(1)
    compute = np.geomspace(1.0, 5000.0, 9)
    memory = compute * rng.uniform(0.1, 3.0, 9)
    fit = _line([(float(c), float(m), 12.0 + 2.5 * c + 0.5 * m) for c, m in zip(compute, memory)])
    assert math.isclose(fit["compute_scale"], 2.5, rel_tol=0.02)
    assert math.isclose(fit["memory_scale"], 0.5, rel_tol=0.05)
    assert math.isclose(fit["overhead_us"], 12.0, rel_tol=0.1)
    assert fit["parallel_overhead_us"] == 0.0  # one thread: nothing to wake


@pytest.mark.parametrize("threads", [2, 16])
def test_correction_fit_finds_which_kernels_run_serial(threads):
    # points drawn from t = 3 + min(40 + w, threads * w), w = 1.5 c + 0.8 m: the small ones run
    # on one thread; the fit recovers the thread wake-up cost and both scales
    rng = np.random.default_rng(2)
    compute = np.geomspace(0.2, 3000.0, 12)
    memory = compute * rng.uniform(0.1, 3.0, 12)
    work = 1.5 * compute + 0.8 * memory
    times = 3.0 + np.minimum(40.0 + work, threads * work)
    assert np.any(threads * work < 40.0 + work) and np.any(threads * work > 40.0 + work)
    fit = _line([(float(c), float(m), float(t)) for c, m, t in zip(compute, memory, times)], threads)
    assert math.isclose(fit["parallel_overhead_us"], 40.0, rel_tol=0.05)
    assert math.isclose(fit["compute_scale"], 1.5, rel_tol=0.05)
    assert math.isclose(fit["memory_scale"], 0.8, rel_tol=0.1)
    assert math.isclose(fit["overhead_us"], 3.0, abs_tol=0.5)


def test_correction_applies_the_thread_count_it_is_given():
    split = Correction(overhead_us=2.0, compute_scale=1.5, memory_scale=0.5,
                       parallel_overhead_us=30.0)
    # big kernel: parallel, 2 + 30 + (1.5 * 100 + 0.5 * 40); tiny kernel: serial, 2 + 4 x 1.75
    assert math.isclose(split.apply(100.0, 40.0, threads=4), 2.0 + 30.0 + 170.0)
    assert math.isclose(split.apply(1.0, 0.5, threads=4), 2.0 + 4 * 1.75)
    assert math.isclose(split.apply(100.0, 40.0, threads=1), 2.0 + 170.0)  # no one to wake
    assert split.apply(0.0, 0.0, threads=4) == 0.0
    old = Correction(overhead_us=5.0, scale=2.0)  # a profile fitted before the split scales
    assert math.isclose(old.apply(10.0, 30.0, threads=4), 5.0 + 2.0 * 30.0)
    works = np.geomspace(0.01, 1e4, 200)
    times = [split.apply(float(w), float(w) / 3, threads=8) for w in works]
    assert all(b >= a for a, b in zip(times, times[1:]))


def test_cli_cost_prints_kernels_and_fails_cleanly(tmp_path):
    model = build([helper.make_node("MatMul", ["a", "w"], ["y"])], {"a": ["batch", 3]}, ["y"],
                  {"w": (3, 4)})
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    ok = CliRunner().invoke(cli, ["--quiet", "cost", str(path), "--target", "cortex-a55",
                                  "--shape", "batch=8"])
    assert ok.exit_code == 0, ok.output
    assert "matmul" in ok.output and "energy" in ok.output
    bad = CliRunner().invoke(cli, ["--quiet", "cost", str(path), "--target", "nowhere"])
    assert bad.exit_code == 2 and "known targets" in bad.output
    wrong = CliRunner().invoke(cli, ["--quiet", "cost", str(path), "--target", "x86-avx2",
                                     "--shape", "nodim=3"])
    assert wrong.exit_code == 2 and "nodim" in wrong.output


def test_shapes_computed_from_shape_ops_are_folded():
    # position table sliced to the sequence length: the Slice end comes from Shape(x)
    nodes = [helper.make_node("Shape", ["x"], ["len"], start=1, end=2),
             helper.make_node("Slice", ["table", "zero", "len", "zero"], ["pos"]),
             helper.make_node("Add", ["x", "pos"], ["y"])]
    zero = numpy_helper.from_array(np.array([0], np.int64), "zero")
    model = build(nodes, {"x": ["batch", "seq", 4]}, ["y"], {"table": (128, 4)})
    model.graph.initializers["zero"] = ir.Value(name="zero", const_value=ir.serde.deserialize_tensor(zero))
    costs = only(model, {"batch": 2, "seq": 16})
    add = costs[-1]
    assert add.priced and add.flops == 2 * 16 * 4


def test_calibration_copies_survive_ort_common_subexpression_elimination(tmp_path):
    import onnx
    import onnxruntime as ort

    from winnow.cost_model.calibrate import conv, replicate

    micro = replicate(conv(1, 4, 6, 8, 3), 3)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    session = ort.InferenceSession(micro.model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    ran = onnx.load(tmp_path / "opt.onnx")
    assert sum(n.op_type in ("Conv", "FusedConv") for n in ran.graph.node) == 3
    outs = session.run(None, micro.feeds)
    assert len(outs) == 3 and all(np.array_equal(outs[0], o) for o in outs)


def test_clocked_runners_note_one_sample_per_run():
    from winnow.cost_model.calibrate import clocked

    calls = []
    runners, samples = clocked({"a": lambda: calls.append("a") or "out",
                                "b": lambda: calls.append("b")}, "cpu")
    assert [runners["a"]() for _ in range(3)] == ["out"] * 3
    runners["b"]()
    assert calls == ["a"] * 3 + ["b"]
    assert len(samples["a"]) == 3 and len(samples["b"]) == 1
    assert all(s >= 0.0 for s in samples["a"] + samples["b"])


def test_profile_fit_recovers_overheads_from_synthetic_medians():
    # medians made from known run, dispatch and per-input/output costs plus a kernel time per
    # copy: the fit gives the three back and prices the micro-benchmarks close to their time
    from winnow.cost_model.calibrate import _kernels, fit_profile, suite
    from winnow.cost_model.predict import price_kernel

    micros = [m for m in suite(True, 32 << 20) if "int8" not in m.name]  # no quantizer here
    run, dispatch, io = 40e-6, 2e-6, 1e-6
    truth = load_target("x86-avx2")
    times = {}
    for m in micros:
        kernels = _kernels(m)
        model = ir.serde.deserialize_model(m.model)
        costs = node_costs(model)[0]
        kernel_s = sum(price_kernel(k, costs, truth).roofline_s for k in kernels)
        times[m.name] = (run + dispatch * sum(k.launches for k in kernels)
                         + io * (len(m.feeds) + len(m.model.graph.output) - 2)
                         + 1.5 * kernel_s + 3e-6 * m.copies)
    chain = next(m for m in micros if m.name == "op-chain-32")
    times["identity"] = run
    times["op-chain-32"] = run + dispatch * sum(k.launches for k in _kernels(chain))
    times["identity-x32"] = run + 31 * (dispatch + 2 * io)
    data = fit_profile(micros, times, 2, 32 << 20)
    assert math.isclose(data["overhead"]["run_us"], 40.0, rel_tol=1e-6)
    assert math.isclose(data["overhead"]["dispatch_us"], 2.0, rel_tol=1e-6)
    assert math.isclose(data["overhead"]["io_us_per_tensor"], 1.0, rel_tol=1e-6)
    fitted = parse_target(data, load_target("x86-avx2").path)
    errors = []
    for m in micros:
        if m.name.startswith(("identity", "op-chain")):
            continue
        kernels = _kernels(m)
        costs = node_costs(ir.serde.deserialize_model(m.model))[0]
        predicted = sum(price_kernel(k, costs, fitted).latency_s for k in kernels)
        want = times[m.name] - run - io * (len(m.feeds) + len(m.model.graph.output) - 2)
        errors.append(abs(predicted - want) / want)
    assert np.median(errors) < 0.1

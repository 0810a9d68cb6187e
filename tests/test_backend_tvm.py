"""The TVM backend: libraries built with winnow's schedules match ONNX Runtime on the source model
(the oracle), on tiny graphs that exercise each schedule rule and on real zoo models (slow)."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm", reason="the TVM backend needs the extra winnow[tvm]")

from winnow.backends import run_artifact  # noqa: E402
from winnow.backends import tvm as tvm_backend  # noqa: E402
from winnow.backends import tvm_schedules  # noqa: E402
from winnow.cli import cli  # noqa: E402
from winnow.driver.compile import compile_model  # noqa: E402

RNG = np.random.default_rng(7)


def _init(name: str, *shape: int) -> onnx.TensorProto:
    rng = np.random.default_rng(zlib.crc32(f"{name}{shape}".encode()))
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def mlp_model() -> onnx.ModelProto:
    """Odd sizes (no dim divides the tiles): MatMul + bias + Gelu-ish epilogue, then a batched
    MatMul of the activations with themselves transposed (attention scores), then Softmax."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Tanh", ["hb"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
        helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["a", "at"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", f, ["batch", 13, 37])],
                  [helper.make_tensor_value_info("y", f, None),
                   helper.make_tensor_value_info("p", f, None)],
                  [_init("w1", 37, 45), _init("b1", 45), _init("w2", 45, 23)])


def conv_model() -> onnx.ModelProto:
    """Conv + Relu + MaxPool + Gemm: the shapes of a small image classifier."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Conv", ["x", "k", "kb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["m"], ["fl"]),
        helper.make_node("Gemm", ["fl", "wg", "bg"], ["y"], transB=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", f, ["batch", 3, 10, 10])],
                  [helper.make_tensor_value_info("y", f, None)],
                  [_init("k", 8, 3, 3, 3), _init("kb", 8), _init("wg", 5, 200), _init("bg", 5)])


def gelu_model() -> onnx.ModelProto:
    """MatMul + Gelu (opset 20): the FFN kernel whose erf winnow makes vectorizable."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Gelu", ["h"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", f, [3, 24])],
                  [helper.make_tensor_value_info("y", f, None)], [_init("w", 24, 40)], opset=20)


def celu_model() -> onnx.ModelProto:
    """Celu: standard ONNX that ONNX Runtime runs and TVM's frontend lacks."""
    f = TensorProto.FLOAT
    node = helper.make_node("Celu", ["x"], ["y"], name="the_celu", alpha=1.0)
    return _model([node], [helper.make_tensor_value_info("x", f, [2, 3])],
                  [helper.make_tensor_value_info("y", f, [2, 3])], [])


def ort_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The oracle: ONNX Runtime on the source model."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_close(reference: list[np.ndarray], got: list[np.ndarray], tol: float) -> None:
    """Every output has the reference's shape and stays within `tol` relative to its scale."""
    assert len(reference) == len(got)
    for ref, out in zip(reference, got):
        assert out.shape == ref.shape
        scale = max(1.0, float(np.max(np.abs(ref))))
        assert float(np.max(np.abs(out - ref))) <= tol * scale


def compile_tvm(model: onnx.ModelProto, folder: Path, shapes: dict[str, list[int]],
                schedules: str = "winnow") -> Path:
    """Save the model, compile it with the TVM backend at `shapes`; returns the artifact path."""
    src = folder / "src.onnx"
    onnx.save(model, src)
    out = folder / f"tvm-{schedules}"
    compile_model(str(src), out, backend="tvm", pipeline="fold-constants,dce",
                  backend_options={"shapes": shapes, "schedules": schedules})
    return out


@pytest.mark.parametrize("make, shapes", [(mlp_model, {"x": [3, 13, 37]}),
                                          (conv_model, {"x": [2, 3, 10, 10]}),
                                          (gelu_model, {"x": [3, 24]})])
@pytest.mark.parametrize("schedules", ["winnow", "none"])
def test_tiny_graphs_match_ort(tmp_path, make, shapes, schedules):
    model = make()
    out = compile_tvm(model, tmp_path, shapes, schedules)
    feeds = {name: RNG.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    got = run_artifact(out, feeds)
    assert_close(ort_outputs(model, feeds), list(got.values()), 1e-4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "tvm" and manifest["tvm"]["schedules"] == schedules
    assert manifest["inputs"][0]["shape"] == shapes["x"]
    if make is gelu_model:  # the polynomial erf of winnow's Gelu stays within 1e-5 too
        assert_close(ort_outputs(model, feeds), list(got.values()), 1e-5)
    assert manifest["tvm"]["check"]["max_abs_error"] < 1e-3
    assert set(manifest["files"]) == {"model.onnx", "model.so"}


def _kernels(model: onnx.ModelProto, shapes: dict[str, list[int]]):
    """The fused TIR kernels TVM's CPU legalization makes of `model` at `shapes`."""
    import onnx_ir as ir
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    mod = tvm_backend.to_relax(tvm_backend.prepare(ir.from_proto(model), shapes))
    target = tvm.target.Target(tvm_backend.resolve_target("host").tvm)
    with target:
        lowered = tvm.transform.Sequential(tvm_backend._layout_passes("winnow")
                                           + cpu.library_dispatch_passes(target)
                                           + cpu.legalize_passes(target))(mod)
    return target, {gv.name_hint: f for gv, f in lowered.functions_items()
                    if isinstance(f, tvm.tirx.PrimFunc)}


def test_each_rule_schedules_the_kernels_it_is_for():
    target, kernels = _kernels(mlp_model(), {"x": [3, 13, 37]})
    matmuls = [f for name, f in kernels.items() if "matmul" in name]
    assert len(matmuls) == 3
    assert all(tvm_schedules.Matmul().apply(f, target, False) is not None for f in matmuls)
    softmax = [f for name, f in kernels.items() if "softmax" in name]
    assert softmax and tvm_schedules.Matmul().apply(softmax[0], target, False) is None
    assert "T.exp(" not in softmax[0].script()  # VectorizableSoftmax's polynomial exp
    elementwise = [f for name, f in kernels.items() if "transpose" in name]
    assert elementwise and tvm_schedules.Elementwise().apply(elementwise[0], target, False)
    target, kernels = _kernels(gelu_model(), {"x": [3, 24]})
    gelu = kernels["fused_matmul_gelu"].script()
    assert "fast_erf" in gelu and "T.erf(" not in gelu  # VectorizableGelu ran
    assert tvm_schedules.Matmul().apply(kernels["fused_matmul_gelu"], target, False) is not None
    target, kernels = _kernels(conv_model(), {"x": [2, 3, 10, 10]})
    conv = [f for name, f in kernels.items() if "conv2d" in name]
    assert conv and tvm_schedules.Matmul().apply(conv[0], target, False) is not None  # NHWC
    pool = [f for name, f in kernels.items() if "pool" in name]
    assert pool and tvm_schedules.OuterParallel().apply(pool[0], target, False) is not None


def invoke(*args) -> object:
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


def test_cli_compile_and_run(tmp_path):
    src, model = tmp_path / "mlp.onnx", mlp_model()
    onnx.save(model, src)
    out = tmp_path / "out"
    result = invoke("compile", src, "-o", out, "--backend", "tvm", "--input-shapes", "x=2,13,37")
    assert result.exit_code == 0, result.output
    assert "model.so" in result.output
    feeds = {"x": RNG.standard_normal((2, 13, 37)).astype(np.float32)}
    np.savez(tmp_path / "in.npz", **feeds)
    result = invoke("run", out, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "y.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "y.npz") as got:
        assert_close(ort_outputs(model, feeds), [got["y"], got["p"]], 1e-4)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 13, 37), np.float32))
    result = invoke("run", out, "--inputs", wrong)
    assert result.exit_code == 2 and "built for float32 [2, 13, 37]" in result.output
    result = invoke("bench", out, "--no-rss")  # would time model.onnx under ORT: refused
    assert result.exit_code == 2 and "bench/tvm.py" in result.output


def test_unsupported_op_names_op_and_node(tmp_path):
    src = tmp_path / "celu.onnx"
    onnx.save(celu_model(), src)
    out = tmp_path / "out"
    result = invoke("compile", src, "-o", out, "--backend", "tvm")
    assert result.exit_code == 2
    assert "'Celu'" in result.output and "'the_celu'" in result.output
    assert not out.exists()


def test_unknown_target_and_missing_cross_compiler(tmp_path, monkeypatch):
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), src)
    out = tmp_path / "out"
    result = invoke("compile", src, "-o", out, "--backend", "tvm", "--target", "sparc")
    assert result.exit_code == 2 and "unknown target 'sparc'" in result.output
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without aarch64-linux-gnu-gcc
    result = invoke("compile", src, "-o", out, "--backend", "tvm", "--target", "aarch64")
    assert result.exit_code == 2 and "apt-get install gcc-aarch64-linux-gnu" in result.output
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["mlp.onnx"]


# ---- real models ---------------------------------------------------------------------------


def zoo_parity(name: str, tmp_path: Path, shapes: dict[str, list[int]], tol: float) -> None:
    """Compile zoo model `name` with TVM at `shapes`; its outputs on held-out data match ORT
    running the source model."""
    from winnow import models_zoo
    from winnow.frontend import load
    from winnow.ir.execute import run

    source = load(f"zoo:{name}")
    batch = models_zoo.get(name).heldout()[0]
    feeds = {k: np.ascontiguousarray(np.asarray(v)[tuple(slice(0, d) for d in shapes[k])])
             for k, v in batch.items() if k in shapes}
    reference = list(run(source, feeds).values())  # before compile: passes edit the model
    out = tmp_path / name
    compile_model(source, out, backend="tvm", pipeline="dce", check=False,
                  backend_options={"shapes": shapes})
    assert_close(reference, list(run_artifact(out, feeds).values()), tol)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits-cnn", "digits-vit"])
def test_digits_models_match_ort(tmp_path, name):
    zoo_parity(name, tmp_path, {"pixels": [4, 1, 8, 8]}, 1e-4)


@pytest.mark.slow
def test_minilm_matches_ort(tmp_path):
    zoo_parity("minilm", tmp_path, {"input_ids": [1, 32], "attention_mask": [1, 32]}, 1e-4)

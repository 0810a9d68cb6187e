"""TVM tuning: `tune_trials` tunes the kernels with MetaSchedule into OUT/tuning, a second compile
into the same OUT reuses that database without tuning again, and the tuned library still matches
ONNX Runtime on the source model (the oracle)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm", reason="the TVM backend needs the extra winnow[tvm]")

from winnow.backends import run_artifact  # noqa: E402
from winnow.backends import tvm_tuning  # noqa: E402
from winnow.cli import cli  # noqa: E402
from winnow.driver.compile import compile_model  # noqa: E402


def matmul_model() -> onnx.ModelProto:
    """One MatMul + Relu: a single kernel, so one trial tunes all of it."""
    f = TensorProto.FLOAT
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((16, 24))
                                .astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [8, 16])],
                              [helper.make_tensor_value_info("y", f, None)], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("WINNOW_TVM_TUNING_TEST"),
                    reason="MetaSchedule's processes import tvm.s_tir.tensor_intrin (about 2 CPU "
                           "minutes on the 2-core host), far past this file's test-time budget; "
                           "set WINNOW_TVM_TUNING_TEST=1 to run it")
def test_tuning_database_is_written_to_out_and_reused(tmp_path, monkeypatch):
    model = matmul_model()
    src, out = tmp_path / "mm.onnx", tmp_path / "out"
    onnx.save(model, src)
    options = {"shapes": {"x": [8, 16]}, "tune_trials": 2, "tune_builder_timeout": 300.0}
    compile_model(str(src), out, backend="tvm", pipeline="dce", backend_options=options)
    tuning = json.loads((out / "manifest.json").read_text())["tvm"]["tuning"]
    records = tvm_tuning.record_count(out / tvm_tuning.TUNING_DIR)
    assert tuning["kernels"] == 1 and tuning["kernels_tuned_now"] == 1
    assert records >= 1 and tuning["kernels_from_database"] == 1
    assert tuning["builder_timeout_s"] == 300.0

    def no_tuning(*_args, **_kwargs):
        raise AssertionError("the second compile tuned again")

    monkeypatch.setattr(tvm_tuning.ms, "tune_tasks", no_tuning)
    compile_model(str(src), out, backend="tvm", pipeline="dce", backend_options=options,
                  overwrite=True)
    tuning = json.loads((out / "manifest.json").read_text())["tvm"]["tuning"]
    assert tuning["kernels_tuned_now"] == 0 and tuning["kernels_from_database"] == 1
    assert tvm_tuning.record_count(out / tvm_tuning.TUNING_DIR) == records
    feeds = {"x": np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32)}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, feeds)[0]
    got = run_artifact(out, feeds)["y"]
    assert got.shape == want.shape and float(np.max(np.abs(got - want))) <= 1e-4


def test_tune_options_need_the_tvm_backend_and_the_host(tmp_path):
    src = tmp_path / "mm.onnx"
    onnx.save(matmul_model(), src)
    runner = CliRunner()
    result = runner.invoke(cli, ["--quiet", "compile", str(src), "-o", str(tmp_path / "a"),
                                 "--tune-trials", "4"])
    assert result.exit_code == 2 and "--backend tvm" in result.output
    result = runner.invoke(cli, ["--quiet", "compile", str(src), "-o", str(tmp_path / "b"),
                                 "--backend", "tvm", "--target", "aarch64", "--tune-trials", "4"])
    assert result.exit_code == 2 and "this machine" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

"""TVM tuning: a database record is applied to the kernel the build schedules (the manifest counts
what the build's own pipeline applied); `tune_trials` tunes the kernels with MetaSchedule into
OUT/tuning, a second compile into the same OUT reuses that database without tuning again, and the
tuned library still matches ONNX Runtime on the source model (the oracle)."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm", reason="the TVM backend needs the extra winnow[tvm]")

from winnow.backends import run_artifact  # noqa: E402
from winnow.backends.tvm import resolve_target  # noqa: E402
from winnow.backends import tvm_tuning  # noqa: E402
from winnow.cli import cli  # noqa: E402
from winnow.driver.compile import compile_model  # noqa: E402
from winnow.errors import OutputError  # noqa: E402


def matmul_model() -> onnx.ModelProto:
    """One MatMul + Relu: a single kernel, so one trial tunes all of it."""
    f = TensorProto.FLOAT
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((16, 24))
                                .astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [8, 16])],
                              [helper.make_tensor_value_info("y", f, None)], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def commit_schedule(folder, model: onnx.ModelProto, shapes, seconds: float = 1e-3) -> str:
    """Commit one real MetaSchedule record for the model's only kernel into the JSON database in
    `folder`: its matmul's rows threaded, its Relu's columns vectorized (a schedule winnow's rules
    do not make), timed `seconds`; returns the kernel's task name."""
    import onnx_ir as ir
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from winnow.backends import tvm as tvm_backend

    target = tvm_backend.resolve_target("host")
    lowered = tvm_backend.lower(tvm_backend.to_relax(tvm_backend.prepare(ir.from_proto(model),
                                                                         shapes)), target)
    (task,) = tvm_tuning.extract_tasks(lowered, tvm_backend._tvm_target(target))
    workload_mod = task.dispatched[0]
    sch = tvm.s_tir.Schedule(workload_mod)
    rows, _, _ = sch.get_loops(sch.get_sblock("matmul"))
    sch.parallel(rows)
    _, columns = sch.get_loops(sch.get_sblock("compute"))
    sch.vectorize(columns)
    database = tvm_tuning.open_database(folder)
    workload = database.commit_workload(workload_mod)
    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, [seconds], task.target,
        ms.arg_info.ArgInfo.from_prim_func(workload_mod["main"])))
    return task.task_name


def test_a_database_record_is_applied_to_the_kernel_the_build_schedules(tmp_path):
    model = matmul_model()
    src, out = tmp_path / "mm.onnx", tmp_path / "out"
    onnx.save(model, src)
    options = {"shapes": {"x": [8, 16]}}
    compile_model(str(src), out, backend="tvm", pipeline="dce", backend_options=options)
    assert "tuning" not in json.loads((out / "manifest.json").read_text())["tvm"]
    commit_schedule(out / tvm_tuning.TUNING_DIR, model, {"x": [8, 16]})
    assert tvm_tuning.valid_record_count(out / tvm_tuning.TUNING_DIR) == 1
    host_cpu = resolve_target("host").tvm["mcpu"]
    assert len(tvm_tuning.union_database([out / tvm_tuning.TUNING_DIR], host_cpu)) == 1
    assert len(tvm_tuning.union_database([out / tvm_tuning.TUNING_DIR], "cortex-a72")) == 0
    compile_model(str(src), out, backend="tvm", pipeline="dce", backend_options=options,
                  overwrite=True)
    tuning = json.loads((out / "manifest.json").read_text())["tvm"]["tuning"]
    assert tuning["kernels_from_database"] == 1 and tuning["kernels_applied"] == 1
    assert_matches_ort(model, out, seed=3)


def assert_matches_ort(model: onnx.ModelProto, out: Path, seed: int) -> None:
    """The TVM artifact in `out` computes what ORT computes from `model`, within 1e-4."""
    feeds = {"x": np.random.default_rng(seed).standard_normal((8, 16)).astype(np.float32)}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, feeds)[0]
    got = run_artifact(out, feeds)["y"]
    assert got.shape == want.shape and float(np.max(np.abs(got - want))) <= 1e-4


def test_a_packaged_database_keeps_each_kernels_best_valid_record_gzipped(tmp_path):
    model, shapes = matmul_model(), {"x": [8, 16]}
    for seconds in (1e-3, 1e10, 5e-4):  # a slower, a failed and the best measurement
        commit_schedule(tmp_path / "raw", model, shapes, seconds)
    assert tvm_tuning.record_count(tmp_path / "raw") == 3
    assert tvm_tuning.package_database(tmp_path / "raw", tmp_path / "pkg") == 1
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == [
        tvm_tuning.RECORD_FILE + ".gz", tvm_tuning.WORKLOAD_FILE + ".gz"]
    (record,) = tvm_tuning.union_database([tmp_path / "pkg"]).get_all_tuning_records()
    assert [float(t) for t in record.run_secs] == [5e-4]
    with pytest.raises(OutputError):
        tvm_tuning.package_database(tmp_path / "raw", tmp_path / "pkg")


def test_named_kernels_are_searched_again_even_where_the_database_holds_them(tmp_path):
    import onnx_ir as ir

    from winnow.backends import tvm as tvm_backend

    model, shapes = matmul_model(), {"x": [8, 16]}
    name = commit_schedule(tmp_path, model, shapes)
    target = tvm_backend.resolve_target("host")
    lowered = tvm_backend.lower(tvm_backend.to_relax(tvm_backend.prepare(ir.from_proto(model),
                                                                         shapes)), target)
    tvm_target = tvm_backend._tvm_target(target)
    held = tvm_tuning.tune(lowered, tvm_target, tmp_path, tvm_tuning.TuneOptions(0))
    named = tvm_tuning.tune(lowered, tvm_target, tmp_path,
                            tvm_tuning.TuneOptions(0, kernels=(name,)))
    other = tvm_tuning.tune(lowered, tvm_target, tmp_path,
                            tvm_tuning.TuneOptions(0, kernels=("no_such_kernel",)))
    assert (held["kernels_tuned_now"], named["kernels_tuned_now"],
            other["kernels_tuned_now"]) == (0, 1, 0)


def test_failed_measurements_are_not_valid_records(tmp_path):
    lines = [[0, [[[], []], [1e10], None, None]], [0, [[[], []], [2e-4, 3e-4], None, None]],
             [0, [[[], []], None, None, None]]]
    (tmp_path / tvm_tuning.RECORD_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert tvm_tuning.record_count(tmp_path) == 3
    assert tvm_tuning.valid_record_count(tmp_path) == 1


def test_the_fast_frame_walk_sees_what_inspect_stack_sees():
    def outer():
        marker = "here"  # noqa: F841 - read back through the frame's locals
        return inner()

    def inner():
        slow = inspect.stack()
        with tvm_tuning._fast_stack():
            fast = inspect.stack()
        return slow, fast

    slow, fast = outer()
    assert len(fast) == len(slow) and slow[0].function == fast[0].function == "inner"
    for a, b in zip(slow[1:], fast[1:]):  # [0] is `inner` itself, at the two calls' lines
        assert (a.filename, a.lineno, a.function) == (b.filename, b.lineno, b.function)
        assert a.frame is b.frame and a.code_context == b.code_context
    assert fast[1].frame.f_locals["marker"] == "here"
    assert inspect.stack is not None and inspect.stack.__module__ == "inspect"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("WINNOW_TVM_TUNING_TEST"),
                    reason="MetaSchedule builds and times real candidates in worker processes "
                           "(25-85 s on the 2-core host), past this file's test-time "
                           "budget; set WINNOW_TVM_TUNING_TEST=1 to run it")
def test_tuning_database_is_written_to_out_and_reused(tmp_path, monkeypatch):
    model = matmul_model()
    src, out = tmp_path / "mm.onnx", tmp_path / "out"
    onnx.save(model, src)
    options = {"shapes": {"x": [8, 16]}, "tune_trials": 2, "tune_builder_timeout": 300.0}
    compile_model(str(src), out, backend="tvm", pipeline="dce", backend_options=options)
    tuning = json.loads((out / "manifest.json").read_text())["tvm"]["tuning"]
    records = tvm_tuning.record_count(out / tvm_tuning.TUNING_DIR)
    assert tuning["kernels"] == 1 and tuning["kernels_tuned_now"] == 1
    assert records >= 2 and tuning["valid_records"] >= 2 and tuning["rule_schedules_timed"] == 1
    assert tuning["kernels_from_database"] == 1 and tuning["kernels_applied"] == 1
    assert tuning["builder_timeout_s"] == 300.0

    def no_tuning(*_args, **_kwargs):
        raise AssertionError("the second compile tuned again")

    monkeypatch.setattr(tvm_tuning.ms, "tune_tasks", no_tuning)
    compile_model(str(src), out, backend="tvm", pipeline="dce", backend_options=options,
                  overwrite=True)
    tuning = json.loads((out / "manifest.json").read_text())["tvm"]["tuning"]
    assert tuning["kernels_tuned_now"] == 0 and tuning["kernels_from_database"] == 1
    assert tuning["kernels_applied"] == 1
    assert tvm_tuning.record_count(out / tvm_tuning.TUNING_DIR) == records
    assert_matches_ort(model, out, seed=2)


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

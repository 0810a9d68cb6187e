"""Thread-count tuning: the choice rule, the manifest's `runtime` section and who follows it
(`winnow bench`, `run_artifact`, the bench scripts). Plumbing and decisions on given samples,
never a timing assert."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import winnow.backends.ort as ort_backend
from winnow.backends.manifest import MANIFEST_FILE
from winnow.driver.bench import bench
from winnow.driver.compile import compile_model
from winnow.measure import threads as threads_mod
from winnow.measure.threads import (
    MIN_GAIN,
    fastest_threads,
    thread_candidates,
    threads_for,
)
from winnow.measure.timing import Timing, available_cpus



@pytest.mark.parametrize("cpus, expected", [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]),
                                            (8, [1, 2, 4, 8]), (16, [1, 2, 4, 8, 16])])
def test_candidates_are_powers_of_two_and_every_cpu(cpus, expected):
    assert thread_candidates(cpus) == expected


@pytest.mark.parametrize("rows, expected", [(1, 1), (4, 1), (8, 2), (64, 2)])
def test_threads_for_takes_the_largest_timed_batch_not_above(rows, expected):
    runtime = {"intra_op_num_threads": {"b1": 1, "b8": 2}}
    assert threads_for(runtime, rows) == expected


def test_threads_for_falls_back():
    assert threads_for(None, 1, default=3) == 3
    assert threads_for({"intra_op_num_threads": {}, "note": "not tuned"}, 1, default=0) == 0
    assert threads_for({"intra_op_num_threads": {"b8": 1}}, 2, default=4) == 1  # smallest entry
    assert threads_for(None, 1) == available_cpus()


def _timings(default_ms: float, one_ms: float) -> dict:
    return {("b1", 2): Timing("d", [default_ms * 1e-3] * 9),
            ("b1", 1): Timing("o", [one_ms * 1e-3] * 9)}


@pytest.mark.parametrize("one_ms, expected", [(0.5, 1), (1 - 2 * MIN_GAIN, 1),
                                              (1 - MIN_GAIN / 2, 2), (1.3, 2)])
def test_a_smaller_count_is_chosen_only_when_clearly_faster(one_ms, expected):
    assert threads_mod._choose(_timings(1.0, one_ms), "b1", [1, 2], 2) == expected


def test_a_busy_host_does_not_pass_for_a_gain():
    """Two threads slowed in most rounds by another process (median 1.6 ms) but as fast as ever
    in the quiet ones (1.0 ms, against one thread's steady 1.3 ms): two threads stay."""
    busy = {("b8", 2): Timing("d", [1.6e-3] * 7 + [1.0e-3] * 2),
            ("b8", 1): Timing("o", [1.3e-3] * 9)}
    assert threads_mod._choose(busy, "b8", [1, 2], 2) == 2


def _matmul_model(batch: str | int = "batch") -> onnx.ModelProto:
    w = helper.make_tensor("w", TensorProto.FLOAT, [16, 8],
                           np.random.default_rng(0).normal(size=128).astype(np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8])],
                              [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_fastest_threads_times_every_candidate_per_batch(tmp_path):
    path = tmp_path / "mm.onnx"
    onnx.save(_matmul_model(), path)
    feeds = {f"b{b}": {"x": np.ones((b, 16), np.float32)} for b in (1, 8)}
    choice = fastest_threads(path, feeds, candidates=[1, 2], repeats=3, warmup=1)
    assert set(choice.threads) == {"b1", "b8"} and set(choice.threads.values()) <= {1, 2}
    assert choice.default == 2
    for by in choice.medians_ms.values():
        assert set(by) == {1, 2} and all(ms > 0 for ms in by.values())
    assert json.loads(json.dumps(choice.to_dict()))["intra_op_num_threads"] == choice.threads


def test_compile_records_the_runtime_for_b1_and_b8(tiny_model_path, tmp_path):
    result = compile_model(tiny_model_path, tmp_path / "a")
    runtime = json.loads((tmp_path / "a" / MANIFEST_FILE).read_text())["runtime"]
    assert set(runtime["intra_op_num_threads"]) == {"b1", "b8"}
    assert set(runtime["intra_op_num_threads"].values()) <= set(thread_candidates())
    assert result.artifact.manifest["runtime"] == runtime
    untuned = compile_model(tiny_model_path, tmp_path / "b", tune_threads=False)
    assert "runtime" not in untuned.artifact.manifest


def test_a_fixed_batch_model_is_tuned_at_its_own_batch(tmp_path):
    path = tmp_path / "fixed.onnx"
    onnx.save(_matmul_model(batch=3), path)
    compile_model(path, tmp_path / "a")
    runtime = json.loads((tmp_path / "a" / MANIFEST_FILE).read_text())["runtime"]
    assert list(runtime["intra_op_num_threads"]) == ["b3"]


def _set_runtime(folder: Path, chosen: dict[str, int]) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["runtime"] = {"intra_op_num_threads": chosen, "default_threads": available_cpus()}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_winnow_bench_runs_each_artifact_at_its_manifest_count(tiny_model_path, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    compile_model(tiny_model_path, a, tune_threads=False)
    compile_model(tiny_model_path, b, pipeline="cse", tune_threads=False)
    _set_runtime(a, {"b1": 1, "b8": 3})
    result = bench(a, b, batch=1, repeats=2, warmup=1, memory=False, random=True)
    assert result.settings["threads"] == {"A": 1, "B": available_cpus()}
    result = bench(a, b, batch=8, repeats=2, warmup=1, memory=False, random=True)
    assert result.settings["threads"]["A"] == 3
    forced = bench(a, b, batch=1, threads=2, repeats=2, warmup=1, memory=False, random=True)
    assert forced.settings["threads"] == {"A": 2, "B": 2}


def test_run_artifact_follows_the_manifest(tiny_model_path, tmp_path, monkeypatch):
    a = tmp_path / "a"
    compile_model(tiny_model_path, a, tune_threads=False)
    _set_runtime(a, {"b1": 1, "b8": 2})
    seen = []
    real = ort_backend._session
    monkeypatch.setattr(ort_backend, "_session",
                        lambda path, threads=0: seen.append(threads) or real(path, threads))
    x = np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32)
    out = ort_backend.run_artifact(a, {"x": x})
    ort_backend.run_artifact(a, {"x": np.repeat(x, 9, axis=0)})
    assert seen == [1, 2]
    expected = ReferenceEvaluator(onnx.load(tiny_model_path)).run(None, {"x": x})
    np.testing.assert_allclose(next(iter(out.values())), expected[0], rtol=1e-4, atol=1e-5)


def test_peers_runner_uses_the_session_of_each_batch(tmp_path, monkeypatch, peers_script):
    peers = peers_script
    path = tmp_path / "mm.onnx"
    onnx.save(_matmul_model(), path)
    made = {}

    def recording_session(model, threads):
        made[threads] = real(model, threads)
        return made[threads]

    real = peers.timing_session
    monkeypatch.setattr(peers, "timing_session", recording_session)
    run = peers.ort_runner(path, {1: 1, 8: 2})
    assert set(made) == {1, 2}
    calls = []
    for threads, session in made.items():
        monkeypatch.setattr(session, "run", lambda names, feeds, t=threads, s=session.run:
                            calls.append(t) or s(names, feeds), raising=False)
    reference = ReferenceEvaluator(_matmul_model())
    for rows in (1, 8, 5):
        x = np.random.default_rng(rows).normal(size=(rows, 16)).astype(np.float32)
        np.testing.assert_allclose(run({"x": x})["y"], reference.run(None, {"x": x})[0],
                                   rtol=1e-4, atol=1e-5)
    assert calls == [1, 2, 2]  # 5 rows: no entry, the largest batch's session

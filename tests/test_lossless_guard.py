"""The lossless guard: a pass that claims to be lossless but changes the outputs is found,
rolled back (or, with --strict, fails the compile), and the summary and manifest say so."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import winnow
from winnow.backends.ort import run_artifact
from winnow.cli import cli
from winnow.errors import FidelityError, LosslessPassError, PassFailedError
from winnow.measure.fidelity import lossless_mismatch
from winnow.ir.execute import run
from winnow.passes import Pass, PassResult, register_pass
from winnow.passes.instruments import LosslessGuard
from winnow.passes.manager import PassManager


def _flip_adds(model: ir.Model) -> bool:
    flipped = False
    for node in model.graph:
        if node.op_type == "Add":
            node.op_type = "Sub"
            flipped = True
    return flipped


@register_pass
class FlipAddPass(Pass):
    """A deliberately wrong 'lossless' pass: every Add becomes a Sub."""

    name = "test-flip-add"
    description = "Wrong on purpose: turns Add into Sub while claiming to be lossless."

    def call(self, model: ir.Model) -> PassResult:
        """Flip the Adds."""
        return PassResult(model, _flip_adds(model))


@register_pass
class SilentFlipAddPass(Pass):
    """Wrong on purpose and says it changed nothing."""

    name = "test-silent-flip-add"
    description = "Turns Add into Sub and reports modified=False."

    def call(self, model: ir.Model) -> PassResult:
        """Flip the Adds, claim nothing changed."""
        _flip_adds(model)
        return PassResult(model, False)


@register_pass
class BreakModelPass(Pass):
    """A 'lossless' pass that leaves a model ONNX Runtime cannot load (an unknown op)."""

    name = "test-break-model"
    description = "Renames the first node to an op that does not exist."

    def call(self, model: ir.Model) -> PassResult:
        """Rename the first node's op."""
        next(iter(model.graph)).op_type = "NoSuchOp"
        return PassResult(model, True)


@register_pass
class CrashingPass(Pass):
    """A 'lossless' pass that edits the model half way and then raises."""

    name = "test-crash-half-way"
    description = "Flips the Adds, then raises."

    def call(self, model: ir.Model) -> PassResult:
        """Flip the Adds and fail."""
        _flip_adds(model)
        raise RuntimeError("boom in the middle of a rewrite")


@register_pass
class LossyFlipAddPass(Pass):
    """The same flip from a pass that says it is lossy (judged by the budget, not the guard)."""

    name = "test-lossy-flip-add"
    description = "Turns Add into Sub; lossy."
    lossless = False

    def call(self, model: ir.Model) -> PassResult:
        """Flip the Adds."""
        return PassResult(model, _flip_adds(model))


def _add_model() -> onnx.ModelProto:
    """y = Relu(x + w) * 2 with w far from zero, so Add -> Sub changes y a lot."""
    w = onnx.numpy_helper.from_array(np.full((4,), 3.0, np.float32), "w")
    two = onnx.numpy_helper.from_array(np.float32(2.0), "two")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
         helper.make_node("Mul", ["r", "two"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], initializer=[w, two])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def add_model_path(tmp_path):
    path = tmp_path / "add.onnx"
    onnx.save(_add_model(), path)
    return path


def _oracle(feeds):
    """The source model's outputs from onnx's reference evaluator (not ORT, not winnow)."""
    return ReferenceEvaluator(_add_model()).run(None, feeds)


FEEDS = {"x": np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)}


@pytest.mark.parametrize("wrong", ["test-flip-add", "test-silent-flip-add"])
def test_a_wrong_lossless_pass_is_rolled_back_and_recorded(add_model_path, tmp_path, wrong):
    out = tmp_path / "out"
    result = winnow.compile(add_model_path, out, pipeline=f"fold-constants,{wrong},cse,dce")
    (record,) = result.fidelity["rolled_back"]
    assert record["pass"] == wrong
    assert record["max_abs_error"] > 1.0 and record["min_cosine"] < 0.99
    assert result.fidelity["max_abs_error"] == 0.0
    np.testing.assert_allclose(run_artifact(out, FEEDS)["y"], _oracle(FEEDS)[0], rtol=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fidelity"]["rolled_back"][0]["pass"] == wrong


def test_the_summary_prints_one_line_per_rollback(add_model_path, tmp_path):
    result = CliRunner().invoke(cli, ["--quiet", "compile", str(add_model_path), "-o",
                                      str(tmp_path / "out"), "--pipeline",
                                      "test-flip-add,cse,test-break-model"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("rollback")]
    assert len(lines) == 2, result.stdout
    assert "'test-flip-add' changed the outputs (max abs error" in lines[0]
    assert "'test-break-model' left a model ONNX Runtime cannot run" in lines[1]


def test_strict_fails_naming_the_pass_and_writes_nothing(add_model_path, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LosslessPassError, match="lossless pass 'test-flip-add' .*changed the "
                                                "outputs"):
        winnow.compile(add_model_path, out, pipeline="fold-constants,test-flip-add,dce",
                       strict=True)
    assert not out.exists()
    result = CliRunner().invoke(cli, ["--quiet", "compile", str(add_model_path), "-o", str(out),
                                      "--pipeline", "test-flip-add", "--strict"])
    assert result.exit_code == 2
    assert "test-flip-add" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_correct_passes_are_not_rolled_back(tiny_model_path, tmp_path):
    result = winnow.compile(tiny_model_path, tmp_path / "out", strict=True)
    assert result.fidelity["rolled_back"] == []
    assert result.nodes_after < result.nodes_before


def test_lossy_passes_are_left_to_the_budget(add_model_path, tmp_path):
    with pytest.raises(FidelityError, match="fidelity budget"):
        winnow.compile(add_model_path, tmp_path / "a", pipeline="test-lossy-flip-add,cse,dce",
                       max_drop=0.01)
    # forced through: the lossless passes after it are judged against the lossy result
    result = winnow.compile(add_model_path, tmp_path / "b", pipeline="test-lossy-flip-add,cse,dce",
                            max_drop=0.01, force=True)
    assert result.fidelity["rolled_back"] == []
    assert result.fidelity["max_abs_error"] > 1.0


def test_manager_guard_keeps_the_model_from_before_the_pass():
    model = ir.serde.deserialize_model(_add_model())
    reference = run(model, FEEDS)
    guard = LosslessGuard(lambda m: run(m, FEEDS), lossless_mismatch, reference)
    result = PassManager("test-flip-add,dce").run(model, guard=guard)
    assert [n.op_type for n in result.model.graph] == ["Add", "Relu", "Mul"]
    assert not result.modified
    assert guard.rolled_back[0]["pass"] == "test-flip-add"


def test_lossless_mismatch_tolerance_and_nan_places():
    ref = {"y": np.array([1.0, np.nan, np.inf, 1000.0], np.float32)}
    assert lossless_mismatch(ref, {"y": np.array([1.00005, np.nan, np.inf, 1000.05])}) is None
    moved = lossless_mismatch(ref, {"y": np.array([1.0, 1.0, np.inf, 1000.0])})
    assert moved is not None and "NaN/inf" in moved["detail"]
    off = lossless_mismatch(ref, {"y": np.array([1.001, np.nan, np.inf, 1000.0])})
    assert off is not None and off["max_abs_error"] == pytest.approx(1e-3, rel=1e-3)
    assert lossless_mismatch(ref, {"a": ref["y"], "b": ref["y"]}) is not None
    seq = {"s": [np.ones(2), np.zeros(3)]}
    assert lossless_mismatch(seq, {"s": [np.ones(2), np.zeros(3)]}) is None
    assert lossless_mismatch(seq, {"s": [np.ones(2)]}) is not None


def test_a_lossless_pass_that_raises_half_way_is_rolled_back(add_model_path, tmp_path):
    out = tmp_path / "out"
    result = winnow.compile(add_model_path, out, pipeline="test-crash-half-way,cse")
    (record,) = result.fidelity["rolled_back"]
    assert record == {"pass": "test-crash-half-way",
                      "raised": "RuntimeError: boom in the middle of a rewrite"}
    np.testing.assert_allclose(run_artifact(out, FEEDS)["y"], _oracle(FEEDS)[0], rtol=1e-6)
    with pytest.raises(PassFailedError, match="test-crash-half-way.*boom"):
        winnow.compile(add_model_path, tmp_path / "strict", pipeline="test-crash-half-way",
                       strict=True)
    assert not (tmp_path / "strict").exists()

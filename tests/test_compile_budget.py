"""compile with lossy passes: calibration, the fidelity budget (--max-drop) and --force."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

import winnow
from tests.tiny_models import TinyTransformer, zero_block_branches
from winnow.backends.ort import run_artifact
from winnow.cli import cli
from winnow.errors import FidelityError
from winnow.measure.fidelity import evaluate
from winnow.passes import Pass, PassContext, PassResult, register_pass

CALIBRATION = [{"x": np.random.default_rng(i).standard_normal((2, 6, 32)).astype(np.float32)}
               for i in range(4)]


def compile_tiny(out, zero: int | None = None, **kwargs):
    net = TinyTransformer(layers=3, seed=5)
    if zero is not None:
        zero_block_branches(net, zero)
    return winnow.compile(net, out, example_inputs=(torch.randn(2, 6, 32),),
                          calibration=CALIBRATION,
                          pipeline="fold-constants,drop-layers{count=1},dce", **kwargs)


def test_lossy_result_below_budget_is_refused_and_nothing_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FidelityError, match="misses the fidelity budget: 1 - cosine on 2 held-out "
                                            "calibration batches .* above --max-drop 0.001"):
        compile_tiny(out, max_drop=0.001)
    assert not out.exists()


def test_force_writes_it_and_records_the_budget(tmp_path):
    result = compile_tiny(tmp_path / "out", max_drop=0.001, force=True)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    budget = manifest["fidelity"]["budget"]
    assert budget["forced"] is True and budget["drop"] > 0.001
    assert manifest["fidelity"]["lossy_passes"] == ["drop-layers"]
    assert manifest["fidelity"]["calibration"] == "explicit"
    assert result.nodes_after < result.nodes_before


def test_dropping_an_identity_block_fits_any_budget(tmp_path):
    result = compile_tiny(tmp_path / "out", zero=1, max_drop=1e-6)
    assert result.fidelity["budget"]["drop"] < 1e-6


# --- the budget cannot be fooled -------------------------------------------------------------

def _scale_to(value: float):
    def call(self, model: ir.Model) -> PassResult:
        model.graph.initializers["s"].const_value = ir.tensor(np.float32(value))
        return PassResult(model, True)
    return call


def _lossy(name: str, call) -> None:
    register_pass(type(name.title().replace("-", ""), (Pass,), {
        "__doc__": f"Lossy test pass {name}.", "name": name, "description": name,
        "lossless": False, "call": call}))


def _slice_output(self, model: ir.Model) -> PassResult:
    """y becomes y[:1] (another shape)."""
    old = model.graph.outputs[0]
    starts, ends = ir.tensor(np.array([0], np.int64)), ir.tensor(np.array([1], np.int64))
    node = ir.node("Slice", [old, model.graph.initializers.get("s0") or _init(model, "s0", starts),
                             _init(model, "e1", ends)], name="test.slice")
    model.graph.append(node)
    node.outputs[0].name, old.name = "y", "y.before"
    node.outputs[0].dtype = old.dtype
    model.graph.outputs[0] = node.outputs[0]
    return PassResult(model, True)


def _init(model: ir.Model, name: str, tensor) -> ir.Value:
    value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(ir.DataType.INT64),
                     shape=ir.Shape(tensor.shape))
    model.graph.register_initializer(value)
    return value


def _drop_output(self, model: ir.Model) -> PassResult:
    model.graph.outputs.pop()
    return PassResult(model, True)


def _record_calibration(self, model: ir.Model) -> PassResult:
    SEEN.append([dict(b) for b in PassContext.current().calibration])
    return PassResult(model, False)


SEEN: list = []
_lossy("test-budget-nan", _scale_to(float("nan")))
_lossy("test-budget-nudge", _scale_to(1.001))
_lossy("test-budget-slice", _slice_output)
_lossy("test-budget-drop-output", _drop_output)
_lossy("test-budget-record", _record_calibration)


@pytest.fixture
def log_model_path(tmp_path):
    """y = Log(x) * s, z = x * s: NaN wherever x < 0 in the source already."""
    s = onnx.numpy_helper.from_array(np.float32(1.0), "s")
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["l"]), helper.make_node("Mul", ["l", "s"], ["y"]),
         helper.make_node("Mul", ["x", "s"], ["z"])], "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])], initializer=[s])
    path = tmp_path / "log.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              path)
    return path


def test_all_nan_outputs_miss_any_budget(log_model_path, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FidelityError, match=r"NaN/inf entries where the source's do not"):
        winnow.compile(log_model_path, out, pipeline="test-budget-nan", max_drop=1.0)
    assert not out.exists()
    feeds = [{"x": np.abs(np.random.default_rng(i).standard_normal((4, 4))).astype(np.float32)}
             for i in range(4)]
    with pytest.raises(FidelityError, match=r"NaN/inf entries"):
        winnow.compile(log_model_path, out, pipeline="test-budget-nan", max_drop=1.0,
                       calibration=feeds)
    forced = winnow.compile(log_model_path, out, pipeline="test-budget-nan", force=True)
    assert forced.fidelity["budget"]["nonfinite_mismatch"] > 0
    assert forced.fidelity["min_cosine"] == 0.0


def test_nan_where_the_source_has_nan_is_not_held_against_the_result(log_model_path, tmp_path):
    result = winnow.compile(log_model_path, tmp_path / "out", pipeline="test-budget-nudge",
                            max_drop=0.01)
    assert result.fidelity["budget"]["nonfinite_mismatch"] == 0
    assert 0.0 < result.fidelity["max_abs_error"] < 0.01
    assert all(o["cosine"] > 0.9999 for o in result.fidelity["outputs"].values())


@pytest.mark.parametrize("bad", [-0.1, float("nan"), 1.5, float("inf"), "lots"])
def test_max_drop_must_be_a_number_from_0_to_1(log_model_path, tmp_path, bad):
    with pytest.raises(FidelityError, match="--max-drop .*must be a number from 0 to 1"):
        winnow.compile(log_model_path, tmp_path / "out", max_drop=bad)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, expected", [("5%", (0.05, True)), (" 0.5% ", (0.005, True)),
                                            ("0.01", (0.01, False)), (0.2, (0.2, False))])
def test_max_drop_is_a_number_or_a_percentage(text, expected):
    from winnow.driver.source import parse_max_drop

    drop, relative = parse_max_drop(text)
    assert drop == pytest.approx(expected[0]) and relative is expected[1]


def test_a_percentage_budget_is_judged_against_the_source_metric(tmp_path):
    out = tmp_path / "out"
    pipeline = "prune-channels{ratio=0.5}"  # no refit: accuracy falls far
    with pytest.raises(FidelityError, match="accuracy drop on .* relative to the source's accuracy "
                                            r"is .* above --max-drop 1%"):
        winnow.compile("zoo:digits-cnn", out, pipeline=pipeline, max_drop="1%")
    assert not out.exists()
    forced = winnow.compile("zoo:digits-cnn", out, pipeline=pipeline, max_drop="1%", force=True)
    held, budget = forced.fidelity["heldout"], forced.fidelity["budget"]
    ref, cand = held["reference_metric"], held["candidate_metric"]
    assert budget["relative"] is True and budget["max_drop"] == pytest.approx(0.01)
    assert budget["drop"] == pytest.approx((ref - cand) / ref) and budget["drop"] > 0.01


@pytest.mark.parametrize("bad", ["-1", "nan", "2", "101%", "-3%", "%"])
def test_cli_max_drop_is_checked(log_model_path, tmp_path, bad):
    result = CliRunner().invoke(cli, ["--quiet", "compile", str(log_model_path), "-o",
                                      str(tmp_path / "out"), f"--max-drop={bad}"])
    assert result.exit_code == 2 and "--max-drop" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("pass_name, what", [("test-budget-slice", "shape"),
                                             ("test-budget-drop-output", "1 outputs after")])
def test_changed_outputs_are_refused_even_when_forced(log_model_path, tmp_path, pass_name, what):
    with pytest.raises(FidelityError, match=f"changed the model's outputs .*{what}"):
        winnow.compile(log_model_path, tmp_path / "out", pipeline=pass_name, force=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_user_calibration_is_split_into_fitting_and_judging_parts(tmp_path):
    SEEN.clear()
    net = TinyTransformer(layers=3, seed=5)
    result = winnow.compile(net, tmp_path / "out", example_inputs=(torch.randn(2, 6, 32),),
                            calibration=CALIBRATION, max_drop=1.0,
                            pipeline="test-budget-record,drop-layers{count=1},dce")
    (seen,) = SEEN
    assert len(seen) == 2 and all(np.array_equal(a["x"], b["x"])
                                  for a, b in zip(seen, CALIBRATION[:2]))
    assert result.fidelity["judged_on"] == ("2 held-out calibration batches (the passes fit on "
                                            "the other 2)")
    assert result.fidelity["budget"]["measure"].endswith(result.fidelity["judged_on"])
    # the judged number is the cosine on the batches the passes never saw, recomputed here
    source = winnow.load(net, (torch.randn(2, 6, 32),))
    compiled = [run_artifact(tmp_path / "out", b) for b in CALIBRATION[2:]]
    independent = evaluate(source, compiled, CALIBRATION[2:])
    assert result.fidelity["heldout"]["cosine"] == pytest.approx(independent.cosine, abs=1e-5)


@pytest.mark.slow
def test_one_small_calibration_batch_is_judged_on_the_check_inputs_and_says_so(tmp_path):
    net = TinyTransformer(layers=3, seed=5)
    zero_block_branches(net, 1)
    one = [{"x": np.random.default_rng(9).standard_normal((2, 6, 32)).astype(np.float32)}]
    result = winnow.compile(net, tmp_path / "one", example_inputs=(torch.randn(2, 6, 32),),
                            calibration=one, pipeline="fold-constants,drop-layers{count=1},dce",
                            max_drop=1e-6)
    assert result.fidelity["judged_on"].startswith("the check inputs (the calibration data is "
                                                   "too small")
    assert "heldout" not in result.fidelity


def test_judge_data_given_apart_leaves_all_calibration_for_fitting(log_model_path, tmp_path):
    SEEN.clear()
    rng = np.random.default_rng(4)
    fit = [{"x": np.abs(rng.standard_normal((3, 4))).astype(np.float32)} for _ in range(4)]
    judge = [{"x": np.abs(rng.standard_normal((5, 4))).astype(np.float32)}]
    result = winnow.compile(log_model_path, tmp_path / "out", calibration=fit, judge_data=judge,
                            pipeline="test-budget-record,test-budget-nudge", max_drop=0.01)
    assert len(SEEN[0]) == 4
    assert result.fidelity["judged_on"].startswith("1 judging batches given apart")
    assert result.fidelity["heldout"]["samples"] == 5
    want = np.log(judge[0]["x"]) * np.float32(1.001)
    assert result.fidelity["heldout"]["max_abs_error"] == pytest.approx(
        float(np.max(np.abs(want - np.log(judge[0]["x"])))), rel=1e-3)

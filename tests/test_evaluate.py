"""Fast unit tests of the evaluator on small arrays with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from winnow.errors import FidelityError
from winnow.measure.fidelity import (
    Fidelity,
    cosines,
    evaluate,
    guess_kind,
    kl_divergence,
    log_softmax,
)

RNG = np.random.default_rng(0)
LOGITS = [RNG.standard_normal((4, 5)).astype(np.float32) for _ in range(3)]
DATA = [{"x": x} for x in LOGITS]


def identity(feeds):
    return {"y": feeds["x"]}


def test_identical_outputs_are_perfect():
    fid = evaluate(identity, identity, DATA, output_kind="logits")
    assert isinstance(fid, Fidelity)
    assert fid.cosine == pytest.approx(1.0)
    assert fid.top1 == 1.0
    assert fid.kl == pytest.approx(0.0, abs=1e-12)
    assert fid.max_abs_error == 0.0
    assert fid.batches == 3 and fid.samples == 12
    assert fid.metric_name is None and fid.metric_drop is None


def test_scaled_logits_keep_cosine_and_top1_but_not_kl():
    fid = evaluate(identity, lambda f: {"y": 2 * f["x"]}, DATA, output_kind="logits")
    assert fid.cosine == pytest.approx(1.0)
    assert fid.top1 == 1.0
    assert fid.kl > 0.01
    assert fid.max_abs_error == pytest.approx(max(np.abs(x).max() for x in LOGITS), rel=1e-6)


def test_known_cosine_and_max_error():
    ref = [{"y": np.array([[1.0, 0.0], [1.0, 1.0]])}]
    cand = [{"y": np.array([[0.0, 1.0], [1.0, 1.0]])}]
    fid = evaluate(ref, cand, [{}], output_kind="values")
    assert fid.cosine == pytest.approx(0.5)  # one orthogonal sample, one identical
    assert fid.max_abs_error == pytest.approx(1.0)
    assert fid.top1 is None and fid.kl is None


def test_flipped_argmax_halves_top1():
    ref = [{"y": np.array([[3.0, 0.0], [0.0, 3.0]])}]
    cand = [{"y": np.array([[3.0, 0.0], [3.0, 0.0]])}]
    fid = evaluate(ref, cand, [{}], output_kind="logits")
    assert fid.top1 == pytest.approx(0.5)


def test_kl_matches_closed_form():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(np.log(p), np.log(q), "logits") == pytest.approx(expected)
    assert kl_divergence(p, q, "probs") == pytest.approx(expected)
    fid = evaluate([{"p": p[None]}], [{"p": q[None]}], [{}], output_kind="probs")
    assert fid.kl == pytest.approx(expected)


def test_log_softmax_is_stable():
    out = log_softmax(np.array([[1000.0, 1000.0]]))
    assert np.allclose(out, math.log(0.5))


def test_cosine_of_zero_vectors():
    assert cosines(np.zeros((1, 3)), np.zeros((1, 3)))[0] == 1.0
    assert cosines(np.zeros((1, 3)), np.ones((1, 3)))[0] == 0.0


def test_guess_kind():
    assert guess_kind(np.full((2, 4), 0.25, np.float32)) == "probs"
    assert guess_kind(np.array([[2.0, -1.0]], np.float32)) == "logits"
    assert guess_kind(np.array([1, 2], np.int64)) == "values"


def test_task_metric_of_both_and_drop():
    def accuracy(outputs):
        labels = np.array([0, 1])
        pred = np.concatenate([next(iter(o.values())).argmax(-1) for o in outputs])
        return {"accuracy": float((pred == labels).mean()), "n": 2.0}

    ref = [{"y": np.array([[2.0, 0.0], [0.0, 2.0]])}]
    cand = [{"y": np.array([[2.0, 0.0], [2.0, 0.0]])}]
    fid = evaluate(ref, cand, [{}], metric=accuracy)
    assert fid.metric_name == "accuracy"
    assert (fid.reference_metric, fid.candidate_metric) == (1.0, 0.5)
    assert fid.metric_drop == pytest.approx(0.5)
    assert fid.candidate_metrics == {"accuracy": 0.5, "n": 2.0}
    json.dumps(fid.to_dict())
    assert "accuracy 1.0000 -> 0.5000" in fid.summary()


def test_lower_is_better_metric_drop_sign():
    class Perplexity:
        name, higher_is_better = "perplexity", False

        def __call__(self, outputs):
            return {"perplexity": float(next(iter(outputs[0].values())).sum())}

    fid = evaluate([{"y": np.array([[2.0]])}], [{"y": np.array([[3.0]])}], [{}],
                   metric=Perplexity())
    assert fid.metric_drop == pytest.approx(1.0)


def test_outputs_pair_by_position_when_names_differ():
    fid = evaluate(identity, lambda f: {"other": f["x"]}, DATA)
    assert list(fid.outputs) == ["y"] and fid.cosine == pytest.approx(1.0)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(FidelityError, match="shape"):
        evaluate(identity, lambda f: {"y": f["x"][:, :2]}, DATA)


def test_ir_models_are_run_with_onnx_runtime():
    w = RNG.standard_normal((5, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
        initializer=[numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(proto.SerializeToString()))
    fid = evaluate(lambda f: {"y": f["x"] @ w}, model, DATA, output_kind="logits")
    assert fid.cosine == pytest.approx(1.0, abs=1e-6)
    assert fid.max_abs_error < 1e-5 and fid.top1 == 1.0


def test_package_level_evaluate_and_zoo():
    import winnow

    data = [{"x": np.ones((2, 3), np.float32)}]
    same = winnow.evaluate(lambda f: {"y": f["x"]}, lambda f: {"y": f["x"]}, data)
    assert same.cosine == pytest.approx(1.0)
    import winnow.measure.fidelity  # noqa: F401  (importing the module must not shadow the function)

    assert callable(winnow.evaluate)
    assert winnow.zoo.get("minilm").name == "minilm"

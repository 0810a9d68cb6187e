"""The finalists' timer: a model with a dynamic batch is timed at b1 and b8 (rows repeated when
the data has fewer), a fixed-batch model at its own batch only; a candidate's cost is the
geometric mean of its ratios; the timing batches are a search option."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from winnow.driver.search import SearchOptionError, SearchOptions
from winnow.driver.timing import CandidateTimer, combined_ratio, timing_feeds


def _matmul_model(batch) -> ir.Model:
    """Y = X @ W with X of shape [batch, 4] (`batch` a name for a dynamic axis, or a number)."""
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, 4])], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _feeds(rows):
    return {"X": np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)}


def test_a_dynamic_batch_is_timed_at_b1_and_b8_with_rows_repeated():
    feeds = timing_feeds(_matmul_model("N"), _feeds(3), (1, 8))
    assert list(feeds) == ["b1", "b8"]
    np.testing.assert_array_equal(feeds["b1"]["X"], _feeds(3)["X"][:1])
    rows = _feeds(3)["X"]
    np.testing.assert_array_equal(feeds["b8"]["X"], np.concatenate([rows, rows, rows[:2]]))


def test_a_fixed_batch_model_is_timed_at_its_own_batch_only():
    # Timing it at b8 would feed ORT 8 rows where the model takes 16 (a load error).
    model = _matmul_model(16)
    timer = CandidateTimer(model, _feeds(16), (1, 8), repeats=1)
    assert list(timer.batch_feeds) == ["b16"] and timer.feeds["X"].shape == (16, 4)
    ratios = timer.latency_ratios(_matmul_model(16))
    assert list(ratios) == ["b16"] and ratios["b16"] > 0
    assert timer.seconds["b16"] > 0


def test_the_timer_times_every_batch_of_every_candidate_together():
    timer = CandidateTimer(_matmul_model("N"), _feeds(8), (1, 8), repeats=2)
    assert timer.feeds["X"].shape == (8, 4)  # the cost model prices the largest batch
    ratios = timer.latency_ratios_together({"a": _matmul_model("N"), "b": _matmul_model("N")}, 2)
    assert {name: sorted(r) for name, r in ratios.items()} == {"a": ["b1", "b8"],
                                                              "b": ["b1", "b8"]}
    assert timer.seconds["b1"] > 0 and timer.seconds["b8"] > 0


def test_the_combined_cost_is_the_geometric_mean_of_the_ratios():
    assert combined_ratio({"b1": 0.81, "b8": 0.68}) == pytest.approx(np.sqrt(0.81 * 0.68))
    assert combined_ratio({"b4": 0.9}) == pytest.approx(0.9)


def test_timing_batches_are_a_search_option():
    assert SearchOptions().timing_batches == (1, 8)
    assert SearchOptions(timing_batches=[8]).timing_batches == (8,)  # as a study's JSON holds it
    for bad in ((), (0, 8)):
        with pytest.raises(SearchOptionError, match="timing batches"):
            SearchOptions(timing_batches=bad)

"""`CheckedRewrite` (passes/checked.py), the skeleton of every checked lossless rewrite: a copy
that changes the outputs is refused and the model stays as it was; a matching copy is adopted."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tests.graphs import HEADER, parse
from winnow.ir.execute import run
from winnow.passes import PassContext, PassManager
from winnow.passes import CheckedRewrite

SCALE = HEADER + """
agraph (float[2, 3] x) => (float[2, 3] y) <float[3] w = {1.0, 2.0, 3.0}> {
    y = Mul (x, w)
}
"""
FEEDS = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3)}]


class _Scale(CheckedRewrite):
    """Multiplies the weight by `factor` (1 keeps the outputs, anything else changes them)."""

    name = "test-scale"
    unchanged_report = {"scaled": False}

    def __init__(self, factor: float, fail: bool = False, **options):
        super().__init__(**options)
        self.factor, self.fail = factor, fail

    def rewrite(self, model: ir.Model, feeds: list) -> dict:
        if self.fail:
            raise ValueError("odd graph")
        w = model.graph.initializers["w"]
        w.const_value = ir.tensor(w.const_value.numpy() * self.factor, name="w")
        return {"scaled": True}


def _run(p: CheckedRewrite):
    model, ctx = parse(SCALE), PassContext(calibration=FEEDS)
    result = PassManager([p]).run(model, ctx)
    return model, result, ctx.report[p.name]


def test_a_copy_with_the_same_outputs_is_adopted():
    model, result, report = _run(_Scale(1.0 + 1e-7))
    assert result.modified and report["scaled"] and report["max_abs_error"] < 1e-4
    assert report["checked_samples"] == 2


def test_a_copy_that_changes_the_outputs_is_refused_and_the_model_kept():
    model, result, report = _run(_Scale(1.01))
    assert not result.modified and report["scaled"] is False
    assert "differ by 0.15" in report["skipped"]  # 15 * 0.01, the largest output change
    np.testing.assert_array_equal(run(model, FEEDS[0])["y"], FEEDS[0]["x"] * [1.0, 2.0, 3.0])


def test_a_looser_tolerance_takes_the_same_copy():
    _, result, report = _run(_Scale(1.01, tolerance=0.2))
    assert result.modified and report["max_abs_error"] == pytest.approx(0.15, rel=1e-4)


def test_an_error_in_a_fallible_rewrite_skips_and_elsewhere_raises():
    fallible = _Scale(1.0, fail=True)
    fallible.fallible = True
    model, result, report = _run(fallible)
    assert not result.modified and report["skipped"] == "ValueError: odd graph"
    with pytest.raises(Exception, match="odd graph"):
        PassManager([_Scale(1.0, fail=True)]).run(parse(SCALE), PassContext(calibration=FEEDS))

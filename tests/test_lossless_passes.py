"""Unit tests of each built-in lossless pass on tiny graphs, differential against the original."""

from __future__ import annotations

import numpy as np
import pytest

from tests.graphs import DEAD, DUPLICATED, FOLDABLE, IDENTITY_CHAIN, UNSHAPED, model
from winnow import testing
from winnow.ir.execute import run
from winnow.passes import PassManager

X2 = {"x": np.array([0.5, -1.5], dtype=np.float32)}


def ops(m) -> list[str]:
    return [n.op_type for n in m.graph]


def run_pass(text: str, pipeline: str, feeds: dict):
    """Run `pipeline` on the graph `text` (verified after each pass); outputs must not change."""
    source = model(text)
    result = testing.run_pass(pipeline, source)
    testing.assert_valid(result.model)
    testing.assert_equivalent(source, result.model, feeds, rtol=0, atol=1e-6)
    return result.model, result.modified


def test_fold_constants_folds_the_constant_add():
    m, modified = run_pass(FOLDABLE, "fold-constants", X2)
    assert modified
    assert "Add" not in ops(m)
    m, _ = run_pass(FOLDABLE, "fold-constants,dce", X2)
    assert ops(m) == ["Mul"]


def test_cse_merges_identical_relus():
    m, modified = run_pass(DUPLICATED, "cse", X2)
    assert modified
    assert ops(m).count("Relu") == 1


def test_dce_removes_unused_node():
    m, modified = run_pass(DEAD, "dce", X2)
    assert modified
    assert ops(m) == ["Relu"]


def test_canonicalize_removes_identities():
    m, modified = run_pass(IDENTITY_CHAIN, "canonicalize", X2)
    assert modified
    assert "Identity" not in ops(m)


def test_canonicalize_removes_multiply_by_one():
    text = '<ir_version: 8, opset_import: ["" : 18]>' + """
    agraph (float[2] x) => (float[2] y) {
        one = Constant <value = float {1.0}> ()
        m = Mul (x, one)
        y = Relu (m)
    }
    """
    m, modified = run_pass(text, "canonicalize", X2)
    assert modified
    assert "Mul" not in ops(m)


def test_shape_inference_annotates_intermediate_values():
    m = model(UNSHAPED)
    relu_out = next(iter(m.graph)).outputs[0]
    assert relu_out.shape is None
    _, modified = run_pass(UNSHAPED, "shape-inference", {"x": np.ones((3, 4), np.float32)})
    result = PassManager("shape-inference").run(m)
    assert result.modified and modified
    assert list(relu_out.shape) == [3, 4]


def test_shape_inference_keeps_sequence_types():
    text = '<ir_version: 8, opset_import: ["" : 18]>' + """
    agraph (float[2, 3] x) => (float[2, 3] y) {
        s = SequenceConstruct (x, x)
        p = Constant <value = int64 {1}> ()
        y = SequenceAt (s, p)
    }
    """
    m = model(text)
    PassManager("shape-inference").run(m)
    seq = next(iter(m.graph)).outputs[0]
    assert "Sequence" in type(seq.type).__name__
    run(m, {"x": np.ones((2, 3), np.float32)})


def test_nothing_to_do_reports_unmodified():
    m = model(UNSHAPED)
    assert not PassManager("cse,dce").run(m).modified


@pytest.mark.parametrize("text", [FOLDABLE, DUPLICATED, DEAD, IDENTITY_CHAIN, UNSHAPED])
def test_default_pipeline_is_lossless_on_tiny_graphs(text):
    m = model(text)
    shape = (3, 4) if text is UNSHAPED else (2,)
    feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    compiled, _ = run_pass(text, "shape-inference,fold-constants,canonicalize,cse,dce", feeds)
    want, got = run(m, feeds), run(compiled, feeds)  # the untouched source is the oracle
    assert list(got) == list(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6)

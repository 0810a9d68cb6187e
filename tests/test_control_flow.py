"""Models with If / Loop / Scan through the default pipeline: outputs equal to an independent
oracle (the onnx package's shipped outputs, else onnx's reference evaluator), subgraphs rewritten
where it is safe, and the onnx-ir identity-elimination cases that used to corrupt them."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

import winnow
from tests.control_flow_corpus import collect, hand_built_cases, loop_model, scan_model
from winnow.backends.ort import run_artifact
from winnow.errors import ExecutionError, VerificationError
from winnow.measure.fidelity import lossless_mismatch
from winnow.ir.execute import run
from winnow.ir.verify import verify
from winnow.passes.instruments import VerifyInstrument
from winnow.passes.manager import DEFAULT_PIPELINE, PassManager
from winnow.passes.rewrite.canonicalize import identity_removable

CASES = collect()


@functools.lru_cache(maxsize=None)
def _oracle(case_id: str) -> dict:
    """Shipped or numpy-computed outputs, else onnx's reference evaluator on the source (not
    ORT, not winnow)."""
    case = next(c for c in CASES if c.id == case_id)
    names = [o.name for o in case.model.graph.output]
    if case.expected is not None:
        return dict(zip(names, case.expected))
    return dict(zip(names, ReferenceEvaluator(case.model).run(None, case.feeds)))


def _run(model: ir.Model, feeds: dict) -> dict:
    """ORT's outputs, or the reference evaluator's where ORT cannot run the model."""
    try:
        return run(model, feeds)
    except ExecutionError:
        proto = ir.serde.serialize_model(model)
        return dict(zip([o.name for o in proto.graph.output],
                        ReferenceEvaluator(proto).run(None, feeds)))


def _count(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_default_pipeline_keeps_outputs(case):
    model = ir.serde.deserialize_model(case.model)
    assert lossless_mismatch(_oracle(case.id), _run(model, case.feeds)) is None, "bad oracle"
    PassManager(DEFAULT_PIPELINE, [VerifyInstrument()]).run(model)
    assert lossless_mismatch(_oracle(case.id), _run(model, case.feeds)) is None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_compile_round_trip_needs_no_rollback(case, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(case.model, path)
    result = winnow.compile(path, tmp_path / "out")
    assert result.fidelity.get("rolled_back") == []
    got = run_artifact(tmp_path / "out", case.feeds)
    assert lossless_mismatch(_oracle(case.id), got) is None


def test_corpus_covers_every_kind():
    sources = {c.source for c in CASES}
    assert sources == {"onnx-node", "hand-built", "torch"}
    ops = {n.op_type for c in CASES for n in c.model.graph.node}
    assert {"If", "Loop", "Scan", "LSTM", "GRU"} <= ops
    assert len(CASES) >= 24


def test_scan_state_emitted_through_identity_keeps_both_outputs():
    """The body's state output and its Identity copy stay two values with their own names."""
    model = ir.serde.deserialize_model(scan_model(9, 2))
    PassManager("canonicalize").run(model)
    body = next(iter(model.graph)).attributes["body"].as_graph()
    names = [v.name for v in body.outputs]
    assert len(set(names)) == len(names) == 4


def test_identity_of_an_outer_value_is_kept_but_others_go():
    model = ir.serde.deserialize_model(hand_built_cases()[4].model)  # if_shared_identity
    ifs = [n for n in model.graph if n.op_type == "If"]
    then_identity = next(iter(ifs[0].attributes["then_branch"].as_graph()))
    assert not identity_removable(then_identity)
    loop = ir.serde.deserialize_model(loop_model())
    body = next(n for n in loop.graph if n.op_type == "Loop").attributes["body"].as_graph()
    scan_identity = next(n for n in body if n.outputs[0].name == "scan_t")
    assert not identity_removable(scan_identity)  # v_out is a body output already


def test_loop_body_is_folded_deduplicated_and_cleaned():
    model = ir.serde.deserialize_model(loop_model())
    before = _count(model)
    PassManager(DEFAULT_PIPELINE).run(model)
    body = next(n for n in model.graph if n.op_type == "Loop").attributes["body"].as_graph()
    ops = [n.op_type for n in body]
    assert "Neg" not in ops, "dead code in the body stays"
    assert ops.count("Mul") == 1, "the duplicate Mul in the body stays"
    assert "Constant" not in ops, "the constant product in the body is not folded"
    assert _count(model) < before
    feeds = {"n": np.array(3, np.int64), "x": np.array([1.0, -2.0, 0.5], np.float32)}
    want = hand_built_cases()[6].expected
    np.testing.assert_allclose(run(model, feeds)["v_all"], want[1], rtol=1e-6)


def test_verify_finds_a_body_with_two_outputs_of_one_name():
    """What onnx-ir 1.1's identity elimination made of a Scan body: caught by verify's lint."""
    model = ir.serde.deserialize_model(scan_model(9, 1))
    body = next(iter(model.graph)).attributes["body"].as_graph()
    body.outputs[1] = body.outputs[0]
    with pytest.raises(VerificationError, match="two outputs of one name"):
        verify(model)


def test_verify_finds_a_body_reading_a_value_produced_after_its_node():
    model = ir.serde.deserialize_model(hand_built_cases()[4].model)
    relu, first_if = list(model.graph)[:2]
    model.graph.remove(relu)
    model.graph.insert_after(first_if, relu)
    with pytest.raises(VerificationError, match="in subgraph '(then|else)' reads 'h' before it is"):
        verify(model)

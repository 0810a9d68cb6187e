"""Differential round trip: every model the onnx package ships, through the default pipeline
and the ORT backend, must give the shipped expected outputs (or the source's ORT outputs).
A model ONNX Runtime cannot run is compiled without the check and its artifact's model.onnx is
run with onnx's reference evaluator instead, against the shipped outputs (or the source's
reference-evaluator outputs); only what neither runtime runs is skipped."""

from __future__ import annotations

import pytest
from onnx.reference import ReferenceEvaluator

import winnow
from tests.onnx_corpus import OUTCOMES, SKIP_REASONS, collect, outputs_close
from winnow.backends.ort import run_artifact
from winnow.errors import ExecutionError
from winnow.ir.execute import run
from winnow.ir.inputs import random_feeds

CASES = collect()


def _marks(case):
    return [pytest.mark.slow] if case.group == "light" else []


def _skip(reason: str) -> None:
    OUTCOMES["skipped"] += 1
    SKIP_REASONS[reason] += 1
    pytest.skip(reason)


def _short(exc: Exception) -> str:
    text = str(exc)
    for marker in ("NOT_IMPLEMENTED", "not a registered function", "locale", "INVALID_GRAPH"):
        if marker in text:
            return f"ONNX Runtime cannot run the source ({marker})"
    return "ONNX Runtime cannot run the source"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CASES])
def test_default_pipeline_and_ort_backend_keep_outputs(case, tmp_path):
    source = winnow.load(case.model_path)
    names = [v.name for v in source.graph.inputs if v.name not in source.graph.initializers]
    feeds = case.inputs(names) or random_feeds(source, seed=0)
    try:
        reference = run(source, feeds)
    except ExecutionError as exc:
        _check_with_reference_evaluator(case, feeds, tmp_path / "out", _short(exc))
        return
    out = tmp_path / "out"
    OUTCOMES["attempted"] += 1
    winnow.compile(case.model_path, out)
    compiled = run_artifact(out, feeds)
    _assert_outputs(case, list(reference.values()), list(compiled.values()), "source ORT")


def _assert_outputs(case, source_outputs: list, got: list, runtime: str) -> None:
    """`got` equals the shipped outputs when the source gives them, else the source's outputs."""
    expected = case.expected_outputs()
    use_shipped = expected is not None and len(expected) == len(source_outputs) and all(
        outputs_close(r, e) for r, e in zip(source_outputs, expected))
    want = expected if use_shipped else source_outputs
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want)):
        assert outputs_close(g, w), (f"output {index} differs from the "
                                     f"{'shipped' if use_shipped else runtime} output")
    suffix = "" if runtime == "source ORT" else " (reference evaluator)"
    OUTCOMES[("passed vs shipped outputs" if use_shipped
              else f"passed vs {runtime} outputs") + suffix] += 1


def _reference_run(model_path, feeds: dict) -> list:
    """Outputs of onnx's reference evaluator; skips when it cannot run the model either."""
    try:
        return list(ReferenceEvaluator(str(model_path)).run(None, feeds))
    except NotImplementedError as exc:
        _skip(f"neither ONNX Runtime nor the reference evaluator runs the source "
              f"({str(exc).splitlines()[0][:80]})")


def _check_with_reference_evaluator(case, feeds: dict, out, ort_problem: str) -> None:
    """Compile without the ORT check; the artifact's model.onnx must give, in the reference
    evaluator, the outputs the source gives there (or the shipped ones)."""
    source_outputs = _reference_run(case.model_path, feeds)
    OUTCOMES["attempted"] += 1
    winnow.compile(case.model_path, out, check=False)
    got = _reference_run(out / "model.onnx", feeds)
    _assert_outputs(case, source_outputs, got, f"source reference-evaluator ({ort_problem})")


def test_corpus_is_not_empty():
    assert len(CASES) > 100

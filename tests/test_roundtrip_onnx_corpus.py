"""Differential round trip: every model the onnx package ships, through the default pipeline
and the ORT backend, must give the shipped expected outputs (or the source's ORT outputs)."""

from __future__ import annotations

import pytest

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
        _skip(_short(exc))
    out = tmp_path / "out"
    OUTCOMES["attempted"] += 1
    winnow.compile(case.model_path, out)
    compiled = run_artifact(out, feeds)
    expected = case.expected_outputs()
    ref_list = list(reference.values())
    use_shipped = expected is not None and len(expected) == len(ref_list) and all(
        outputs_close(r, e) for r, e in zip(ref_list, expected))
    want = expected if use_shipped else ref_list
    got = list(compiled.values())
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want)):
        assert outputs_close(g, w), f"output {index} differs from the {'shipped' if use_shipped else 'source ORT'} output"
    OUTCOMES["passed vs shipped outputs" if use_shipped else "passed vs source ORT outputs"] += 1


def test_corpus_is_not_empty():
    assert len(CASES) > 100

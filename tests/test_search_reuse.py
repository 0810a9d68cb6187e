"""A search trial whose pipeline trains (`Pass.trains`, as distill does) keeps its model: judging
the finalists and the emit reuse it, so a distilled finalist is trained once, the emitted weights
are the trial's, and the manifest's held-out fidelity is that model's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import winnow
from winnow.driver import SearchOptions, search_compile
from winnow.driver.search import Candidate, TrainedModels, TrialRunner, lossless_base
from winnow.driver.source import resolve
from winnow.driver.space import pipeline_text, seed_plans
from winnow.ir.execute import model_bytes, run
from winnow.passes import Pass, PassResult, register_pass
from winnow.passes.manager import finished
from tests.tiny_models import TinyTransformer, zero_block_branches

MADE: list[bytes] = []  # every model the training pass made, in call order


@register_pass
class CountedTrainingPass(Pass):
    """Stands in for distill: a lossy pass that trains, a new draw of weight noise each run (as
    training bounded in seconds gives other weights each run), counting its runs."""

    name = "test-counted-training"
    description = "perturbs the float weights by 1%, differently on each run"
    lossless = False
    trains = True

    def call(self, model: ir.Model) -> PassResult:
        """Scale every large float weight by 1 + 1% noise drawn from the run's number."""
        rng = np.random.default_rng(len(MADE))
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            if array.dtype == np.float32 and array.size > 100:
                noise = rng.standard_normal(array.shape).astype(np.float32)
                value.const_value = ir.tensor(array * (1 + 0.01 * noise), name=value.name)
        MADE.append(model_bytes(model))
        return PassResult(model, True)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    module = TinyTransformer(dim=32, heads=4, layers=3).eval()
    zero_block_branches(module, 1)  # block 1 is an identity: dropping it loses nothing
    x = torch.randn(12, 10, 32, generator=torch.Generator().manual_seed(3))
    path = tmp_path_factory.mktemp("reuse") / "model.onnx"
    onnx.save(ir.to_proto(winnow.load(module, (x,), {"x": {0: torch.export.Dim("batch")}})), path)
    return path


def _calibration() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((3, 10, 32)).astype(np.float32)} for _ in range(12)]


def _distilled_plan(space):
    """The first distilled seed plan (a block dropped, then the training pass)."""
    return next(p for p in seed_plans(space)[1] if p.get("distill"))


def _weights(data: bytes) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load_from_string(data).graph.initializer}


def test_a_distilled_finalist_is_trained_once_and_emitted_as_its_trial_made_it(tiny_path, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr("winnow.driver.space.DISTILL", CountedTrainingPass.name)
    monkeypatch.setattr("winnow.driver.search.seed_plans",
                        lambda space: ([_distilled_plan(space)], []))
    MADE.clear()
    out = tmp_path / "out"
    options = SearchOptions(objective="size", trials=1, max_drop=0.01, time_budget=300)
    result = search_compile(str(tiny_path), out, options, calibration=_calibration())
    assert CountedTrainingPass.name in result.chosen.pipeline
    assert len(MADE) == 1  # the trial; neither the finalist's judging nor the emit trained again
    emitted = (out / "model.onnx").read_bytes()
    trial, got = _weights(MADE[0]), _weights(emitted)
    assert trial.keys() == got.keys()
    assert all(np.array_equal(trial[name], got[name]) for name in trial)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"] == finished(result.chosen.pipeline)  # then trim-padding
    heldout = manifest["fidelity"]["heldout"]
    assert heldout["cosine"] == pytest.approx(result.chosen.heldout_cosine, abs=1e-9)
    # The held-out error of the emitted model against the source, computed here apart.
    src = resolve(str(tiny_path), _calibration())
    source, chosen = winnow.load(str(tiny_path)), ir.from_proto(onnx.load_from_string(emitted))
    error = max(float(np.max(np.abs(run(source, feeds)[name] - got_out)))
                for feeds in src.heldout
                for name, got_out in run(chosen, feeds).items())
    assert error > 1e-4  # the noise shows: a model trained again would not match
    assert heldout["max_abs_error"] == pytest.approx(error, rel=1e-5)
    entries = [e for e in manifest["passes"] if e.get("reused")]
    finishing = manifest["passes"][len(entries):]  # the finishing passes run on the kept model
    assert [e["name"] for e in entries][-1] == CountedTrainingPass.name and entries[-1]["modified"]
    assert [e["name"] for e in finishing] == ["fuse-convs", "split-skip-norms", "trim-padding"]


def test_a_finalist_another_process_trained_is_trained_again_once_and_that_model_is_emitted(
        tiny_path):
    src = resolve(str(tiny_path), _calibration())
    base = lossless_base(src)
    options = SearchOptions(objective="size", max_drop=0.01)
    runner = TrialRunner(src, base, options)
    pipeline = pipeline_text({"drop": {"level": "block", "count": 1, "replacement": "identity"}}
                             ) + "," + CountedTrainingPass.name
    MADE.clear()
    with TrainedModels(options, []) as trained:
        runner.trained = trained  # nothing kept: a worker in another process ran the trial
        cand = Candidate(7, pipeline, 0.6, 0.0, 1.0, "h7")
        chosen, _ = runner.choose([cand])
        assert chosen is cand and len(MADE) == 1
        emitted = model_bytes(trained.rewritten(pipeline).model)
    trial, got = _weights(MADE[0]), _weights(emitted)
    assert all(np.array_equal(trial[name], got[name]) for name in trial)


def test_only_trained_models_that_can_become_finalists_are_kept(tmp_path):
    options = SearchOptions(objective="size", max_drop=0.01, finalists=1)
    cands = [Candidate(n, f"p{n}", cost, drop, 1.0, f"h{n}")
             for n, cost, drop in ((0, 0.5, 0.0), (1, 0.6, 0.0), (2, 0.7, 0.0), (3, 0.4, 0.5))]
    with TrainedModels(options, [], tmp_path) as trained:
        for cand in cands:
            trained.keep(cand.pipeline, b"onnx", [], 1.0)
        files = {p: trained.kept[p][0] for p in trained.kept}
        # twice `finalists` cheapest within budget: p3 is past the budget, p2 third cheapest
        assert trained.keep_finalists(cands) == {"p0", "p1"}
        assert set(trained.kept) == {"p0", "p1"}
        assert [p for p, f in files.items() if f.exists()] == ["p0", "p1"]
    assert not any(tmp_path.iterdir())  # the folder goes with the search


def test_a_plan_asked_for_twice_is_trained_and_judged_once(tiny_path):
    # TPE and the seed tiers asked for the same distilled plans again: 5 of digits-vit's 36
    # trials ran a minute-long pipeline a second time
    src = resolve(str(tiny_path), _calibration())
    runner = TrialRunner(src, lossless_base(src), SearchOptions(objective="size", max_drop=0.01))
    pipeline = pipeline_text({"drop": {"level": "block", "count": 1, "replacement": "identity"}}
                             ) + "," + CountedTrainingPass.name
    MADE.clear()
    first = runner.evaluate(0, pipeline)
    again = runner.evaluate(5, pipeline)
    assert len(MADE) == 1 and not first.cached and again.cached
    assert (again.number, again.cost, again.drop, again.hash) == (5, first.cost, first.drop,
                                                                 first.hash)
    other = runner.evaluate(6, pipeline.replace("count=1", "count=2"))
    assert len(MADE) == 2 and not other.cached

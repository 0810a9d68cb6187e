"""The search's time budget: trials stop when the trial about to start, the finalists' check and
the emit, each priced from this process's own trials, would no longer fit before the budget's
end less a safety margin; judging finalists ends in time for the emit."""

from __future__ import annotations

import dataclasses
import time

import pytest

from winnow.driver.search import (
    FINISH_TRIALS,
    SAFETY_SHARE,
    SearchOptions,
    TrialClock,
    TrialRunner,
)
from winnow.driver.space import Space, base_plan

END = 10_000.0  # the budget's end on a fake clock


def _clock(budget=100.0, finalists=3):
    return TrialClock(SearchOptions(time_budget=budget, finalists=finalists))


def test_the_deadline_prices_the_next_trial_the_finalists_and_the_emit_from_measured_trials():
    clock = _clock()
    assert clock.deadline(END, END - 25.0, next_trains=False) == END - 25.0  # nothing timed yet
    clock.record(10.0, applied=2.0, trains=False)
    clock.record(40.0, applied=35.0, trains=True)  # judged again from its kept model: 5 s
    clock.record(6.0, applied=1.0, trains=False)
    # judging 10, 5, 6 s: the finalists' check is (3 + 1) x 1.5 x 7 = 42 s; the emit the longest
    # judging, 10 s; the margin 3% of 100 s
    assert clock.judging_seconds() == pytest.approx(4 * FINISH_TRIALS * 7.0) == 42.0
    assert clock.emit_seconds() == 10.0 and clock.margin == pytest.approx(SAFETY_SHARE * 100)
    assert clock.finish_by(END) == pytest.approx(END - 3.0 - 10.0)
    # a trial that trains must end in time: it is as long as the longest of its kind
    assert clock.deadline(END, END - 25.0, next_trains=True) == pytest.approx(END - 95.0)
    assert clock.deadline(END, END - 25.0, next_trains=False) == pytest.approx(END - 65.0)


def test_the_first_trial_of_a_kind_starts_no_later_than_before_any_trial_was_timed():
    clock = _clock(budget=1000.0)
    clock.record(2.0, applied=1.0, trains=False)
    # no trial trained yet: a distilled one may run a minute, so the first guess bounds it
    assert clock.deadline(END, END - 250.0, next_trains=True) == END - 250.0
    assert clock.deadline(END, END - 250.0, next_trains=False) == pytest.approx(
        END - 30.0 - 2.0 - 4 * FINISH_TRIALS * 2.0 - 2.0)


def test_a_failed_or_cached_trial_counts_for_the_next_trial_but_not_for_judging():
    clock = _clock()
    clock.record(4.0, applied=1.0, trains=False)
    clock.record(50.0, applied=50.0, trains=True, judged=False)  # distill failed after 50 s
    clock.record(60.0, applied=58.0, trains=True, judged=False)  # trained to an earlier model
    assert clock.judging_seconds() == pytest.approx(4 * FINISH_TRIALS * 4.0)
    assert clock.emit_seconds() == 4.0
    assert clock.deadline(END, END - 25.0, next_trains=True) == pytest.approx(
        END - 3.0 - 4.0 - 24.0 - 60.0)


def test_a_finalist_is_judged_only_when_its_judging_and_the_emit_after_it_fit():
    from tests.test_search_choice import _cand, _runner

    runner = _runner({"a": 0.7, "c": 0.6}, {"a": 0.0, "c": 0.0})
    slow_winner = dataclasses.replace(_cand(1, "a", 0.5), seconds=40.0)
    quick = dataclasses.replace(_cand(2, "c", 0.6), seconds=10.0)
    # "c" alone would fit in 45 s, but if "a" stays chosen its emit takes 40 s more
    chosen, message = runner.choose([slow_winner, quick], budget_end=time.time() + 45.0)
    assert chosen.pipeline == "a" and quick.heldout_drop is None
    assert "1 more finalist(s) left unjudged" in message
    runner = _runner({"a": 0.7, "c": 0.6}, {"a": 0.0, "c": 0.0})
    chosen, _ = runner.choose([dataclasses.replace(slow_winner, seconds=20.0), quick],
                              budget_end=time.time() + 45.0)
    assert chosen.pipeline == "c"  # 10 s + an emit of at most 20 s fit


def test_trials_stop_so_that_the_finalists_and_the_emit_still_fit(monkeypatch):
    import optuna

    from winnow.driver.study import run_trials

    now = [0.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    clock = _clock(budget=100.0, finalists=1)
    lengths = iter([8.0, 8.0, 30.0] + [8.0] * 20)  # the third trial distills
    trained = {2}

    def objective(trial):
        seconds = next(lengths)
        now[0] += seconds
        clock.record(seconds, applied=seconds - 2.0, trains=trial.number in trained)
        return 1.0

    def next_trains():
        return len(clock.times) in trained

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    budget_end = 100.0
    ran = run_trials(study, objective, 100, lambda: clock.deadline(budget_end, 75.0,
                                                                   next_trains()),
                     lambda study, trial: None, ())
    # The finalists' check is priced at (1 + 1) x 1.5 x mean judging; the emit and the margin
    # follow it: the last trial ended before all that had to start.
    assert now[0] <= clock.finish_by(budget_end) - clock.judging_seconds()
    assert ran == len(clock.times) >= 4  # it did not stop at the first guess either


def test_the_next_trial_trains_when_the_queued_plan_distills_or_tpe_may_draw_distill():
    import optuna

    space = Space(drop_levels={"block": 2}, width=(), fuse=False, quant_modes=(), distill=True)
    runner = TrialRunner.__new__(TrialRunner)
    runner.space = space
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    assert runner.next_trains(study) is True  # nothing queued: TPE may draw a distilled plan
    drop = dict(base_plan(space), **{"drop.count": 1, "drop.replacement": "context"})
    study.enqueue_trial(drop)
    study.enqueue_trial(dict(drop, distill=True))
    assert runner.next_trains(study) is False  # the first queued plan does not train
    study.ask()
    assert runner.next_trains(study) is True
    runner.space = Space(drop_levels={"block": 2}, width=(), fuse=False, quant_modes=())
    study.ask()
    assert runner.next_trains(study) is False


def test_the_budget_counts_from_the_callers_start(tmp_path):
    import numpy as np
    import onnx
    import onnx_ir as ir
    import torch

    import winnow
    from tests.tiny_models import TinyTransformer
    from winnow.driver import search_compile
    from winnow.passes.manager import DEFAULT_PIPELINE

    module = TinyTransformer(dim=16, heads=2, layers=2).eval()
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "model.onnx"
    onnx.save(ir.to_proto(winnow.load(module, (x,), {"x": {0: torch.export.Dim("batch")}})), path)
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((2, 6, 16)).astype(np.float32)} for _ in range(6)]
    # asked for an hour ago with a minute's budget: no trial may start, the lossless pipeline
    # is emitted all the same
    result = search_compile(path, tmp_path / "out", SearchOptions(time_budget=60.0),
                            calibration=data, started_at=time.time() - 3600.0)
    assert result.trials == 0 and result.chosen.pipeline == DEFAULT_PIPELINE
    assert result.seconds >= 3600.0 and (tmp_path / "out" / "model.onnx").exists()


def test_a_trial_left_running_without_a_heartbeat_is_re_queued(tmp_path, monkeypatch):
    import optuna

    from winnow.driver import study as study_mod

    monkeypatch.setattr(study_mod, "GRACE_S", 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = study_mod.open_storage(f"sqlite:///{tmp_path / 'search.db'}")
    study = optuna.create_study(storage=storage)
    orphan = study.ask()  # RUNNING, no heartbeat: its process died before the first one
    orphan.suggest_float("x", 0.0, 1.0)
    time.sleep(1.5)
    start = time.time()
    ran = study_mod.run_trials(study, lambda trial: trial.suggest_float("x", 0.0, 1.0), 1,
                               start + 60.0, lambda study, trial: None, ())
    # re-queued after one more grace period and run here, not waited on until the deadline
    assert ran == 1 and time.time() - start < 30.0
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]

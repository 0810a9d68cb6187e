"""The search's time budget: trials stop when the trial about to start, the finalists' check and
the emit, each priced from this process's own trials, would no longer fit before the budget's
end less a safety margin; judging finalists ends in time for the emit."""

from __future__ import annotations

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

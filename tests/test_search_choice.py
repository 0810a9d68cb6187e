"""The search's final choice: the measured timing of the finalists decides (at b1 and b8 alike),
a finalist measured slower than the lossless base never wins; TPE treats trials past the budget as infeasible; the
follow-up phase queues merged plans once the first seeds are done."""

from __future__ import annotations

import dataclasses
import time
import types

import pytest

from winnow.driver.search import Candidate, SearchOptions, TrialRunner, over_budget
from winnow.passes.manager import DEFAULT_PIPELINE


class _Timer:
    """Latency ratios by batch (a plain number is a ratio at b8 alone, as for a fixed batch)."""

    def __init__(self, measured, together=None):
        self.measured, self.together = measured, together or measured

    def latency_ratios(self, model, repeats=None):
        return _by_batch(self.measured[model])

    def latency_ratios_together(self, models, repeats):
        return {name: _by_batch(self.together[model]) for name, model in models.items()}


def _by_batch(ratio):
    return dict(ratio) if isinstance(ratio, dict) else {"b8": ratio}


class _Source:
    def __init__(self, drops):
        self.drops = drops

    def score(self, model, split):
        return types.SimpleNamespace(metric_drop=self.drops[model], cosine=1.0,
                                     max_abs_error=0.0)


def _runner(measured, drops, max_drop=0.01):
    runner = TrialRunner.__new__(TrialRunner)
    runner.options = SearchOptions(max_drop=max_drop)
    runner.timer, runner.src = _Timer(measured), _Source(drops)
    runner.apply = lambda pipeline: pipeline
    return runner


def _cand(number, pipeline, predicted):
    return Candidate(number, pipeline, predicted, 0.0, 1.0, pipeline)


def test_a_finalist_measured_slower_than_the_base_is_not_chosen():
    # fp16 was predicted cheapest but runs slower than the source on a CPU without fp16 kernels.
    runner = _runner({"fp16": 1.17, "int8": 0.71, "drop": 0.85},
                     {"fp16": 0.0, "int8": 0.004, "drop": 0.002})
    chosen, message = runner.choose([_cand(1, "fp16", 0.5), _cand(2, "drop", 0.8),
                                     _cand(3, "int8", 0.9)])
    assert chosen.pipeline == "int8" and chosen.measured_cost == pytest.approx(0.71)
    assert "x0.710" in message


def test_lossless_is_kept_when_every_finalist_is_measured_slower_or_past_the_budget():
    runner = _runner({"fp16": 1.02, "int8": 0.5}, {"fp16": 0.0, "int8": 0.02})
    chosen, message = runner.choose([_cand(1, "fp16", 0.5), _cand(2, "int8", 0.6)])
    assert chosen.pipeline == DEFAULT_PIPELINE and chosen.number == -1
    assert "kept the lossless pipeline" in message


def test_a_finalist_past_the_budget_on_held_out_data_takes_no_timing_slot():
    # The timer knows only "b": timing "a" would raise KeyError.
    runner = _runner({"b": 0.8, "c": 0.5}, {"a": 0.05, "b": 0.0, "c": 0.0})
    runner.options = SearchOptions(finalists=1)
    chosen, _ = runner.choose([_cand(1, "a", 0.5), _cand(2, "b", 0.6), _cand(3, "c", 0.7)])
    assert chosen.pipeline == "b"  # c, cheaper when measured, is past the one timing slot


def test_a_finalist_within_the_noise_margin_of_the_base_is_not_chosen():
    runner = _runner({"a": 0.99}, {"a": 0.0})
    assert runner.choose([_cand(1, "a", 0.5)])[0].pipeline == DEFAULT_PIPELINE


def test_tpe_constraint_is_the_distance_past_the_budget():
    assert over_budget(0.004, 0.01) == pytest.approx(-0.006)
    assert over_budget(0.5, 0.01) == pytest.approx(0.49)
    assert 1e6 < over_budget(float("inf"), 0.01) < float("inf")  # NaN outputs: finite for TPE


def test_follow_ups_are_queued_when_the_first_seeds_are_done():
    optuna = pytest.importorskip("optuna")
    from winnow.driver.space import Space, base_plan, seed_plans

    space = Space(drop_levels={"block": 2}, width=(), fuse=False,
                  quant_modes=("int8-dynamic", "fp16"))
    runner = TrialRunner.__new__(TrialRunner)
    runner.options, runner.space = SearchOptions(trials=20), space
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=TrialRunner.sampler_for(runner.options))
    first, rest = seed_plans(space)
    runner.enqueue(study, first, phase=0)
    # A fake judge: int8 per tensor and one dropped block each hold the budget alone.
    costs = {("int8-dynamic", 0): 0.6, ("none", 1): 0.8, ("int8-dynamic", 1): 0.48}

    def objective(trial):
        mode = trial.suggest_categorical("quantize.mode", ("none", "int8-dynamic", "fp16"))
        if mode == "int8-dynamic":
            trial.suggest_categorical("quantize.per_channel", (True, False))
        trial.suggest_categorical("drop.level", ("block",))
        count = trial.suggest_int("drop.count", 0, 2)
        if count:
            trial.suggest_categorical("drop.replacement", space.replacements)
        cost = costs.get((mode, count), 1.0 if mode != "fp16" else 0.9)
        drop = 0.02 if count == 2 else 0.0
        trial.set_user_attr("cost", cost)
        trial.set_user_attr("drop", drop)
        return cost, drop

    study.optimize(objective, n_trials=len(first),
                   callbacks=[lambda s, t: runner.next_phase(s)])
    queued = _waiting(study)
    merged = dict(base_plan(space), **{"quantize.mode": "int8-dynamic",
                                       "quantize.per_channel": True, "drop.count": 1,
                                       "drop.replacement": space.replacements[-1]})
    assert queued[0] == merged  # 0.6 x 0.8, the cheapest follow-up
    # the per-tensor flavour held at the same cost: of plans making the same moves, one merges
    assert dict(queued[0], **{"quantize.per_channel": False}) not in queued
    study.optimize(objective, n_trials=len(queued),
                   callbacks=[lambda s, t: runner.next_phase(s)])
    later = _waiting(study)
    assert later == [p for p in rest]  # then the other seeds, fp16 among them


def _waiting(study):
    import optuna

    return [t.system_attrs["fixed_params"]
            for t in study.get_trials(states=(optuna.trial.TrialState.WAITING,))]


def test_the_summary_prints_finalists_rejected_on_held_out_data_without_a_timing():
    from winnow.cli import _search_lines

    timed = Candidate(1, "int8", 0.5, 0.001, 0.999, "a", heldout_drop=0.002, measured_cost=0.6)
    rejected = Candidate(2, "drop", 0.4, 0.002, 0.99, "b", heldout_drop=0.03)
    search = types.SimpleNamespace(trials=2, seconds=1.0, cache_hits=0, study="sqlite:///s.db",
                                   judged_on={"trials": "t", "finalists": "f"},
                                   front=[rejected, timed], message="chose trial 1")
    lines = _search_lines(search)
    assert any(line.endswith("drop  held-out drop 0.0300") for line in lines)
    assert any(line.endswith("held-out drop 0.0020, measured x0.600") for line in lines)


def test_a_trial_timed_because_it_was_unpriced_gets_its_own_timing_slot():
    # tiny-gpt: int8 predicted x0.61 (measured 0.90); norm fusion + int8 could not be priced, so
    # its trial was timed at x0.83, behind every prediction, yet it is the faster one.
    from winnow.driver.search import _finalists

    runner = _runner({"int8": 0.90, "int8-pt": 0.91, "fused": 0.80},
                     {"int8": 0.0, "int8-pt": 0.0, "fused": 0.0})
    runner.options = SearchOptions(finalists=2)
    cands = [_cand(1, "int8", 0.61), _cand(2, "int8-pt", 0.612),
             dataclasses.replace(_cand(3, "fused", 0.83), priced=False)]
    ranked = _finalists(cands, runner.options)
    assert [c.pipeline for c in ranked] == ["int8", "fused", "int8-pt"]  # the kinds alternate
    chosen, _ = runner.choose(ranked)
    assert chosen.pipeline == "fused" and chosen.measured_cost == pytest.approx(0.80)
    assert [c.measured_cost for c in ranked] == [0.90, 0.80, 0.91]  # all three were timed


def test_the_leading_finalists_are_re_timed_together_before_the_choice():
    # Timed one after the other, "a" looked cheapest; in the same rounds "b" is, and "c" is no
    # longer faster than the source by the margin.
    runner = _runner({"a": 0.70, "b": 0.72, "c": 0.74}, {"a": 0.0, "b": 0.0, "c": 0.0})
    runner.timer.together = {"a": 0.80, "b": 0.69, "c": 0.99}
    chosen, message = runner.choose([_cand(1, "a", 0.5), _cand(2, "b", 0.6), _cand(3, "c", 0.7)])
    assert chosen.pipeline == "b" and chosen.measured_cost == pytest.approx(0.69)
    assert "x0.690" in message


def test_a_finalist_fast_only_at_b8_loses_to_one_fast_at_both_batch_sizes():
    # tiny-gpt's norm fusion + int8 won at b8 and was far less ahead at b1: the cost is the
    # geometric mean of both ratios, sqrt(1.05 * 0.60) = 0.794 against sqrt(0.80 * 0.75) = 0.775.
    b8_only, balanced = {"b1": 1.05, "b8": 0.60}, {"b1": 0.80, "b8": 0.75}
    runner = _runner({"b8-only": b8_only, "balanced": balanced},
                     {"b8-only": 0.0, "balanced": 0.0})
    ranked = [_cand(1, "b8-only", 0.5), _cand(2, "balanced", 0.6)]
    chosen, message = runner.choose(ranked)
    assert chosen.pipeline == "balanced"
    assert chosen.measured_cost == pytest.approx((0.80 * 0.75) ** 0.5)
    assert ranked[0].measured_cost == pytest.approx((1.05 * 0.60) ** 0.5)
    assert chosen.measured_ratios == balanced and ranked[0].measured_ratios == b8_only
    assert "b1 x0.800, b8 x0.750" in message


def test_the_head_to_head_decides_on_both_batch_sizes():
    # Apart, "a" is ahead; in the same rounds "a" loses its lead at b1 and "b" wins.
    runner = _runner({"a": {"b1": 0.70, "b8": 0.70}, "b": {"b1": 0.72, "b8": 0.72}},
                     {"a": 0.0, "b": 0.0})
    runner.timer.together = {"a": {"b1": 0.95, "b8": 0.60}, "b": {"b1": 0.74, "b8": 0.74}}
    chosen, _ = runner.choose([_cand(1, "a", 0.5), _cand(2, "b", 0.6)])
    assert chosen.pipeline == "b" and chosen.measured_ratios == {"b1": 0.74, "b8": 0.74}


def test_the_summary_prints_the_ratio_at_each_batch_size():
    from winnow.cli import _search_lines

    timed = Candidate(1, "int8", 0.5, 0.001, 0.999, "a", heldout_drop=0.002,
                      measured_cost=(0.81 * 0.68) ** 0.5, measured_ratios={"b1": 0.81, "b8": 0.68})
    search = types.SimpleNamespace(trials=1, seconds=1.0, cache_hits=0, study="sqlite:///s.db",
                                   judged_on={"trials": "t", "finalists": "f"},
                                   front=[timed], message="chose trial 1")
    line = next(line for line in _search_lines(search) if "int8" in line)
    assert line.endswith("measured x0.742 (geometric mean of b1 x0.810, b8 x0.680)")


def test_a_finalist_whose_trial_took_longer_than_the_time_left_is_not_judged_once_one_won():
    # The judge and the timer do not know "b" (a distilled finalist: its trial trained for
    # 1000 s and judging it would train again): judging it raises KeyError.
    runner = _runner({"slow": 1.01, "a": 0.7, "c": 0.8}, {"slow": 0.0, "a": 0.0, "c": 0.0})
    ranked = [_cand(1, "slow", 0.4), _cand(2, "a", 0.5),
              dataclasses.replace(_cand(3, "b", 0.6), seconds=1000.0), _cand(4, "c", 0.7)]
    chosen, message = runner.choose(ranked, budget_end=time.time() + 100.0)
    assert chosen.pipeline == "a" and ranked[3].measured_cost == pytest.approx(0.8)
    assert ranked[2].heldout_drop is None and "1 more finalist(s) left unjudged" in message
    with pytest.raises(KeyError):
        runner.choose(ranked)  # with time enough "b" is judged
    runner = _runner({"slow": 1.01, "a": 0.7}, {"slow": 0.0, "a": 0.0})
    late = [_cand(1, "slow", 0.4), dataclasses.replace(_cand(2, "a", 0.5), seconds=1000.0)]
    assert runner.choose(late, budget_end=time.time())[0].pipeline == "a"  # none had won yet

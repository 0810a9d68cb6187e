"""`winnow compile --target`: search pass combinations with Optuna, keep a Pareto front of
(cost, fidelity drop), measure the finalists on held-out data, emit the cheapest within budget,
and fall back to the lossless pipeline when nothing lossy fits (never "no model found")."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from winnow import progress
from winnow.driver.fhash import functional_hash
from winnow.driver.source import (Source, fidelity_drop, max_drop_text, parse_max_drop,
                                  resolve)
from winnow.driver.space import (
    Space,
    build_space,
    follow_up_plans,
    pipeline_text,
    seed_plans,
    suggest,
)
from winnow.driver.study import (
    ANALYSES_ATTR,
    JOB_ATTR,
    default_url,
    open_study,
    run_trials,
    sqlite_path,
)
from winnow.driver.timing import CandidateTimer, combined_ratio
from winnow.errors import WinnowError, require_extra
from winnow.ir.execute import model_bytes
from winnow.passes.instruments import RecordInstrument
from winnow.passes.manager import (
    DEFAULT_PIPELINE,
    PassContext,
    PassManager,
    build_pipeline,
    finished,
)

PHASE_ATTR = "winnow.seed_phase"  # study attribute: 0 first seeds queued, 1 follow-ups, 2 the rest

TARGETS = ("host",)
OBJECTIVES = ("latency", "size")
# How a trial's latency is judged: the cost model's prediction (fast, and blind to a busy host),
# or timed against the source; the finalists are always timed.
TRIAL_COSTS = ("predicted", "measured")
NOISE_MARGIN = 0.03  # a finalist must be at least this much cheaper than the source to win
# --time-budget is the whole compile's (counted from the call, loading and analyses included).
# Trials stop when what must follow would no longer fit, each part priced from this process's
# trials (`TrialClock`): the trial about to start (the longest of its kind: one that trains runs a
# minute on MiniLM), the finalists' check (FINISH_TRIALS trials' judging each, one more for the
# head-to-head), the emit (one pipeline run and one scoring, as the longest trial's judging) and a
# SAFETY_SHARE of the budget. Before any trial has run, they stop at TRIAL_SHARE of the budget.
FINISH_TRIALS = 1.5
TRIAL_SHARE = 0.75
SAFETY_SHARE = 0.03  # the CLI's start, the manifest and report, the process's exit, a busy host


HEAD_TO_HEAD = 3  # the cheapest measured finalists re-timed together before the choice


class SearchOptionError(WinnowError, ValueError):
    """A search option is out of range or names something unknown."""


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """Settings of one search: target, objective, fidelity budget, trial and time budgets."""

    target: str = "host"
    objective: str = "latency"
    max_drop: float | str = 0.01  # 'N%': a drop of N percent of the source's task metric
    time_budget: float = 600.0
    trials: int = 48  # small models get to grow their distilled moves; big ones hit time_budget
    study: str | None = None
    finalists: int = 3
    repeats: int = 8
    timing_batches: tuple[int, ...] = (1, 8)  # a fixed-batch model is timed at its own batch
    seed: int = 0
    trial_cost: str = "predicted"
    relative_drop: bool = False  # set from a max_drop given as 'N%'

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise SearchOptionError(f"unknown target '{self.target}'; valid targets are: "
                                    f"{', '.join(TARGETS)}.")
        if self.objective not in OBJECTIVES:
            raise SearchOptionError(f"unknown objective '{self.objective}'; valid objectives are: "
                                    f"{', '.join(OBJECTIVES)} (energy needs the cost model).")
        if self.trial_cost not in TRIAL_COSTS:
            raise SearchOptionError(f"unknown trial cost '{self.trial_cost}'; use one of: "
                                    f"{', '.join(TRIAL_COSTS)}.")
        if isinstance(self.max_drop, str):
            try:
                drop, relative = parse_max_drop(self.max_drop, allow_one=False)
            except ValueError as exc:
                raise SearchOptionError(str(exc)) from None
            object.__setattr__(self, "max_drop", drop)
            object.__setattr__(self, "relative_drop", relative)
        if not (isinstance(self.max_drop, (int, float)) and 0.0 <= self.max_drop < 1.0):
            raise SearchOptionError(f"--max-drop must be in [0, 1) or a percentage such as 5%, "
                                    f"not {self.max_drop}.")
        if not (self.time_budget > 0 and math.isfinite(self.time_budget)):
            raise SearchOptionError(f"--time-budget must be positive, not {self.time_budget}.")
        for name in ("trials", "finalists", "repeats"):
            if getattr(self, name) < 1:
                raise SearchOptionError(f"--{name.replace('_', '-')} must be at least 1, "
                                        f"not {getattr(self, name)}.")
        object.__setattr__(self, "timing_batches", tuple(self.timing_batches))  # JSON: a list
        if not self.timing_batches or min(self.timing_batches) < 1:
            raise SearchOptionError(f"timing batches must be one or more sizes of at least 1, "
                                    f"not {self.timing_batches}.")

    @property
    def budget_text(self) -> str:
        """--max-drop as people write it: '0.01', or '5%' for a relative budget."""
        return max_drop_text(self.max_drop, self.relative_drop)


@dataclasses.dataclass
class Candidate:
    """One evaluated point: its pipeline, cost relative to the source, and fidelity drop."""

    number: int
    pipeline: str
    cost: float
    drop: float
    cosine: float
    hash: str
    cached: bool = False
    heldout_drop: float | None = None
    heldout_cosine: float | None = None
    measured_cost: float | None = None  # geometric mean of measured_ratios
    measured_ratios: dict[str, float] | None = None  # latency vs the source by batch: b1, b8
    priced: bool = True  # False: the cost model could not price it, so its trial was timed
    seconds: float = 0.0  # how long its trial took (judging it as a finalist takes about as long)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (infinite drops as None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class SearchResult:
    """What the search chose and why, with the compile result of the emitted artifact."""

    compile: Any
    chosen: Candidate
    front: list[Candidate]
    trials: int
    cache_hits: int
    study: str
    message: str
    judged_on: dict[str, str]
    seconds: float
    measures: dict[str, Any] = dataclasses.field(default_factory=dict)  # sizes, predictions

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the CLI's --json, the manifest's `search` entry)."""
        return {"chosen": self.chosen.to_dict(), "front": [c.to_dict() for c in self.front],
                "trials": self.trials, "cache_hits": self.cache_hits,
                "cache_hit_rate": self.cache_hits / self.trials if self.trials else 0.0,
                "study": self.study, "message": self.message, "judged_on": self.judged_on,
                "seconds": self.seconds, **self.measures}


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '10m' or '1h'; a SearchOptionError otherwise."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    text = str(text).strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise SearchOptionError(f"--time-budget '{text}' is not a duration; write e.g. 90s, 10m "
                                "or 1h.") from None


def search_compile(source: Any, out: str | Path, options: SearchOptions | None = None, *,
                   overwrite: bool = False, calibration: Any = None,
                   user_inputs: Any = None, started_at: float | None = None) -> SearchResult:
    """Search pass combinations for `source`, then compile the chosen one into `out`;
    `user_inputs` (--input-shapes / --example-inputs) are the data the search fits and judges on
    and the final compile's check inputs. The time budget counts from `started_at` (time.time()
    when the compile was asked for, e.g. by the CLI), else from this call."""
    started_at = started_at or time.time()
    from winnow.backends.manifest import check_output
    from winnow.driver.compile import compile_model

    require_extra("winnow compile --target (the search)", "search", ("optuna",))
    options = options or SearchOptions()
    budget_end = started_at + options.time_budget
    check_output(Path(out), overwrite)
    with progress.step("loading the model and its data"):
        src = resolve(source, calibration, user_inputs)
        base_records = RecordInstrument()
        base = lossless_base(src, [base_records])
    runner = TrialRunner(src, base, options)
    url = options.study or default_url(out)
    db = sqlite_path(url)  # trained trials are kept beside the study's file
    folder = db.parent if db is not None and db.parent.is_dir() else None
    with TrainedModels(options, base_records.records, folder) as trained:
        runner.trained = trained
        candidates, hits = runner.run_study(url, _job(source, calibration, options, user_inputs),
                                            budget_end)
        finalists = _finalists(candidates, options)
        finals_start = time.perf_counter()
        chosen, message = runner.choose(finalists, budget_end - runner.clock.margin)
        emit_start = time.perf_counter()
        finals_seconds = emit_start - finals_start
        data = {} if src.zoo is not None else {"calibration": src.fit, "judge_data": src.heldout}
        # the chosen pipeline with the finishing passes (trim-padding) no trial needs to run:
        # before its quantization, or after a kept trained model that is already quantized
        rewritten = trained.rewritten(chosen.pipeline)
        result = compile_model(src, out, pipeline=finished(chosen.pipeline, rewritten is not None),
                               overwrite=overwrite, max_drop=options.budget_text,
                               user_inputs=user_inputs, rewritten=rewritten, **data)
    search = SearchResult(result, chosen, pareto_front(candidates), len(candidates), hits, url,
                          message, src.judged_on, time.time() - started_at)
    search.measures = _measures(Path(out), runner, options)
    search.measures["finalists"] = [c.to_dict() for c in finalists]
    search.measures["timing"] = {"finalists_seconds": finals_seconds,
                                 "timed_seconds_by_batch": dict(runner.timer.seconds),
                                 "emit_seconds": time.perf_counter() - emit_start,
                                 "estimated": runner.clock.estimates()}
    _record(Path(out), search, url)
    _write_analyses(Path(out), runner)
    _write_report(Path(out), src.name, search, candidates, runner.analyses[0], options)
    return search


def _measures(out: Path, runner: TrialRunner, options: SearchOptions) -> dict[str, Any]:
    """The chosen artifact's size beside the source's, and both as the cost model prices them on
    the search's target at the timing shapes."""
    from winnow.driver.report import predicted_costs

    chosen = ir.load(out / "model.onnx")
    extra: dict[str, Any] = {"size": {"source_bytes": len(runner.base_bytes),
                                      "chosen_bytes": (out / "model.onnx").stat().st_size}}
    try:
        extra["predicted"] = predicted_costs({"source": _clone(runner.base_bytes),
                                              "chosen": chosen},
                                             runner.timer.feeds, options.target)
    except WinnowError as exc:  # the artifact stands; the page says why there is no prediction
        extra["predicted"] = {"note": f"the cost model cannot price it: {exc}"}
    return extra


def _write_report(out: Path, source: str, search: SearchResult, candidates: list[Candidate],
                  analyses: dict[str, Any], options: SearchOptions) -> None:
    """OUT/report.html (with matplotlib; without the report extra the manifest says so)."""
    from winnow.backends.manifest import jsonable

    try:
        from winnow.driver.report import render_search

        page, _ = render_search(source, search.to_dict(), search.compile.to_dict()
                                | {"nodes_before": search.compile.nodes_before,
                                   "nodes_after": search.compile.nodes_after},
                                [c.to_dict() for c in candidates], jsonable(analyses),
                                options.max_drop)
    except ImportError:
        return
    (out / "report.html").write_text(page, encoding="utf-8")


def worker_id() -> str:
    """host:pid of this process, recorded on every trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _job(source: Any, calibration: Any, options: SearchOptions,
         user_inputs: Any = None) -> dict[str, Any]:
    """What a worker needs to rebuild this search on its own machine: the source and calibration
    as text (a path made absolute, a zoo name), and the search options."""
    def text(item: Any) -> str | None:
        if item is None or not isinstance(item, (str, Path)):
            return None
        return str(Path(item).resolve()) if Path(item).exists() else str(item)

    return {"source": text(source), "source_is_text": isinstance(source, (str, Path)),
            "calibration": text(calibration),
            # Workers cannot rebuild given inputs: such a search is the compile's alone.
            "calibration_is_text": user_inputs is None and (
                calibration is None or isinstance(calibration, (str, Path))),
            "options": dataclasses.asdict(options)}


def lossless_base(src: Source, instruments: Any = ()) -> ir.Model:
    """The source after the lossless default pipeline: what every trial starts from."""
    model = _clone(model_bytes(src.model))
    return PassManager(DEFAULT_PIPELINE, instruments).run(model, PassContext()).model


def lossy_part(pipeline: str) -> str:
    """What a candidate's pipeline runs after the lossless default pipeline."""
    return pipeline[len(DEFAULT_PIPELINE):].lstrip(",")


def trains(pipeline: str) -> bool:
    """Whether a pass of `pipeline` trains weights (`Pass.trains`, as distill does)."""
    lossy = lossy_part(pipeline)
    return bool(lossy) and any(getattr(p, "trains", False) for p in build_pipeline(lossy))


class TrainedModels:
    """The models this process's trials made with a pipeline that trains (distill), kept with the
    records of the passes that made them as ONNX files in a temporary folder (MiniLM: ~90 MB
    each), so judging the finalists and the emit use them instead of training again (training
    bounded in seconds does not repeat). Only trials that can still become finalists
    (`_finalists`) are kept. A finalist that a worker in another process trained is trained again
    here (the same pipeline: correct, only slower)."""

    def __init__(self, options: SearchOptions, base_records: list[dict[str, Any]],
                 folder: Path | None = None) -> None:
        self.options, self.base_records = options, list(base_records)
        self.folder = tempfile.TemporaryDirectory(prefix="winnow-trained-", dir=folder)
        # pipeline -> (model file, records of the lossy passes, seconds to judge it)
        self.kept: dict[str, tuple[Path, list[dict[str, Any]], float]] = {}
        self.files = itertools.count()

    def __enter__(self) -> TrainedModels:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.folder.cleanup()

    def keep(self, pipeline: str, data: bytes, records: list[dict[str, Any]],
             judge_seconds: float) -> None:
        """Keep the serialized model `data` that `pipeline` made, with its passes' records."""
        path = Path(self.folder.name) / f"{next(self.files)}.onnx"
        path.write_bytes(data)
        self.kept[pipeline] = (path, list(records), judge_seconds)

    def keep_finalists(self, cands: Any) -> set[str]:
        """Drop the kept models that can no longer become finalists among `cands`; returns the
        pipelines that still can."""
        wanted = {c.pipeline for c in _finalists(list(cands), self.options)}
        for pipeline in [p for p in self.kept if p not in wanted]:
            self.kept.pop(pipeline)[0].unlink(missing_ok=True)
        return wanted

    def model(self, pipeline: str) -> ir.Model | None:
        """A fresh copy of the kept model `pipeline` made, or None."""
        if pipeline not in self.kept:
            return None
        return _clone(self.kept[pipeline][0].read_bytes())

    def judge_seconds(self, pipeline: str) -> float | None:
        """How long judging the kept model of `pipeline` takes (its trial less the training)."""
        return self.kept[pipeline][2] if pipeline in self.kept else None

    def rewritten(self, pipeline: str) -> Any:
        """The kept model of `pipeline` with the records of every pass of it, for the emit
        (`compile_model(rewritten=...)`), or None."""
        from winnow.driver.compile import Rewritten

        model = self.model(pipeline)
        if model is None:
            return None
        lossy = self.kept[pipeline][1]
        shift = len(self.base_records)
        return Rewritten(model, self.base_records + [dict(r, index=r["index"] + shift)
                                                     for r in lossy])


@dataclasses.dataclass(frozen=True)
class TrialTime:
    """How long one trial of this process took, and how much of it ran the passes."""

    seconds: float
    applied: float  # running the pipeline (distill's training included)
    trains: bool  # a pass of it trains: its model is kept, so judging it again skips the passes
    judged: bool = True  # False: it failed, or its model was an earlier trial's (not scored)

    @property
    def judging(self) -> float:
        """About how long judging its model as a finalist takes (before the timing)."""
        return self.seconds - self.applied if self.trains else self.seconds


class TrialClock:
    """This process's trial times and what they price: the trial about to start, the finalists'
    check and the emit, so that trials stop in time for the compile to end within its budget."""

    def __init__(self, options: SearchOptions) -> None:
        self.options = options
        self.times: list[TrialTime] = []

    def record(self, seconds: float, applied: float, trains: bool, judged: bool = True) -> None:
        """Note a trial this process ran its passes for (one answered from the cache by its
        pipeline's text cost nothing and is not noted)."""
        self.times.append(TrialTime(seconds, applied, trains, judged))

    def _judged(self) -> list[TrialTime]:
        """The trials that were scored (all of them while none was)."""
        return [t for t in self.times if t.judged] or self.times

    @property
    def margin(self) -> float:
        """Seconds of the budget kept free for what is not priced (SAFETY_SHARE of it)."""
        return SAFETY_SHARE * self.options.time_budget

    def judging_seconds(self) -> float:
        """The finalists' check: FINISH_TRIALS trials' judging per finalist, and as much again
        for the head-to-head."""
        mean = float(np.mean([t.judging for t in self._judged()]))
        return (self.options.finalists + 1) * FINISH_TRIALS * mean

    def emit_seconds(self) -> float:
        """The emit runs the chosen pipeline once (unless its trained model was kept), scores it
        once on held-out data and writes it: as long as the longest trial's judging."""
        return max(t.judging for t in self._judged())

    def finish_by(self, budget_end: float) -> float:
        """When judging finalists must end (time.time()) so the emit fits before `budget_end`."""
        if not self.times:
            return budget_end - self.margin
        return budget_end - self.margin - self.emit_seconds()

    def deadline(self, budget_end: float, first_guess: float, next_trains: bool) -> float:
        """When the next trial (one that trains or not) may start no more: it must end before
        the finalists' check, and the emit after it, would no longer fit before `budget_end`.
        Before any trial has run, and for the first trial of a kind, `first_guess` at the
        latest."""
        if not self.times:
            return first_guess
        kind = [t.seconds for t in self.times if t.trains == next_trains]
        trial = max(kind or [t.seconds for t in self.times])
        deadline = self.finish_by(budget_end) - self.judging_seconds() - trial
        return deadline if kind else min(first_guess, deadline)

    def estimates(self) -> dict[str, float]:
        """The priced parts in seconds (the manifest's record, beside the measured ones)."""
        if not self.times:
            return {"margin_seconds": self.margin}
        return {"finalists_seconds": self.judging_seconds(), "emit_seconds": self.emit_seconds(),
                "margin_seconds": self.margin,
                "longest_trial_seconds": max(t.seconds for t in self.times)}


def _clone(data: bytes) -> ir.Model:
    return ir.serde.deserialize_model(onnx.load_from_string(data))


class TrialRunner:
    """Evaluates candidates for one source: applies pipelines, hashes, scores, times."""

    trained: TrainedModels | None = None  # the compile's keeps trained trials; a worker's does not

    def __init__(self, src: Source, base: ir.Model, options: SearchOptions) -> None:
        self.src, self.options = src, options
        self.base_bytes = model_bytes(base)
        self.space: Space = build_space(base, fitted=not src.in_sample)
        self.analyses: tuple[dict, dict] = ({}, {})  # see share_analyses
        self.timer = CandidateTimer(base, src.fit[0], options.timing_batches, options.repeats)
        self.hash_feeds = src.fit[0]
        self.cache: dict[str, Candidate] = {}
        self.by_pipeline: dict[str, Candidate] = {}  # a plan asked for again is not run again
        self.clock = TrialClock(options)

    def apply(self, pipeline: str, instruments: Any = ()) -> ir.Model:
        """The base model rewritten by the lossy part of `pipeline`."""
        model = _clone(self.base_bytes)
        ctx = PassContext(calibration=self.src.fit, training=self.src.training,
                          options=dict(self.src.options))
        ctx.analyses.update(self.analyses[0])
        ctx.analysis_configs.update(self.analyses[1])
        lossy = lossy_part(pipeline)
        return PassManager(lossy, instruments).run(model, ctx).model if lossy else model

    def evaluate(self, number: int, pipeline: str) -> Candidate:
        """Score one pipeline (cached by its text, then by functional hash); a pipeline that
        trains keeps its model while it can become a finalist (`trained`)."""
        done = self.by_pipeline.get(pipeline)
        if done is not None:  # TPE and the seed tiers may ask twice: a distilled plan is a minute
            return dataclasses.replace(done, number=number, cached=True)
        start = time.perf_counter()
        training = trains(pipeline)
        keep = self.trained is not None and training
        records = RecordInstrument()
        try:
            model = self.apply(pipeline, [records] if keep else ())
        except WinnowError:  # a failed trial took its time too: the deadline must know it
            failed = time.perf_counter() - start
            self.clock.record(failed, failed, training, judged=False)
            raise
        applied = time.perf_counter() - start
        data = model_bytes(model) if keep else None  # as trained, before anything runs it
        key = functional_hash(model, self.hash_feeds)
        if key in self.cache:
            self.clock.record(time.perf_counter() - start, applied, training, judged=False)
            hit = dataclasses.replace(self.cache[key], number=number, pipeline=pipeline,
                                      cached=True)
            self.by_pipeline[pipeline] = hit
            return hit
        fid = self.src.score(model, "judge")
        cost, priced = self.priced_cost(model)
        cand = Candidate(number, pipeline, cost, fidelity_drop(fid, self.options.relative_drop),
                         fid.cosine, key,
                         priced=priced, seconds=time.perf_counter() - start)
        self.cache[key] = self.by_pipeline[pipeline] = cand
        self.clock.record(cand.seconds, applied, training)
        if data is not None and pipeline in self.trained.keep_finalists(self.cache.values()):
            self.trained.keep(pipeline, data, records.records, cand.seconds - applied)
        return cand

    def finalist_model(self, cand: Candidate) -> ir.Model:
        """The model a finalist's pipeline makes: its trial's when kept, else made again (and
        then kept for the emit when the pipeline trains, so the emit writes the model judged)."""
        kept = self.trained.model(cand.pipeline) if self.trained is not None else None
        if kept is not None:
            return kept
        if self.trained is None or not trains(cand.pipeline):
            return self.apply(cand.pipeline)
        records = RecordInstrument()
        model = self.apply(cand.pipeline, [records])
        self.trained.keep(cand.pipeline, model_bytes(model), records.records, 0.0)
        return model

    def judging_seconds(self, cand: Candidate) -> float:
        """About how long judging a finalist takes: its trial's time, less the training when
        its trained model was kept."""
        kept = self.trained.judge_seconds(cand.pipeline) if self.trained is not None else None
        return cand.seconds if kept is None else kept

    def trial_cost(self, model: ir.Model) -> float:
        """A trial's cost relative to the source: size, predicted or measured latency."""
        return self.priced_cost(model)[0]

    def priced_cost(self, model: ir.Model) -> tuple[float, bool]:
        """`trial_cost` and whether it is on the cost model's scale (False: measured latency,
        for a model the cost model cannot price, or with --trial-cost measured). A predicted
        cost is the geometric mean of the predicted ratios at the timing batches, as the
        finalists' measured cost is of the measured ones."""
        if self.options.objective != "latency":
            return len(model_bytes(model)) / len(self.base_bytes), True
        if self.options.trial_cost == "predicted":
            predicted, base = self.predicted_latency(model), self.base_predicted
            if predicted is not None and base is not None:
                ratios = [predicted[label] / base[label] for label in base]
                return float(np.exp(np.mean(np.log(ratios)))), True
        return self.timer.relative_latency(model), self.options.trial_cost == "measured"

    def predicted_latency(self, model: ir.Model) -> dict[str, float] | None:
        """The cost model's latency of `model` at each timing batch's shapes, by batch label
        (None if it cannot price every node: a trial is then timed instead)."""
        from winnow.cost_model import predict
        from winnow.cost_model.targets import known_targets
        from winnow.driver.report import FALLBACK_TARGET

        target = self.options.target
        profile = target if target in known_targets() else FALLBACK_TARGET
        latency = {}
        for label, feeds in self.timer.batch_feeds.items():
            shapes = {name: list(np.shape(value)) for name, value in feeds.items()}
            try:
                report = predict(model, profile, shapes, threads=self.timer.threads)
            except WinnowError:
                return None
            if report.unpriced or not report.latency_s > 0:
                return None
            latency[label] = report.latency_s
        return latency

    @functools.cached_property
    def base_predicted(self) -> dict[str, float] | None:
        """The source's predicted latency by timing batch (what predicted trial costs are
        relative to)."""
        return self.predicted_latency(_clone(self.base_bytes))

    def share_analyses(self, study: Any) -> None:
        """The analyses every trial reads: taken from the study when a process of this search
        already stored them (a resumed compile, a worker), else computed now on the base model
        and stored there (the study travels into OUT as search.db; OUT/analysis.json too)."""
        stored = study.user_attrs.get(ANALYSES_ATTR)
        if stored is None:
            base = _clone(self.base_bytes)
            stored = stored_analyses(*_shared_analyses(self.src, base, self.space))
            study.set_user_attr(ANALYSES_ATTR, stored)
        self.analyses = restored_analyses(stored)

    def sampler(self) -> Any:
        """The study's sampler (TPE, seeded; the first trials are the enqueued seed plans)."""
        return self.sampler_for(self.options)

    @staticmethod
    def sampler_for(options: SearchOptions) -> Any:
        """The TPE sampler of a search with `options`."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.samplers.TPESampler(seed=options.seed, n_startup_trials=6,
                                          multivariate=False)

    def run_study(self, url: str, job: dict[str, Any], budget_end: float
                  ) -> tuple[list[Candidate], int]:
        """Run (or resume) the study until the trial or time budget is spent; workers that join
        the study at `url` share the trials."""
        study = open_study(url, self.fingerprint(), ["minimize", "minimize"], self.sampler())
        first_guess = budget_end - (1.0 - TRIAL_SHARE) * self.options.time_budget
        study.set_user_attr(JOB_ATTR, dict(job, deadline=first_guess))
        self.share_analyses(study)
        with progress.step("the source's outputs on the judging data"):
            self.src.references("judge")  # before the trials: their times guide the deadline
        done = _completed(study)
        if not study.get_trials(deepcopy=False):
            self.enqueue(study, seed_plans(self.space)[0], phase=0)
        self.run_trials(study, lambda: self.clock.deadline(budget_end, first_guess,
                                                           self.next_trains(study)),
                        initial=len(done))
        cands = _completed(study)
        return cands, sum(c.cached for c in cands)

    def enqueue(self, study: Any, plans: list[dict[str, Any]], phase: int) -> int:
        """Queue `plans` as the study's next trials (within the trial budget) and record that
        the study reached `phase` (shared with the workers through the study); returns how
        many were queued."""
        room = max(0, self.options.trials - len(study.get_trials(deepcopy=False)))
        for plan in plans[:room]:
            study.enqueue_trial(plan, skip_if_exists=True)
        study.set_user_attr(PHASE_ATTR, phase)
        return min(room, len(plans))

    def next_phase(self, study: Any) -> None:
        """When the queued plans are all taken: after the first seeds, queue the follow-ups
        they suggest (the best plan with each numerics move, then pairs of moves that held the
        budget and stronger steps: `follow_up_plans`);
        after those, the other seeds; from then on the follow-ups of all results so far, and
        TPE samples when there are none."""
        import optuna

        phase = study.user_attrs.get(PHASE_ATTR)
        if phase is None or study.get_trials(deepcopy=False,
                                             states=(optuna.trial.TrialState.WAITING,)):
            return
        if phase == 1:
            self.enqueue(study, seed_plans(self.space)[1], 2)
            return
        plans = follow_up_plans(self.space, _results(study), self.options.max_drop,
                                tried=_tried(study))
        if not self.enqueue(study, plans, 1 if phase == 0 else 2) and phase == 0:
            self.enqueue(study, seed_plans(self.space)[1], 2)

    def next_trains(self, study: Any) -> bool:
        """Whether the study's next trial may train: the next queued plan says; one that TPE
        draws may whenever the space distills."""
        import optuna

        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if waiting:
            return bool(waiting[0].system_attrs.get("fixed_params", {}).get("distill"))
        return self.space.distill

    def run_trials(self, study: Any, deadline: Any, initial: int = 0) -> int:
        """This process's share of the study's trials, with a progress bar over the budget."""
        bar = progress.counter("search", total=self.options.trials, initial=initial)
        worker = worker_id()

        def objective(trial: Any) -> tuple[float, float]:
            for done in _completed(study):  # a resumed study's and other workers' trials
                self.cache.setdefault(done.hash, done)
                self.by_pipeline.setdefault(done.pipeline, done)
            choices = suggest(trial, self.space)
            cand = self.evaluate(trial.number, pipeline_text(choices))
            for key, value in cand.to_dict().items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("worker", worker)
            # Past --max-drop is infeasible: TPE models the plans that held the budget instead
            # of chasing the cheap, ruined end of the front (3 dropped blocks + half the heads:
            # +6 perplexity on tiny-gpt).
            if hasattr(trial, "set_constraint"):  # optuna >= 5
                trial.set_constraint("drop", over_budget(cand.drop, self.options.max_drop))
            return cand.cost, min(cand.drop, 1e9)

        def update(study: Any, trial: Any) -> None:
            if trial.user_attrs.get("over_budget"):
                return
            self.next_phase(study)
            bar.update(1)
            bar.set_postfix_str(_best_text(_completed(study), self.options.max_drop))

        ran = run_trials(study, objective, self.options.trials, deadline, update,
                         catch=(WinnowError,))
        bar.close()
        return ran

    def fingerprint(self) -> str:
        """Ties a study to this model, objective, target and budget."""
        import hashlib

        digest = hashlib.sha256(self.base_bytes)
        digest.update(repr(("costs at every timing batch", self.options.objective,
                            self.options.target, self.options.max_drop,
                            self.options.relative_drop, self.space.describe(),
                            self.options.trial_cost, self.options.timing_batches)).encode())
        return digest.hexdigest()[:16]

    def choose(self, ranked: list[Candidate], budget_end: float = math.inf
               ) -> tuple[Candidate, str]:
        """Judge the candidates, cheapest first, on held-out data and time those that hold the
        budget there (up to `finalists` of them per cost scale, predicted or measured: one that
        misses the budget costs no timing slot); the cheapest measured at least NOISE_MARGIN
        below the source wins, else the lossless pipeline with the reason. The measured time
        decides: a candidate predicted cheap but measured no faster than the source never wins.
        Once one has won, a finalist is not judged when judging it and then the emit would not
        end before `budget_end` (time.time()): each priced at its trial's time (the emit runs
        the chosen pipeline again: the slowest of it and the winners so far), less the
        training when its trained model was kept (a worker's trial trains again, a minute or
        more)."""
        winners, timed, judged, models, late = [], [], 0, {}, 0
        for cand in progress.bar(ranked, "finalists"):
            # predicted and measured trial costs are on two scales: each kind has its own slots
            if sum(c.priced == cand.priced for c in timed) >= self.options.finalists:
                continue
            emit = max(self.judging_seconds(c) for c in (*winners, cand))
            if winners and time.time() + self.judging_seconds(cand) + emit > budget_end:
                late += 1
                continue
            judged += 1
            model = self.finalist_model(cand)
            fid = self.src.score(model, "heldout")
            cand.heldout_drop = fidelity_drop(fid, self.options.relative_drop)
            cand.heldout_cosine = fid.cosine
            if cand.heldout_drop > self.options.max_drop:
                continue
            models[cand.number] = model
            if self.options.objective == "latency":
                measured(cand, self.timer.latency_ratios(model, repeats=3 * self.options.repeats))
            else:
                cand.measured_cost = cand.cost
            timed.append(cand)
            if cand.measured_cost < 1.0 - NOISE_MARGIN:
                winners.append(cand)
        if len(winners) > 1 and self.options.objective == "latency":
            leaders = sorted(winners, key=lambda c: c.measured_cost)[:HEAD_TO_HEAD]
            self.head_to_head([(c, models[c.number]) for c in leaders])
            winners = [c for c in winners if c.measured_cost < 1.0 - NOISE_MARGIN]
        if winners:
            best = min(winners, key=lambda c: c.measured_cost)
            unjudged = (f"; {late} more finalist(s) left unjudged: judging them would not fit "
                        "in the time budget" if late else "")
            return best, (f"chose trial {best.number}: {self.options.objective} x"
                          f"{best.measured_cost:.3f} of the source{by_batch_text(best)}, "
                          f"held-out drop {best.heldout_drop:.4f} <= {self.options.budget_text}"
                          f"{unjudged}")
        lossless = Candidate(-1, DEFAULT_PIPELINE, 1.0, 0.0, 1.0, "")
        why = ("no lossy candidate was measured" if not ranked else
               f"of the {judged} finalists judged on held-out data, {len(timed)} met --max-drop "
               f"{self.options.budget_text} there and none was measured at least "
               f"{NOISE_MARGIN:.0%} cheaper than the source")
        return lossless, f"kept the lossless pipeline: {why}"


    def head_to_head(self, leaders: list[tuple[Candidate, ir.Model]]) -> None:
        """Re-time the cheapest winners against each other in the same interleaved rounds (twice
        the finalists' rounds, at every timing batch); each one's measured cost becomes that
        run's: finalists a few percent apart are not separated reliably by timings taken one
        after the other."""
        models = {str(c.number): model for c, model in leaders}
        ratios = self.timer.latency_ratios_together(models, repeats=6 * self.options.repeats)
        for cand, _ in leaders:
            measured(cand, ratios[str(cand.number)])


def measured(cand: Candidate, ratios: dict[str, float]) -> None:
    """Record a candidate's measured latency ratios by batch and their combined cost."""
    cand.measured_ratios = dict(ratios)
    cand.measured_cost = combined_ratio(ratios)


def by_batch_text(cand: Candidate) -> str:
    """' (geometric mean of b1 x0.810, b8 x0.680)' for a candidate timed at more than one
    batch, else ''."""
    ratios = cand.measured_ratios or {}
    if len(ratios) < 2:
        return ""
    return " (geometric mean of " + ", ".join(f"{label} x{r:.3f}"
                                              for label, r in ratios.items()) + ")"


def over_budget(drop: float, max_drop: float) -> float:
    """TPE's constraint: how far a judged drop is past `max_drop` (<= 0 is feasible)."""
    return min(drop, 1e9) - max_drop


def _shared_analyses(src: Source, base: ir.Model, space: Space) -> tuple[dict, dict]:
    """Analyses computed once on the base model and seeded into every trial's context."""
    ctx = PassContext(calibration=src.fit, training=src.training, options=dict(src.options))
    wanted = (["layer-similarity"] if space.drop_levels else []) + (
        ["head-importance"] if "prune-heads" in space.width else [])
    model = _clone(model_bytes(base))
    for name in wanted:
        with progress.step(f"{name} on the calibration data"):
            ctx.get_analysis(name, model)
    return dict(ctx.analyses), dict(ctx.analysis_configs)


def stored_analyses(results: dict[str, Any], configs: dict[str, Any]) -> dict[str, Any]:
    """Analysis results and the options they were computed with, as the JSON a study holds."""
    from winnow.backends.manifest import jsonable

    return {"results": jsonable(results),
            "configs": {name: jsonable(dataclasses.asdict(cfg)) for name, cfg in configs.items()}}


def restored_analyses(stored: dict[str, Any]) -> tuple[dict, dict]:
    """The (results, configs) a pass context caches, from `stored_analyses`' JSON."""
    from winnow.passes.base import get_pass_class

    configs = {}
    for name, fields in stored["configs"].items():
        cls = get_pass_class(name).Config
        configs[name] = cls(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in fields.items()})
    return dict(stored["results"]), configs


def _completed(study: Any) -> list[Candidate]:
    import optuna

    out = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        if "pipeline" not in attrs:
            continue
        drop = attrs.get("drop")
        out.append(Candidate(trial.number, attrs["pipeline"], float(attrs["cost"]),
                             float("inf") if drop is None else float(drop),
                             float(attrs.get("cosine") or 0.0), attrs.get("hash", ""),
                             bool(attrs.get("cached")), priced=bool(attrs.get("priced", True)),
                             seconds=float(attrs.get("seconds") or 0.0)))
    return out


def _results(study: Any) -> list[tuple[dict[str, Any], float, float]]:
    """(params, cost, drop) of the study's completed trials."""
    import optuna

    out = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "cost" in trial.user_attrs:
            drop = trial.user_attrs.get("drop")
            out.append((dict(trial.params), float(trial.user_attrs["cost"]),
                        float("inf") if drop is None else float(drop)))
    return out


def _tried(study: Any) -> list[dict[str, Any]]:
    """The plans of every trial of the study, whatever its state (queued ones too)."""
    return [dict(t.params or t.system_attrs.get("fixed_params", {}))
            for t in study.get_trials(deepcopy=False)]


def _best_text(cands: list[Candidate], max_drop: float) -> str:
    ok = [c for c in cands if c.drop <= max_drop]
    if not ok:
        return "no candidate within budget yet"
    best = min(ok, key=lambda c: c.cost)
    return f"best cost x{best.cost:.3f} drop {best.drop:.4f}"


def pareto_front(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other candidate beats on both cost and drop (one per hash), by cost."""
    unique = {c.hash: c for c in sorted(cands, key=lambda c: c.number, reverse=True)}
    pool = list(unique.values())
    front = [c for c in pool if not any(
        o.cost <= c.cost and o.drop <= c.drop and (o.cost < c.cost or o.drop < c.drop)
        for o in pool)]
    return sorted(front, key=lambda c: c.cost)


def _finalists(cands: list[Candidate], options: SearchOptions) -> list[Candidate]:
    """The cheapest distinct candidates within budget on the judging data, cheaper than the
    source, up to twice `finalists` of them with a predicted cost and as many with a measured
    one, the two kinds alternating: judged on held-out data in this order, and the first
    `finalists` of each kind that hold the budget there are timed for real."""
    unique = {c.hash: c for c in sorted(cands, key=lambda c: c.number, reverse=True)}
    ok = [c for c in unique.values() if c.drop <= options.max_drop and c.cost < 1.0
          and c.pipeline != DEFAULT_PIPELINE]
    # A trial the cost model could not price (fused contrib ops) was timed: its cost is on
    # another scale than the predictions, so those compete among themselves for their slots.
    # The two kinds take turns, so a compile that runs out of time has judged the best of both.
    kinds = [sorted((c for c in ok if c.priced == priced), key=lambda c: c.cost)
             [:2 * options.finalists] for priced in (True, False)]
    return [c for pair in itertools.zip_longest(*kinds) for c in pair if c is not None]


def _record(out: Path, search: SearchResult, url: str) -> None:
    """Add the search to the artifact: `search` in manifest.json (with sizes and the cost
    model's predictions) and the study's SQLite file."""
    import json

    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["search"] = search.to_dict()
    manifest_path.write_text(json.dumps(manifest, indent=2, default=_json_default))
    db = sqlite_path(url)
    if db is not None and db.exists():
        shutil.copyfile(db, out / "search.db")


def _write_analyses(out: Path, runner: TrialRunner) -> None:
    """OUT/analysis.json: the analyses the search ranked its moves by, with their options."""
    import json

    if runner.analyses[0]:
        stored = stored_analyses(*runner.analyses)
        data = {"source": runner.src.name, "analyses": stored["results"],
                "options": stored["configs"]}
        (out / "analysis.json").write_text(json.dumps(data, indent=2, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return str(obj)

"""The compile driver: options, Pareto front, functional hashing, data splits, and a search on a
model with a known-redundant block (exact identity), resumed after a kill."""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import winnow
from winnow.driver import SearchOptions, search_compile
from winnow.driver.fhash import functional_hash
from winnow.driver.search import Candidate, SearchOptionError, pareto_front, parse_duration
from winnow.driver.source import split_batches
from winnow.driver.study import StudyError
from winnow.passes.manager import DEFAULT_PIPELINE
from winnow.ir.execute import run
from winnow.ir.regions import find_regions
from winnow.passes.manager import PassManager
from tests.tiny_models import TinyTransformer, zero_block_branches


@pytest.mark.parametrize("kwargs, word", [
    ({"target": "rpi9"}, "target"), ({"objective": "energy"}, "objective"),
    ({"max_drop": -0.1}, "--max-drop"), ({"max_drop": float("nan")}, "--max-drop"),
    ({"max_drop": 1.0}, "--max-drop"), ({"max_drop": "100%"}, "--max-drop"),
    ({"max_drop": "five%"}, "metric such as 5%; got .five%."), ({"trials": 0}, "--trials"),
    ({"time_budget": 0}, "--time-budget")])
def test_bad_search_options_are_clear_errors(kwargs, word):
    with pytest.raises(SearchOptionError, match=word):
        SearchOptions(**kwargs)


def test_a_percentage_budget_is_relative_and_survives_the_trip_to_a_worker():
    import dataclasses

    options = SearchOptions(max_drop="5%")
    assert (options.max_drop, options.relative_drop, options.budget_text) == (0.05, True, "5%")
    again = SearchOptions(**dataclasses.asdict(options))  # what a study's job record holds
    assert (again.max_drop, again.relative_drop) == (0.05, True)
    assert SearchOptions(max_drop="0.05").relative_drop is False


def test_parse_duration():
    assert parse_duration("90") == 90 and parse_duration("90s") == 90
    assert parse_duration("10m") == 600 and parse_duration("1h") == 3600
    with pytest.raises(SearchOptionError, match="duration"):
        parse_duration("ten minutes")


def _cand(n, cost, drop, h=None):
    return Candidate(n, f"p{n}", cost, drop, 1.0 - drop, h or f"h{n}")


def test_pareto_front_matches_hand_computed_front():
    cands = [_cand(0, 1.0, 0.0), _cand(1, 0.5, 0.02), _cand(2, 0.6, 0.03),  # 2 dominated by 1
             _cand(3, 0.3, 0.10), _cand(4, 0.3, 0.20), _cand(5, 0.9, 0.0)]   # 4 by 3; 5 beats 0
    assert [c.number for c in pareto_front(cands)] == [3, 1, 5]


def test_pareto_front_counts_a_hash_once():
    cands = [_cand(0, 0.5, 0.01, "same"), _cand(1, 0.5, 0.01, "same"), _cand(2, 1.0, 0.0)]
    assert len(pareto_front(cands)) == 2


def test_split_batches_are_disjoint_and_cover_everything():
    batches = [{"x": np.full((2, 3), i, np.float32)} for i in range(8)]
    fit, judge, held = split_batches(batches)
    seen = [int(b["x"][0, 0]) for part in (fit, judge, held) for b in part]
    assert sorted(seen) == list(range(8)) and fit and judge and held
    one = split_batches([{"x": np.arange(8, dtype=np.float32)[:, None]}])
    assert sum(b["x"].shape[0] for part in one for b in part) == 8
    assert {float(v) for v in one[2][0]["x"].ravel()}.isdisjoint(
        {float(v) for v in one[0][0]["x"].ravel()})


@pytest.fixture(scope="module")
def redundant_model(tmp_path_factory) -> tuple[Path, TinyTransformer, torch.Tensor]:
    module = TinyTransformer(dim=32, heads=4, layers=3).eval()
    zero_block_branches(module, 1)  # block 1 is an exact identity: dropping it loses nothing
    x = torch.randn(12, 10, 32, generator=torch.Generator().manual_seed(3))
    path = tmp_path_factory.mktemp("driver") / "model.onnx"
    batch = torch.export.Dim("batch")
    onnx.save(ir.to_proto(winnow.load(module, (x,), {"x": {0: batch}})), path)
    return path, module, x


def test_functional_hash_same_function_same_hash(redundant_model):
    path, _, x = redundant_model
    feeds = {"x": x.numpy()}
    a = PassManager("shape-inference,cse,dce").run(winnow.load(str(path))).model
    b = PassManager("dce,cse").run(winnow.load(str(path))).model
    assert functional_hash(a, feeds) == functional_hash(b, feeds)
    c = winnow.load(str(path))
    first = next(v for v in c.graph.initializers.values() if v.const_value.size > 100)
    first.const_value = ir.tensor(first.const_value.numpy() * 1.5)
    assert functional_hash(c, feeds) != functional_hash(a, feeds)


def _calibration(n_batches: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((3, 10, 32)).astype(np.float32)} for _ in range(n_batches)]


@pytest.mark.slow
def test_search_finds_a_cheaper_model_within_budget_and_resumes(redundant_model, tmp_path,
                                                                monkeypatch):
    path, module, _ = redundant_model
    out = tmp_path / "out"
    options = SearchOptions(objective="size", trials=10, max_drop=0.001, time_budget=300)
    result = search_compile(str(path), out, options, calibration=_calibration(12, 1))
    chosen = result.chosen  # a block drop or a smaller number format: both are within budget
    assert chosen.pipeline != DEFAULT_PIPELINE and chosen.hash in {c.hash for c in result.front}
    assert chosen.measured_cost < 0.8
    assert chosen.heldout_drop is not None and chosen.heldout_drop <= 0.001
    assert "not fitted on" in result.judged_on["finalists"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["search"]["chosen"]["pipeline"] == chosen.pipeline
    assert (out / "search.db").exists()
    search = manifest["search"]
    assert search["size"]["chosen_bytes"] < 0.8 * search["size"]["source_bytes"]
    predicted = search["predicted"]
    assert predicted["source"]["latency_ms"] > 0 and predicted["chosen"]["energy_mj"] > 0
    page = (out / "report.html").read_text()
    assert "Pareto front" in page and chosen.pipeline in page
    _check_pareto_plot_renders(out / "report.html", tmp_path)
    # The emitted model against torch, an independent oracle, on inputs nothing was fitted on.
    fresh = torch.randn(6, 10, 32, generator=torch.Generator().manual_seed(9))
    got = next(iter(run(winnow.load(str(out / "model.onnx")), {"x": fresh.numpy()}).values()))
    want = module(fresh).detach().numpy().reshape(6, -1)
    got = got.reshape(6, -1)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert 1.0 - cos.min() <= 0.005
    analyses = json.loads((out / "analysis.json").read_text())
    ranking = analyses["analyses"]["layer-similarity"]["ranking"]["block"]
    blocks = find_regions(winnow.load(str(path))).candidates("block")
    assert sorted(ranking) == sorted(r.name for r in blocks) and len(blocks) >= 2
    # The same study again: nothing left to run, the same choice, and the analyses come from
    # the study rather than being measured again.
    def measured_again(*args, **kwargs):
        raise AssertionError("the resumed search recomputed the analyses stored in its study")

    monkeypatch.setattr("winnow.driver.search._shared_analyses", measured_again)
    again = search_compile(str(path), tmp_path / "out2",
                           SearchOptions(objective="size", trials=10, max_drop=0.001,
                                         study=result.study), calibration=_calibration(12, 1))
    assert again.trials == 10 and again.chosen.pipeline == chosen.pipeline


CHOSEN_STAR_RGB = (255, 127, 14)  # driver/report.py draws the chosen point in this orange


def _check_pareto_plot_renders(page: Path, tmp_path: Path) -> None:
    """Headless Chromium draws the page, the chosen point's star among it (when installed)."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.is_file():
        return
    from PIL import Image

    shot = tmp_path / "search-shot.png"
    subprocess.run([str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    f"--user-data-dir={tmp_path / 'chrome'}", f"--screenshot={shot}",
                    "--window-size=1200,1600", page.resolve().as_uri()],
                   capture_output=True, timeout=180, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
    star = (np.abs(pixels - CHOSEN_STAR_RGB).sum(axis=2) < 30).sum()
    assert star > 50, f"no chosen-point star on the rendered page ({star} px)"


def test_predicted_trial_cost_prices_a_dropped_block_cheaper(redundant_model):
    from winnow.driver.search import TrialRunner, lossless_base
    from winnow.driver.source import resolve

    path, _, _ = redundant_model
    src = resolve(str(path), _calibration(12, 1))
    runner = TrialRunner(src, lossless_base(src), SearchOptions(trial_cost="predicted"))
    base = runner.apply(DEFAULT_PIPELINE)
    dropped = runner.apply(DEFAULT_PIPELINE + ",drop-layers{count=1},dce")
    assert runner.trial_cost(base) == pytest.approx(1.0)
    # One of three blocks gone: at most 1 - 1/3 of the blocks' work is left, and the embedding-
    # free model is nearly all blocks, so the prediction must fall clearly below the source's.
    assert 0.4 < runner.trial_cost(dropped) < 0.9


def test_a_predicted_trial_cost_is_the_geometric_mean_over_the_timing_batches(redundant_model):
    from winnow.cost_model import predict
    from winnow.cost_model.targets import known_targets
    from winnow.driver.report import FALLBACK_TARGET
    from winnow.driver.search import TrialRunner, lossless_base
    from winnow.driver.source import resolve

    path, _, _ = redundant_model
    src = resolve(str(path), _calibration(12, 1))
    runner = TrialRunner(src, lossless_base(src), SearchOptions(trial_cost="predicted"))
    base = runner.apply(DEFAULT_PIPELINE)
    dropped = runner.apply(DEFAULT_PIPELINE + ",drop-layers{count=1},dce")
    profile = "host" if "host" in known_targets() else FALLBACK_TARGET
    ratios = []
    for rows in (1, 8):  # the default timing batches, priced one by one
        shapes = {"x": [rows, 10, 32]}
        ratios.append(predict(dropped, profile, shapes, threads=runner.timer.threads)
                      .latency_s / predict(base, profile, shapes,
                                           threads=runner.timer.threads).latency_s)
    assert ratios[0] != pytest.approx(ratios[1], rel=1e-3)  # b1 and b8 price it differently
    assert runner.trial_cost(dropped) == pytest.approx((ratios[0] * ratios[1]) ** 0.5, rel=1e-6)


def test_in_sample_data_allows_only_moves_that_fit_nothing(redundant_model):
    from winnow.driver.source import resolve
    from winnow.driver.space import build_space

    path, _, _ = redundant_model
    src = resolve(str(path), [{"x": np.zeros((2, 10, 32), np.float32)}])
    assert src.in_sample and "in-sample" in src.judged_on["trials"]
    assert build_space(src.model, fitted=not src.in_sample).replacements == ("identity",)


def test_study_of_another_model_is_refused(redundant_model, tmp_path):
    path, _, _ = redundant_model
    from winnow.driver.study import open_study

    url = f"sqlite:///{tmp_path / 's.db'}"
    import optuna

    open_study(url, "aaaa", ["minimize", "minimize"], optuna.samplers.RandomSampler())
    with pytest.raises(StudyError, match="another model"):
        open_study(url, "bbbb", ["minimize", "minimize"], optuna.samplers.RandomSampler())
    nested = tmp_path / "new" / "folder" / "s.db"
    open_study(f"sqlite:///{nested}", "aaaa", ["minimize"], None)
    assert nested.exists()
    with pytest.raises(StudyError, match="not a database URL"):
        open_study("search.db", "aaaa", ["minimize"], None)


def _complete_trials(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from trials where state='COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_killed_search_leaves_no_artifact_and_resumes(redundant_model, tmp_path):
    path, _, _ = redundant_model
    out, db = tmp_path / "out", tmp_path / "out.search.db"
    cmd = [sys.executable, "-m", "winnow", "--quiet", "compile", str(path), "-o", str(out),
           "--target", "host", "--objective", "size", "--trials", "8", "--max-drop", "0.001"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # a loaded CI host may take minutes for three trials
    while _complete_trials(db) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the search finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _complete_trials(db)
    assert before >= 3 and not out.exists()
    done = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    search = json.loads(done.stdout)["search"]
    assert search["trials"] == 8 and _complete_trials(db) == 8
    assert (out / "manifest.json").exists()


@pytest.mark.slow
def test_minilm_metric_on_the_calibration_split_compares_like_with_like():
    from winnow import models_zoo
    from winnow.measure.fidelity import evaluate_zoo

    zm = models_zoo.get("minilm")
    fid = evaluate_zoo(zm, zm.load_ir(), "calibration")  # the source against its own reference
    assert fid.samples == sum(b["input_ids"].shape[0] for b in zm.calibration())
    assert fid.candidate_metrics["topic_top1"] == pytest.approx(fid.reference_metrics["topic_top1"])


@pytest.mark.parametrize("args, message", [
    (["--target", "rpi"], "unknown target 'rpi'"),
    (["--target", "host", "--max-drop", "1.5"], "--max-drop must be a number in [0, 1)"),
    (["--target", "host", "--max-drop", "5%%"], "percentage of the source's metric"),
    (["--target", "host", "--objective", "joules"], "unknown objective"),
    (["--target", "host", "--trial-cost", "guessed"], "unknown trial cost 'guessed'"),
    (["--target", "host", "--time-budget", "soon"], "is not a duration"),
    (["--target", "host", "--pipeline", "dce"], "--target searches the pipeline itself")])
def test_search_cli_errors_are_one_sentence_and_write_nothing(tiny_model_path, tmp_path, args,
                                                              message):
    from click.testing import CliRunner

    from winnow.cli import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["compile", str(tiny_model_path), "-o", str(out), *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "out.search.db").exists()


def test_a_spent_time_budget_still_emits_the_lossless_result(redundant_model, tmp_path):
    """--time-budget is the whole compile's: spent before any trial, the compile emits the
    lossless pipeline and says why, never "no model found"."""
    path, _, _ = redundant_model
    result = search_compile(str(path), tmp_path / "out",
                            SearchOptions(objective="size", trials=8, time_budget=0.001))
    assert result.trials == 0 and result.chosen.pipeline == DEFAULT_PIPELINE
    assert "kept the lossless pipeline" in result.message
    assert (tmp_path / "out" / "model.onnx").exists()

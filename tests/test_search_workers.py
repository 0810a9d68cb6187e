"""`winnow search worker`: several processes share one compile's search through the study's
database (PostgreSQL, a throwaway cluster, as across machines), none of the trial budget lost or
run twice; and the worker's clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from click.testing import CliRunner

from tests.postgres import cluster, server_bin
from tests.test_driver import redundant_model  # noqa: F401 - the shared fixture
from winnow.cli import cli

TRIALS = 12


def _winnow(*args: str) -> list[str]:
    return [sys.executable, "-m", "winnow", "--quiet", *args]


@pytest.mark.slow
@pytest.mark.skipif(server_bin() is None, reason="PostgreSQL server binaries missing (make install "
                                                 "installs Debian's postgresql when root)")
def test_two_workers_and_the_compile_share_one_postgresql_study(redundant_model, tmp_path):  # noqa: F811
    import optuna
    from optuna.trial import TrialState

    path, _, _ = redundant_model
    out = tmp_path / "out"
    with cluster() as url:
        workers = [subprocess.Popen(_winnow("search", "worker", "--study", url, "--wait", "300",
                                            "--json"), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for _ in range(2)]
        done = subprocess.run(_winnow("compile", str(path), "-o", str(out), "--target", "host",
                                      "--objective", "latency", "--trials", str(TRIALS),
                                      "--max-drop", "0.001", "--study", url, "--json"),
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        reports = []
        for proc in workers:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, (stdout + stderr)[-3000:]
            reports.append(json.loads(stdout))
        study = optuna.load_study(study_name=reports[0]["study"], storage=url)
        trials = study.get_trials(deepcopy=False)
    search = json.loads(done.stdout)["search"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert search["trials"] == TRIALS and len(complete) == TRIALS
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # The storage hands out each trial number once; any trial past the budget (two processes
    # asking for the last one at once) is marked and pruned, never run.
    assert sorted(t.number for t in complete) == list(range(TRIALS))
    assert all(t.user_attrs.get("over_budget") for t in trials if t.state == TrialState.PRUNED)
    ran_by = Counter(t.user_attrs["worker"] for t in complete)
    assert len(ran_by) == 3, ran_by  # the compile and both workers each ran trials
    for report in reports:
        assert ran_by[report["worker"]] == report["trials_run"] >= 1, (report, ran_by)
    assert (out / "manifest.json").exists()


def test_worker_without_a_study_is_a_clear_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    result = CliRunner().invoke(cli, ["search", "worker", "--study", url])
    assert result.exit_code == 2 and "holds no winnow search" in result.output
    assert "Traceback" not in result.output


def test_worker_refuses_a_search_of_an_in_memory_model(tmp_path):
    import optuna

    from winnow.driver.study import JOB_ATTR, open_study

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = open_study(url, "abcd", ["minimize", "minimize"], optuna.samplers.RandomSampler())
    study.set_user_attr(JOB_ATTR, {"source": None, "source_is_text": False, "options": {},
                                   "calibration": None, "calibration_is_text": True,
                                   "deadline": 0})
    result = CliRunner().invoke(cli, ["search", "worker", "--study", url])
    assert result.exit_code == 2 and "Python object" in result.output


def test_worker_given_a_malformed_url_is_a_clear_error():
    result = CliRunner().invoke(cli, ["search", "worker", "--study", "search.db"])
    assert result.exit_code == 2 and "not a database URL" in result.output

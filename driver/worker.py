"""`winnow search worker --study URL`: join a compile's search from any machine that can reach the
study's database; the worker rebuilds the search from the job the compile stored in the study
and runs trials until the shared trial budget or the compile's time budget is spent."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from winnow import progress
from winnow.driver.search import SearchOptions, lossless_base, TrialRunner, worker_id
from winnow.driver.source import resolve
from winnow.driver.study import STUDY_PREFIX, StudyError, find_study


@dataclasses.dataclass
class WorkerResult:
    """What one worker did: the study it joined, the source, the trials it ran."""

    study: str
    source: str
    trials_run: int
    worker: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (the CLI's --json)."""
        return dataclasses.asdict(self)


def run_worker(url: str, wait: float = 0.0) -> WorkerResult:
    """Join the winnow study at `url` and run trials until its budget is spent."""
    study, job = find_study(url, None, wait)
    source = _job_source(study.study_name, job)
    options = SearchOptions(**{k: v for k, v in job["options"].items()
                               if k in {f.name for f in dataclasses.fields(SearchOptions)}})
    with progress.step(f"loading {source} for study {study.study_name}"):
        src = resolve(source, job.get("calibration"))
        base = lossless_base(src)
    runner = TrialRunner(src, base, options)
    if STUDY_PREFIX + runner.fingerprint() != study.study_name:
        raise StudyError(f"this machine's copy of '{source}' (or its winnow version) differs from "
                         f"the one study {study.study_name} searches; give the worker the same "
                         "model file and winnow version as the compile.")
    # Its own seed: workers with the compile's seed would propose the compile's trials again.
    own_seed = dataclasses.replace(options, seed=options.seed + os.getpid())
    study.sampler = TrialRunner.sampler_for(own_seed)
    runner.share_analyses(study)
    ran = runner.run_trials(study, float(job["deadline"]))
    return WorkerResult(study.study_name, source, ran, worker_id())


def _job_source(name: str, job: dict[str, Any]) -> str:
    """The source a worker loads, or a StudyError when the compile's source cannot travel."""
    if not job.get("source_is_text") or job.get("source") is None:
        raise StudyError(f"study {name} searches a model given as a Python object; workers can "
                         "join only searches of a model file, folder or zoo name.")
    if not job.get("calibration_is_text"):
        raise StudyError(f"study {name} fits and judges on inputs given in memory (arrays from "
                         "the API, or --input-shapes / --example-inputs); workers can join only "
                         "searches whose data is a file or a zoo model's own.")
    return str(job["source"])

"""The search study on Optuna's RDB storage: SQLite next to the output by default, any SQLAlchemy
URL (PostgreSQL across machines) when given; a study is tied to one model and one budget.

Several processes may run one study (`winnow compile --target ... --study URL` plus any number
of `winnow search worker --study URL`). The trial budget is shared through the trial numbers the
storage hands out (dense and unique per study), so the trials are split between the processes
with none run twice; a process that dies leaves a trial whose heartbeat stops, which any other
process fails after the grace period and re-queues with the same parameters, so none is lost."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from winnow.errors import WinnowError, require_extra

STUDY_PREFIX = "winnow-"
JOB_ATTR = "winnow.job"  # the study's user attribute a worker rebuilds the search from
ANALYSES_ATTR = "winnow.analyses"  # the analyses the first process computed, shared by all
HEARTBEAT_S = 5
GRACE_S = 20  # a running trial whose heartbeat is older than this belongs to a dead process
POLL_S = 1.0
OPEN_ATTEMPTS = 5


class StudyError(WinnowError):
    """The study storage cannot be used (malformed or unreachable URL, another model's study)."""


def default_url(out: str | Path) -> str:
    """SQLite file beside OUT (OUT itself appears only when the artifact is complete)."""
    out = Path(out).resolve()
    return f"sqlite:///{out.parent / (out.name + '.search.db')}"


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite:/// URL, else None."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def open_storage(url: str) -> Any:
    """Optuna's RDB storage at `url`, with heartbeats so a dead process's trial is re-queued."""
    require_extra("winnow compile --target (the search)", "search", ("optuna",))
    import optuna

    if "://" not in url:
        raise StudyError(f"the study URL '{url}' is not a database URL; write e.g. "
                         "'sqlite:///search.db' or 'postgresql://user@host/db'.")
    db = sqlite_path(url)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudyError(f"cannot create the folder of the study file '{db}': "
                             f"{exc.strerror}.") from exc
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many types
            # Processes that open an empty database at once race to create Optuna's tables;
            # the losers succeed once the winner has made them.
            racing = "already exists" in str(exc) or "duplicate key" in str(exc)
            if racing and attempt + 1 < OPEN_ATTEMPTS:
                time.sleep(POLL_S)
                continue
            raise StudyError(f"cannot open the study storage '{url}': "
                             f"{str(exc).splitlines()[0]}") from exc
    raise StudyError(f"cannot open the study storage '{url}'.")  # not reached


def _winnow_studies(storage: Any) -> list[str]:
    import optuna

    return [s.study_name for s in optuna.get_all_study_summaries(storage)
            if s.study_name.startswith(STUDY_PREFIX)]


def open_study(url: str, fingerprint: str, directions: list[str], sampler: Any) -> Any:
    """Create or resume the study for `fingerprint`; refuse a storage holding another model's."""
    import optuna

    storage = open_storage(url)
    name = STUDY_PREFIX + fingerprint
    names = _winnow_studies(storage)
    if names and name not in names:
        raise StudyError(f"the study storage '{url}' holds a search of another model or budget "
                         f"({names[0]}); give a new --study or remove it.")
    return optuna.create_study(study_name=name, storage=storage, directions=directions,
                               sampler=sampler, load_if_exists=True)


def find_study(url: str, sampler: Any, wait: float = 0.0) -> tuple[Any, dict[str, Any]]:
    """The one winnow study at `url` and the job it was made for, waiting up to `wait` seconds
    for a compile to create it (a worker may start before the compile it helps)."""
    import optuna

    storage = open_storage(url)
    deadline = time.time() + wait
    while True:
        names = _winnow_studies(storage)
        if names:
            break
        if time.time() >= deadline:
            raise StudyError(f"the study storage '{url}' holds no winnow search; start `winnow "
                             "compile SRC --target T --study URL` (or give the worker --wait).")
        time.sleep(POLL_S)
    study = optuna.load_study(study_name=names[0], storage=storage, sampler=sampler)
    while JOB_ATTR not in study.user_attrs:  # the compile writes it right after creating
        if time.time() >= deadline + 30:
            raise StudyError(f"the study '{names[0]}' at '{url}' has no job description; it was "
                             "made by an older winnow or is not a compile's search.")
        time.sleep(POLL_S)
    return study, dict(study.user_attrs[JOB_ATTR])


def trial_limit(study: Any, budget: int) -> int:
    """Trial numbers below this are the budget's: `budget` plus one per re-queued trial."""
    trials = study.get_trials(deepcopy=False)
    return budget + sum("failed_trial" in t.system_attrs for t in trials)


def run_trials(study: Any, objective: Callable[[Any], Any], budget: int,
               deadline: float | Callable[[], float], callback: Callable[[Any, Any], None],
               catch: tuple[type, ...]) -> int:
    """Run trials of `study` in this process until the shared budget is spent (waiting for
    other processes' running trials, taking over any a dead process left) or the wall-clock
    `deadline` (epoch seconds, or a function giving it as trials teach how long they take)
    passes; returns how many trials this process evaluated."""
    import optuna
    from optuna.trial import TrialState

    ran = 0

    def guarded(trial: Any) -> Any:
        nonlocal ran
        if trial.number >= trial_limit(study, budget):  # another process took the last one
            trial.set_user_attr("over_budget", True)
            raise optuna.TrialPruned()
        ran += 1
        return objective(trial)

    watched: set[int] = set()
    while time.time() < (deadline() if callable(deadline) else deadline):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        if TrialState.WAITING in states or len(trials) < trial_limit(study, budget):
            study.optimize(guarded, n_trials=1, catch=catch, callbacks=[callback])
        elif TrialState.RUNNING in states:
            watch_running(study, trials, watched)
            time.sleep(POLL_S)
        else:
            break
    return ran


def watch_running(study: Any, trials: list[Any], watched: set[int]) -> None:
    """Record one heartbeat for each trial that has been running longer than the grace period
    (once per trial): a process killed after creating a trial but before its first heartbeat
    leaves a trial Optuna never counts as stale; from this heartbeat on it is failed and
    re-queued after the grace period unless its process is alive and beating."""
    from optuna.trial import TrialState

    storage = study._storage  # Optuna keeps the storage and trial ids private
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is None:
        return
    now = time.time()
    for trial in trials:
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        if (trial.state == TrialState.RUNNING and trial._trial_id not in watched
                and now - started > GRACE_S):
            storage.record_heartbeat(trial._trial_id)
            watched.add(trial._trial_id)

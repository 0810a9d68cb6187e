"""The search study on Optuna's RDB storage: SQLite next to the output by default, any SQLAlchemy
URL (PostgreSQL across machines) when given; a study is tied to one model and one budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from winnow.errors import WinnowError, require_extra

STUDY_PREFIX = "winnow-"


class StudyError(WinnowError):
    """The study storage cannot be used (malformed or unreachable URL, another model's study)."""


def default_url(out: str | Path) -> str:
    """SQLite file beside OUT (OUT itself appears only when the artifact is complete)."""
    out = Path(out).resolve()
    return f"sqlite:///{out.parent / (out.name + '.search.db')}"


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite:/// URL, else None."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def open_study(url: str, fingerprint: str, directions: list[str], sampler: Any) -> Any:
    """Create or resume the study for `fingerprint`; refuse a storage holding another model's."""
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
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many types
        raise StudyError(f"cannot open the study storage '{url}': "
                         f"{str(exc).splitlines()[0]}") from exc
    name = STUDY_PREFIX + fingerprint
    others = [s.study_name for s in optuna.get_all_study_summaries(storage)
              if s.study_name.startswith(STUDY_PREFIX) and s.study_name != name]
    if others and name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        raise StudyError(f"the study storage '{url}' holds a search of another model or budget "
                         f"({others[0]}); give a new --study or remove it.")
    return optuna.create_study(study_name=name, storage=storage, directions=directions,
                               sampler=sampler, load_if_exists=True)

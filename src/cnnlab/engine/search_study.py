"""The Optuna side of ``cnnlab search``: the study's storage (checked before Optuna writes to it), sampler and pruner.

The search loop is :mod:`cnnlab.engine.search`; this module never imports it (the argument
conflicts a found study is checked for are passed in).
"""
from __future__ import annotations

import sqlite3
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnlab._errors import CnnlabError
from cnnlab.engine.search_space import Dimension

STUDY_FILE = "study.db"
ARGUMENTS_ATTR = "cnnlab_search"  # the study's user attribute holding the search's arguments
OPTUNA_TABLES = {"studies", "trials", "version_info", "alembic_version"}


def _open_study(url: str, study_name: str, arguments: dict[str, Any], higher: bool, *, must_exist: bool,
                may_join: bool, conflicts: Callable[[dict[str, Any], dict[str, Any]], list[str]]):
    """The study, created or loaded; a file or study that is not this search's is refused before anything is written.

    ``conflicts(saved, given)`` lists how a found study's saved arguments differ from ``arguments``
    (passed in, not imported: the search's key lists live in :mod:`cnnlab.engine.search`).
    """
    import optuna
    import sqlalchemy.exc

    existing_file = False
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        existing_file = path.exists()
        if existing_file:
            _check_sqlite_file(path)
        elif must_exist:
            raise CnnlabError(f"{path} does not exist: the search folder holds no study to resume")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # cnnlab prints its own line per trial
    try:
        # skip_table_creation: Optuna would otherwise add its tables to a file of another Optuna version
        store = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}} if
                                           url.startswith("sqlite") else None, skip_table_creation=existing_file)
        names = optuna.study.get_all_study_names(store)
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError, ImportError, ValueError) as e:
        raise CnnlabError(f"search storage {url}: cannot be opened as an Optuna study ({type(e).__name__}: {e})") from None
    if study_name in names:
        study = optuna.load_study(study_name=study_name, storage=store)
        saved = study.user_attrs.get(ARGUMENTS_ATTR)
        if saved is None:
            raise CnnlabError(f"search storage {url}: study {study_name!r} was not made by cnnlab search; "
                              "choose another study name or storage")
        _refuse_conflicts(f"study {study_name!r} in {url}", conflicts(saved, arguments))
        if not may_join:
            raise CnnlabError(f"search storage {url} already holds study {study_name!r}; continue it with "
                              "resume=True (cnnlab search --resume DIR) or choose another name")
        return study
    if existing_file and names:
        raise CnnlabError(f"search storage {url} holds other studies ({', '.join(names)}), not {study_name!r}: it "
                          "belongs to another search; choose another folder or pass its study name")
    if must_exist:
        raise CnnlabError(f"search storage {url} holds no study {study_name!r} to resume")
    study = optuna.create_study(storage=store, study_name=study_name,
                                direction="maximize" if higher else "minimize")
    study.set_user_attr(ARGUMENTS_ATTR, arguments)
    return study


def _check_sqlite_file(path: Path) -> None:
    """Refuse a file that is not an Optuna SQLite database, reading it only (opening it with Optuna would write)."""
    with open(path, "rb") as f:
        header = f.read(16)
    if header != b"SQLite format 3\x00":
        raise CnnlabError(f"{path} is not an Optuna study (not a SQLite database); it was left as it is. Move it "
                          "away or choose another search folder")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise CnnlabError(f"{path} cannot be read as a SQLite database ({e}); it was left as it is") from None
    if not OPTUNA_TABLES <= tables:
        raise CnnlabError(f"{path} is a SQLite database but not an Optuna study (its tables: "
                          f"{', '.join(sorted(tables)) or 'none'}); it was left as it is")


def _refuse_conflicts(where: Any, conflicts: list[str]) -> None:
    """Refuse a folder or study whose saved arguments differ from the given ones (``conflicts``: what differs)."""
    if conflicts:
        raise CnnlabError(f"{where} belongs to another search (other arguments: {'; '.join(conflicts)}); it was "
                          "left as it is. Resume with the saved arguments (cnnlab search --resume DIR reads them) "
                          "or choose another folder, storage or study name")


def _make_sampler(arguments: dict[str, Any], space: list[Dimension], seed: int):
    import optuna

    kind = arguments["sampler"]
    if kind == "grid":
        # grid point n is trial n of one seeded shuffle: the same seed for every trial
        return _GridSampler({d.key: d.grid(arguments["grid_points"]) for d in space}, seed=arguments["seed"])
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Optuna's default of 10 random trials first would leave a short search all random
    startup = min(10, max(2, arguments["trials"] // 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate is marked experimental
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler, used with ask/tell: the trial count ends the search, not ``study.stop()``
        (which Optuna allows only inside ``study.optimize``)."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return GridSampler


def _GridSampler(search_space: dict[str, list[Any]], seed: int):  # noqa: N802 - a class built lazily (optuna import)
    return _grid_sampler_class()(search_space, seed=seed)


def _make_pruner(arguments: dict[str, Any]):
    import optuna

    kind, low, factor = arguments["pruner"], arguments["min_epochs"], arguments["reduction_factor"]
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=low, max_resource=arguments["epochs"],
                                              reduction_factor=factor)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=low, reduction_factor=factor)
    return optuna.pruners.NopPruner()

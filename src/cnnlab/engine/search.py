"""Hyper-parameter search on Optuna: grid, random or TPE proposals, successive-halving/Hyperband pruning.

    >>> from cnnlab.engine.search import parse_space, search
    >>> space = parse_space(["optim.lr=loguniform(1e-3, 1)", "optim.optimizer=sgd,adamw"])
    >>> result = search(config, space, sampler="tpe", pruner="hyperband", trials=12, epochs=9)  # doctest: +SKIP
    >>> result.best.params, result.best.score                                                   # doctest: +SKIP

A space maps the dotted config keys of ``cnnlab train --set`` to a :class:`Dimension`:
``loguniform(lo, hi)`` (learning rates, weight decay: scale matters, not the digits),
``uniform(lo, hi)``, ``int(lo, hi)``, or a list of choices ``a,b,c`` / ``[json, ...]``.

Optuna (https://optuna.org) proposes the values and prunes: every trial reports its validation
metric after each epoch from ``train()``'s epoch callback, and the pruner stops the trials that
trail the others at the same epoch (successive halving, Li et al. 2017's Hyperband): short runs
first, and only the promising ones train on. The metric is any ``val_<m>`` column of the epoch
rows (``val_acc``, ``val_loss``, ``val_psnr``); the task says whether higher is better.

The study lives in a SQLite file in the search folder (``sqlite:///DIR/study.db``) or in any
database Optuna takes (``storage=``): a killed search resumes (``resume_search(DIR)``), and
several processes or machines can work on one study (same storage URL and study name).
``search.csv`` and ``best.json`` are rewritten after every trial, ``search.png`` at the end.
"""
from __future__ import annotations

import copy
import csv
import io
import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cnnlab._errors import CnnlabError, did_you_mean
from cnnlab._io import atomic_write_text, dumps_json
from cnnlab._plot import pyplot, save_figure
from cnnlab.engine.config import TrainConfig, apply_overrides, check_run_name
from cnnlab.engine.resumable import Progress, config_differences, read_history, read_json, run_state
# re-exported: the space and the study's storage/sampler/pruner live in their own modules, imported from here too
from cnnlab.engine.search_space import _RANGE, Dimension, parse_dimension, parse_space  # noqa: F401
from cnnlab.engine.search_study import (  # noqa: F401
    ARGUMENTS_ATTR, OPTUNA_TABLES, STUDY_FILE, _check_sqlite_file, _grid_sampler_class, _GridSampler, _make_pruner,
    _make_sampler, _open_study, _refuse_conflicts,
)
from cnnlab.engine.trainer import TrainingDiverged, train

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("hyperband", "halving", "none")
WORKER = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Trial:
    """One trial of the study, as the table shows it.

    Args:
        number: Optuna's trial number; params: searched key -> value (``--set`` text).
        state: ``complete``, ``pruned`` (stopped by the pruner), ``diverged`` (NaN loss), ``failed``,
            ``running`` or ``interrupted``; epochs: epochs trained.
        score: the metric at the best epoch (NaN when none); val_loss, train_loss: at that epoch.
        curve: epoch -> the metric reported to the pruner.
        worker: ``host:pid`` of the process that ran it.
    """

    number: int
    params: dict[str, str]
    state: str
    epochs: int = 0
    score: float = math.nan
    best_epoch: int = 0
    val_loss: float = math.nan
    train_loss: float = math.nan
    time_s: float = 0.0
    run_dir: str = ""
    worker: str = ""
    curve: dict[int, float] = field(default_factory=dict, repr=False)


@dataclass
class SearchResult:
    """Every trial, the best finished one (None when none finished), and where the table and plot went."""

    trials: list[Trial]
    best: Trial | None
    search_dir: Path
    csv_path: Path
    plot_path: Path | None
    metric: str
    direction: str
    storage: str
    study_name: str

    def best_overrides(self) -> list[str]:
        """The best trial's values as ``--set`` arguments for ``cnnlab train``."""
        return [f"{k}={v}" for k, v in self.best.params.items()] if self.best else []


def metric_direction(base: TrainConfig, metric: str | None) -> tuple[str, bool]:
    """(the metric, higher is better) for the task of ``base``'s model; ``None`` picks its first metric."""
    from cnnlab.engine.tasks import get_task

    task = get_task(base)
    names = ("loss", *task.metrics)
    accepted = [f"val_{m}" for m in names]
    if metric is None:
        metric = accepted[1] if len(accepted) > 1 else accepted[0]
    if metric not in accepted:
        raise CnnlabError(f"search metric={metric!r} is not a validation column of the {task.name} task's epoch rows; "
                          f"choose {', '.join(accepted)}{did_you_mean(str(metric), accepted)} (trials are ranked on "
                          "the validation split, never on test)")
    return metric, task.higher_is_better(metric)


def search(base: TrainConfig, space: Sequence[Dimension], *, sampler: str = "tpe", pruner: str = "hyperband",
           trials: int | None = None, epochs: int = 3, min_epochs: int = 1, reduction_factor: int = 3,
           metric: str | None = None, grid_points: int = 3, seed: int = 0, name: str = "",
           storage: str | None = None, study_name: str | None = None, plot: bool = True,
           resume: bool = False) -> SearchResult:
    """Run (or continue, or join) an Optuna study over ``space``; see the module docstring.

    Args:
        base: the config every trial starts from (its ``epochs`` is replaced by ``epochs``); without a
            validation split, 10% of the training split is held out (``data.val_fraction=0.1``).
        sampler: ``tpe`` (Bergstra et al. 2011; the first trials are random), ``random`` or ``grid``
            (every combination, ``grid_points`` values per numeric range).
        pruner: ``hyperband``, ``halving`` (successive halving) or ``none``; rungs start at ``min_epochs``
            and grow by ``reduction_factor``; a trial trains at most ``epochs``.
        trials: how many trials the study holds when done (all workers together); default 8, or the
            grid's size.
        metric: ``val_<m>`` for a metric of the task (default its first: ``val_acc``, ``val_psnr``).
        seed: of the proposals: trial ``n`` is proposed with seed ``seed + n`` from the trials before it,
            so a resumed study proposes what an uninterrupted one would.
        name: the search folder under ``base.out_dir`` (default ``search-<model>-<data>-<date>``).
        storage: an Optuna storage URL (default ``sqlite:///<folder>/study.db``); study_name: default the
            folder's name. With an explicit storage, a study of that name with the same arguments is
            joined (another worker); ``resume`` continues the one in the folder.
    """
    import optuna  # noqa: F401 - a missing optuna fails here, before any trial or folder

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CnnlabError("cnnlab search does not run under torchrun: each trial is one process. To use several "
                          "processes or machines, start several workers on one study (docs/ensembles_search.md)")
    space = list(space)
    if sampler not in SAMPLERS:
        raise CnnlabError(f"sampler={sampler!r} is not one of {', '.join(SAMPLERS)}{did_you_mean(str(sampler), SAMPLERS)}")
    if pruner not in PRUNERS:
        raise CnnlabError(f"pruner={pruner!r} is not one of {', '.join(PRUNERS)}{did_you_mean(str(pruner), PRUNERS)}")
    for key, value, low in (("epochs", epochs, 1), ("min_epochs", min_epochs, 1), ("reduction_factor", reduction_factor, 2),
                            ("grid_points", grid_points, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise CnnlabError(f"search {key} must be a whole number >= {low}, got {value!r}")
    if min_epochs > epochs:
        raise CnnlabError(f"search min_epochs ({min_epochs}) must be <= epochs ({epochs}): the first rung of the pruner")
    grid_size = math.prod(len(d.grid(grid_points)) for d in space)
    if trials is None:
        trials = grid_size if sampler == "grid" else 8
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise CnnlabError(f"search trials must be a whole number >= 1, got {trials!r}")
    if sampler == "grid":
        trials = min(trials, grid_size)  # Optuna's grid sampler stops the study once every point was tried
    base = prepare_base(base)
    for d in space:  # a bad key or value fails now, not after the first trial trained
        _trial_config(base, {d.key: d.text(d.grid(1)[0])}, Path(base.out_dir) / "check", epochs)
    metric, higher = metric_direction(base, metric)
    if resume and not (name or base.name):
        raise CnnlabError("resuming a search needs its folder: pass name=... (or cnnlab search --resume DIR)")
    if name or base.name:
        check_run_name(name or base.name, "name")  # one folder inside out_dir, never elsewhere
    search_dir = Path(base.out_dir) / (name or base.name or
                                       f"search-{base.model.name}-{Path(base.data.name).name}-{datetime.now():%Y%m%d-%H%M%S}")
    url = storage or f"sqlite:///{search_dir / STUDY_FILE}"
    study_name = study_name or search_dir.name
    arguments = {"version": 2, "space": [d.to_dict() for d in space], "sampler": sampler, "pruner": pruner,
                 "trials": int(trials), "epochs": int(epochs), "min_epochs": int(min_epochs),
                 "reduction_factor": int(reduction_factor), "metric": metric, "grid_points": int(grid_points),
                 "seed": int(seed), "base": base.to_dict()}
    folder_holds = (search_dir / "search.json").exists() or (search_dir / STUDY_FILE).exists()
    if resume:
        saved = load_arguments(search_dir)
        _refuse_conflicts(search_dir / "search.json", argument_conflicts(saved, arguments))
    elif folder_holds and storage is None:
        raise CnnlabError(f"{search_dir} already holds a search; continue it with `cnnlab search --resume {search_dir}` "
                          "(search(..., resume=True)) or choose another name")
    study = _open_study(url, study_name, arguments, higher, must_exist=resume and storage is None,
                        may_join=resume or storage is not None, conflicts=argument_conflicts)
    search_dir.mkdir(parents=True, exist_ok=True)
    if not (search_dir / "search.json").exists():
        atomic_write_text(search_dir / "search.json", dumps_json(
            {**arguments, "storage": storage, "study_name": study_name}, indent=2))
    try:
        return _work(study, base, space, arguments, higher, search_dir, url, plot)
    except KeyboardInterrupt:
        _say(base, f"search interrupted; search.csv holds the finished trials. Continue it with: "
                   f"cnnlab search --resume {search_dir}")
        raise


def _counted(t: Any) -> bool:
    """A trial that counts towards ``trials``: finished (not by an error) or being trained."""
    from optuna.trial import TrialState

    status = t.user_attrs.get("status")
    return (t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            or (t.state == TrialState.FAIL and status == "diverged"))


def _orphaned(t: Any) -> bool:
    """A running trial nobody trains any more: interrupted, or its process on this machine is gone."""
    from optuna.trial import TrialState

    if t.state != TrialState.RUNNING:
        return False
    if t.user_attrs.get("interrupted"):
        return True
    host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _work(study: Any, base: TrainConfig, space: list[Dimension], arguments: dict[str, Any], higher: bool,
          search_dir: Path, url: str, plot: bool) -> SearchResult:
    """Train trials until the study holds ``trials`` of them, rewriting the table after each."""
    import optuna

    study.pruner = _make_pruner(arguments)
    total, metric = arguments["trials"], arguments["metric"]
    progress = Progress(total * arguments["epochs"])
    finished_before = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and _counted(t)]
    progress.done = sum(int(t.user_attrs.get("epochs", 0)) for t in finished_before)
    for t in finished_before:  # a resumed or joined study: what is there already
        _say(base, f"  trial {t.number + 1}/{total} t{t.number:03d} {_shown(space, t.params)} -> "
                   f"{_state(t)} {metric} {t.user_attrs.get('score', math.nan):.4f} (read back)")
    _say(base, f"search {study.study_name}: {total} trials of up to {arguments['epochs']} epoch(s), "
               f"{arguments['sampler']} sampler, {arguments['pruner']} pruner, {metric} "
               f"({'higher' if higher else 'lower'} is better) over " + "; ".join(d.describe() for d in space))
    while True:
        trials = study.get_trials(deepcopy=False)
        orphans = [t for t in trials if _orphaned(t)]
        if orphans:
            trial, source = optuna.trial.Trial(study, orphans[0]._trial_id), "resumed"
        else:
            if sum(_counted(t) for t in trials) >= total:
                break
            study.sampler = _make_sampler(arguments, space, arguments["seed"] + len(trials))
            trial, source = study.ask(), "run"
            if trial.number != len(trials) and arguments["sampler"] != "grid":
                # another worker asked in between: this trial's seed would repeat that one's proposal
                trial.set_user_attr("status", "retry")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and _counted(t)]
            if len(ahead) >= total:  # another worker asked first: this one is one too many
                trial.set_user_attr("status", "surplus")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                break
        record = _run_trial(study, trial, source, base, space, metric, higher, search_dir, progress,
                            arguments["epochs"])
        _write_outputs(study, space, arguments, search_dir, url)
        best = _best(study, space)
        mark = "  (best so far)" if best is not None and best.number == record.number else ""
        how = {"run": f"{record.time_s:.0f} s", "resumed": f"resumed, {record.time_s:.0f} s"}[source]
        done = sum(t.state.is_finished() and _counted(t) for t in study.get_trials(deepcopy=False))
        _say(base, f"  trial {done}/{total} t{record.number:03d} {_shown(space, trial.params)} -> {metric} "
                   f"{record.score:.4f} ({record.state} after {record.epochs} epoch(s), {how}){mark}  "
                   f"[{progress.line()}]")
    table = _write_outputs(study, space, arguments, search_dir, url)
    plot_path = (search_dir / "search.png") if plot else None
    if plot_path is not None:
        plot_search(plot_path, table, space, metric, higher)
    return SearchResult(table, _best(study, space), search_dir, search_dir / "search.csv", plot_path, metric,
                        "maximize" if higher else "minimize", url, study.study_name)


def _run_trial(study: Any, trial: Any, source: str, base: TrainConfig, space: list[Dimension], metric: str,
               higher: bool, search_dir: Path, progress: Progress, epochs: int) -> Trial:
    """Train one trial, reporting every epoch's metric to the pruner; tell the study how it ended."""
    import optuna
    from optuna.trial import TrialState

    params = {d.key: d.text(d.suggest(trial)) for d in space}
    attrs = trial.user_attrs
    host_dir = attrs.get("run_dir") if str(attrs.get("worker", "")).startswith(socket.gethostname() + ":") else None
    run_dir = Path(host_dir) if host_dir else search_dir / f"t{trial.number:03d}"
    config = _trial_config(base, params, run_dir, epochs)
    previous_s = float(attrs.get("time_s", 0.0))
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", WORKER)
    trial.set_user_attr("interrupted", False)
    state, start = run_state(run_dir) if source == "resumed" else ("new", 0)
    best = dict(attrs.get("best") or {})
    t0 = time.perf_counter()

    def report(row: dict[str, Any]) -> None:
        value = row.get(metric)
        if value is None:
            raise CnnlabError(f"search metric {metric!r} is not in the epoch rows (they hold "
                              f"{', '.join(k for k in row if k.startswith('val_')) or 'no validation columns'})")
        epoch, value = int(row["epoch"]), float(value)
        trial.report(value, epoch)
        if not best or (math.isfinite(value) and (value > best["score"] if higher else value < best["score"])):
            best.update(epoch=epoch, score=value, val_loss=row.get("val_loss"), train_loss=row.get("train_loss"))
            trial.set_user_attr("best", best)
            trial.set_user_attr("score", value)
        trial.set_user_attr("epochs", epoch)
        trial.set_user_attr("time_s", previous_s + time.perf_counter() - t0)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {metric} {value:.4f} trails the other trials")

    def finish(tell_state: Any, status: str, value: float | None = None) -> Trial:
        trial.set_user_attr("status", status)
        trial.set_user_attr("time_s", previous_s + time.perf_counter() - t0)
        epochs_now = int(trial.user_attrs.get("epochs", 0))
        progress.finished(epochs_now, epochs_now - start, time.perf_counter() - t0)
        if tell_state == TrialState.COMPLETE:
            study.tell(trial, value)
        else:
            study.tell(trial, state=tell_state)
        return _record(study.get_trials(deepcopy=False)[trial.number], space)

    try:
        if state != "new":  # epochs checkpointed before the process stopped but not reported: report them first
            reported = study.get_trials(deepcopy=False)[trial.number].intermediate_values
            for row in read_history(run_dir):
                if int(row["epoch"]) not in reported:
                    report(row)
        if state != "done":  # "done": trained to the end before the process died, but not told
            train(config, resume=state == "partial", callbacks=[report])
    except optuna.TrialPruned:
        return finish(TrialState.PRUNED, "pruned")
    except TrainingDiverged as e:  # a too-high learning rate is a result of the search, not an error
        trial.set_user_attr("error", str(e))
        return finish(TrialState.FAIL, "diverged")
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)  # left running: a resume continues it from its checkpoint
        trial.set_user_attr("time_s", previous_s + time.perf_counter() - t0)
        raise
    except BaseException as e:
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        finish(TrialState.FAIL, "failed")
        raise
    if not best or not math.isfinite(best["score"]):
        return finish(TrialState.FAIL, "diverged")
    return finish(TrialState.COMPLETE, "complete", best["score"])


def _state(t: Any) -> str:
    from optuna.trial import TrialState

    if t.state == TrialState.RUNNING:
        return "interrupted" if t.user_attrs.get("interrupted") else "running"
    if t.state == TrialState.FAIL:
        status = t.user_attrs.get("status")
        return status if status in ("diverged", "surplus", "retry") else "failed"
    return t.state.name.lower()


def _record(t: Any, space: list[Dimension]) -> Trial:
    """A study's FrozenTrial as a table row."""
    best = t.user_attrs.get("best") or {}
    num = lambda v: math.nan if v is None else float(v)  # noqa: E731
    dims = {d.key: d for d in space}
    return Trial(t.number, {k: dims[k].text(v) if k in dims else str(v) for k, v in t.params.items()}, _state(t),
                 int(t.user_attrs.get("epochs", 0)), num(best.get("score")), int(best.get("epoch", 0)),
                 num(best.get("val_loss")), num(best.get("train_loss")), float(t.user_attrs.get("time_s", 0.0)),
                 str(t.user_attrs.get("run_dir", "")), str(t.user_attrs.get("worker", "")),
                 {int(k): float(v) for k, v in t.intermediate_values.items()})


def _best(study: Any, space: list[Dimension]) -> Trial | None:
    """The best complete trial (a pruned one trained less: it never wins)."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return _record(pick(done, key=lambda t: t.value), space)  # ties: the first (max/min keep the first)


def _shown(space: list[Dimension], params: dict[str, Any]) -> str:
    return " ".join(f"{d.key}={d.text(params[d.key])}" for d in space if d.key in params)


def _write_outputs(study: Any, space: list[Dimension], arguments: dict[str, Any], search_dir: Path,
                   url: str) -> list[Trial]:
    """search.csv and best.json from the study (every worker's trials)."""
    table = [_record(t, space) for t in study.get_trials(deepcopy=False)
             if t.user_attrs.get("status") not in ("surplus", "retry") and t.state.name != "WAITING"]
    for t in table:
        t.params = {d.key: t.params.get(d.key, "") for d in space}
    write_table(search_dir / "search.csv", table, [d.key for d in space])
    best = _best(study, space)
    atomic_write_text(search_dir / "best.json", dumps_json(
        {"metric": arguments["metric"], "direction": study.direction.name.lower(),
         "score": best.score if best else None, "trial": best.number if best else None, "params": best.params if best else None,
         "run_dir": best.run_dir if best else None, "trials_done": sum(t.state not in ("running", "interrupted")
                                                                          for t in table),
         "trials_planned": arguments["trials"], "storage": url, "study_name": study.study_name}, indent=2))
    return table


def resume_search(search_dir: str | Path, *, quiet: bool | None = None, plot: bool = True) -> SearchResult:
    """Continue (or join, as one more worker) the search in ``search_dir`` with the arguments in its ``search.json``.

    Finished trials stay as they are, an interrupted one continues from its last checkpoint, the
    others are proposed and trained until the study holds its ``trials``.
    """
    search_dir = Path(search_dir)
    saved = load_arguments(search_dir)
    base = TrainConfig.from_dict(saved["base"])
    base.out_dir, base.name = str(search_dir.parent), search_dir.name
    if quiet is not None:
        base.quiet = quiet
    space = [Dimension.from_dict(d) for d in saved["space"]]
    return search(base, space, sampler=saved["sampler"], pruner=saved["pruner"], trials=saved["trials"],
                  epochs=saved["epochs"], min_epochs=saved["min_epochs"], reduction_factor=saved["reduction_factor"],
                  metric=saved["metric"], grid_points=saved["grid_points"], seed=saved["seed"], name=search_dir.name,
                  storage=saved.get("storage"), study_name=saved.get("study_name"), plot=plot, resume=True)


def prepare_base(base: TrainConfig) -> TrainConfig:
    """A copy of ``base`` with a validation split (10% of the training split when it has none)."""
    base = copy.deepcopy(base)
    if base.data.val_fraction == 0:
        base.data.val_fraction = 0.1  # trials are compared on held-out training images, never on the test split
        if not base.quiet:
            print("search: no validation split configured; holding out data.val_fraction=0.1 of the training set")
    return base


ARGUMENT_KEYS = ("space", "sampler", "pruner", "trials", "epochs", "min_epochs", "reduction_factor", "metric",
                 "grid_points", "seed", "base")


def load_arguments(search_dir: Path) -> dict[str, Any]:
    """The arguments a search saved in ``search_dir/search.json``."""
    saved = read_json(Path(search_dir) / "search.json", "a search folder")
    missing = [k for k in ARGUMENT_KEYS if k not in saved]
    if missing:
        raise CnnlabError(f"{Path(search_dir) / 'search.json'} lacks {', '.join(missing)}; it cannot be resumed "
                          "(a search of cnnlab < 0.3, before Optuna, or not a search folder)")
    return saved


# config fields a trial overrides (or that only change what is printed): a resume may differ in them
IGNORED_BASE_KEYS = ("out_dir", "name", "quiet", "plots", "epochs", "device", "threads", "data.root",
                     "data.download", "data.num_workers")


def argument_conflicts(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """``name (saved a, given b)`` for each search argument (or base config key) that differs."""
    out = []
    for key in ARGUMENT_KEYS[1:-1]:
        if saved.get(key) != given[key]:
            out.append(f"{key} (saved {saved.get(key)!r}, given {given[key]!r})")
    if saved.get("space") != given["space"]:
        show = lambda dims: "; ".join(Dimension.from_dict(d).describe() for d in dims or [])  # noqa: E731
        out.append(f"space (saved {show(saved.get('space'))}, given {show(given['space'])})")
    if "base" in saved:
        out += [f"base config {d}" for d in config_differences(saved["base"], given["base"], IGNORED_BASE_KEYS)]
    return out


def _say(config: TrainConfig, text: str) -> None:
    if not config.quiet:
        print(text, flush=True)


def _trial_config(base: TrainConfig, params: dict[str, str], run_dir: Path, epochs: int) -> TrainConfig:
    config = copy.deepcopy(base)
    apply_overrides(config, [f"{k}={v}" for k, v in params.items()])  # type-checked: a bad value fails before training
    config.epochs, config.out_dir, config.name = epochs, str(run_dir.parent), run_dir.name
    config.quiet, config.plots = True, False
    return config


TABLE_COLUMNS = ("trial", "state", "epochs", "score", "best_epoch", "val_loss", "train_loss", "time_s", "worker", "run_dir")


def write_table(path: Path, trials: Sequence[Trial], keys: Sequence[str]) -> Path:
    """One CSV row per trial: its parameters, how it ended, its scores and run folder."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial", *keys, *TABLE_COLUMNS[1:]])
    for t in trials:
        writer.writerow([t.number, *(t.params.get(k, "") for k in keys), t.state, t.epochs,
                         *(f"{v:.6g}" for v in (t.score,)), t.best_epoch,
                         *(f"{v:.6g}" for v in (t.val_loss, t.train_loss)), f"{t.time_s:.1f}", t.worker, t.run_dir])
    return atomic_write_text(path, buf.getvalue())


def plot_search(path: Path, trials: Sequence[Trial], space: Sequence[Dimension], metric: str, higher: bool) -> Path:
    """Score against each searched value (filled: complete, hollow: pruned) and every trial's metric per epoch."""
    plt = pyplot()
    n = len(space) + 1
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    scored = [t for t in trials if t.state in ("complete", "pruned") and math.isfinite(t.score)]
    done = [t for t in scored if t.state == "complete"]
    best = (max if higher else min)(done, key=lambda t: t.score) if done else None
    for ax, dim in zip(axes[0], space):
        categories = list(dim.choices) if dim.kind == "choice" else []
        for state, style in (("complete", {"color": "C0"}), ("pruned", {"facecolors": "none", "edgecolors": "C1"})):
            pts = [t for t in scored if t.state == state]
            xs = [categories.index(t.params[dim.key]) if categories else float(t.params[dim.key]) for t in pts]
            ax.scatter(xs, [t.score for t in pts], s=28, label=state, **style)
        if categories:
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        elif dim.log:
            ax.set_xscale("log")
        ax.set_xlabel(dim.key)
        ax.set_ylabel(f"{metric} (best epoch)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    ax = axes[0][-1]
    for t in trials:
        if t.curve:
            steps = sorted(t.curve)
            bold = best is not None and t.number == best.number
            ax.plot(steps, [t.curve[s] for s in steps], "-o", ms=2, lw=2.5 if bold else 0.8,
                    color="C3" if bold else ("C1" if t.state == "pruned" else "C0"), alpha=1 if bold else 0.6,
                    label=f"t{t.number:03d} (best)" if bold else None)
    ax.set_title("each trial per epoch (pruned: orange)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if best is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return path

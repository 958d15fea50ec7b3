"""Hyper-parameter search: grid or random, short runs first, then refined around the best (coarse to fine).

    >>> from cnnlab.engine.search import parse_space, search
    >>> space = parse_space(["optim.lr=loguniform(1e-3, 1)", "optim.optimizer=sgd,adamw"])
    >>> result = search(config, space, strategy="random", trials=(8, 4), epochs=(1, 3))  # doctest: +SKIP
    >>> result.best.params, result.best.score                                               # doctest: +SKIP

A space maps the dotted config keys of ``cnnlab train --set`` to a :class:`Dimension`:
``loguniform(lo, hi)`` (learning rates, weight decay: scale matters, not the digits),
``uniform(lo, hi)``, ``int(lo, hi)``, or a list of choices ``a,b,c`` / ``[json, ...]``.
Round 1 samples the whole space with short runs (``epochs[0]``); each later round narrows every
range around the best trial so far (its width times ``shrink``, centred on the best value, in
log space for log ranges) and fixes the choices to the best one, then trains longer. Trials are
scored on the validation split (``val_acc`` or ``val_loss``, best epoch), never on the test split.

The search folder gets ``search.json`` (the arguments) first, and ``search.csv``/``best.json`` are
rewritten after every trial; ``resume_search(folder)`` (``cnnlab search --resume``) continues a
killed search: the proposals depend only on the seed and the scores, so they come out the same.
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from cnnlab._errors import CnnlabError, did_you_mean
from cnnlab._io import atomic_write_text
from cnnlab._plot import pyplot, save_figure
from cnnlab.engine.config import TrainConfig, apply_overrides
from cnnlab.engine.distributed import is_main_process
from cnnlab.engine.resumable import Progress, config_differences, read_history, read_json, run_state
from cnnlab.engine.trainer import TrainingDiverged, train

_RANGE = re.compile(r"^\s*(uniform|loguniform|int)\s*\(\s*([^,]+?)\s*,\s*([^,]+?)\s*\)\s*$")


@dataclass(frozen=True)
class Dimension:
    """One searched config field.

    Args:
        key: a dotted config key (``optim.lr``); kind: ``choice``, ``uniform``, ``loguniform`` or ``int``.
        low, high: the range of numeric kinds (inclusive); choices: the values of ``choice``, as
            ``--set`` text (``"sgd"``, ``'{"drop_rate": 0.3}'``).
        bounds: hard limits a refined range never leaves (the first round's range for linear kinds).
    """

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[str, ...] = ()
    bounds: tuple[float, float] | None = None

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"

    def _fmt(self, value: float) -> str:
        return str(int(round(value))) if self.kind == "int" else f"{value:.4g}"

    def sample(self, rng: random.Random) -> str:
        """One value as ``--set`` text: uniform in the range (in log space for ``loguniform``)."""
        if self.kind == "choice":
            return rng.choice(self.choices)
        if self.log:
            return self._fmt(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        if self.kind == "int":
            return str(rng.randint(int(round(self.low)), int(round(self.high))))
        return self._fmt(rng.uniform(self.low, self.high))

    def grid(self, points: int) -> list[str]:
        """``points`` evenly spaced values (log-spaced for ``loguniform``), or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        if points == 1 or self.low == self.high:
            mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
            return [self._fmt(mid)]
        lo, hi = (math.log(self.low), math.log(self.high)) if self.log else (self.low, self.high)
        values = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
        out = [self._fmt(math.exp(v) if self.log else v) for v in values]
        return list(dict.fromkeys(out))  # int ranges narrower than `points` give repeats

    def narrow(self, best: str, shrink: float) -> Dimension:
        """The range ``shrink`` times as wide, centred on ``best``; a choice becomes the best choice."""
        if self.kind == "choice":
            return replace(self, choices=(best,))
        value = float(best)
        if self.log:
            half = (math.log(self.high) - math.log(self.low)) * shrink / 2
            return replace(self, low=value * math.exp(-half), high=value * math.exp(half))
        half = (self.high - self.low) * shrink / 2
        lo_bound, hi_bound = self.bounds or (self.low, self.high)
        low, high = max(lo_bound, value - half), min(hi_bound, value + half)
        return replace(self, low=low, high=high, bounds=(lo_bound, hi_bound))

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key} in {{{', '.join(self.choices)}}}"
        return f"{self.key} ~ {self.kind}({self._fmt(self.low)}, {self._fmt(self.high)})"


def parse_dimension(spec: str) -> Dimension:
    """``key=loguniform(1e-4,1e-1)``, ``key=uniform(0,0.5)``, ``key=int(16,128)``, ``key=a,b,c`` or ``key=[...]``."""
    if "=" not in spec:
        raise CnnlabError(f"search parameter {spec!r} must look like key=loguniform(1e-4,1e-1), key=uniform(0,0.5), "
                          "key=int(16,128) or key=a,b,c")
    key, text = (s.strip() for s in spec.split("=", 1))
    match = _RANGE.match(text)
    call = re.match(r"^\s*([A-Za-z_]\w*)\s*\(.*\)\s*$", text)
    if not match and call:  # 'foo(1,2)' or 'uniform(1)' would otherwise become the choices 'foo(1' and '2)'
        kind = call.group(1)
        known = ("loguniform", "uniform", "int")
        if kind in known:
            raise CnnlabError(f"{key}: {kind}(...) needs exactly two numbers, low and high, e.g. {kind}(1,10); "
                              f"got {text!r}")
        raise CnnlabError(f"{key}: unknown range {kind!r}{did_you_mean(kind, known)}; expected loguniform(lo,hi), "
                          "uniform(lo,hi), int(lo,hi) or choices a,b,c")
    if match:
        kind, a, b = match.groups()
        try:
            low, high = float(a), float(b)
        except ValueError:
            raise CnnlabError(f"{key}: {kind} needs two numbers, got {a!r} and {b!r}") from None
        if not low < high:
            raise CnnlabError(f"{key}: {kind}({a}, {b}) needs low < high")
        if kind == "loguniform" and low <= 0:
            raise CnnlabError(f"{key}: loguniform needs a positive range, got ({a}, {b}); use uniform for ranges with 0")
        return Dimension(key, kind, low, high)
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise CnnlabError(f"{key}: the choice list {text!r} is not JSON ({e})") from None
        choices = tuple(v if isinstance(v, str) else json.dumps(v) for v in values)
    else:
        choices = tuple(v.strip() for v in text.split(",") if v.strip())
    if not choices:
        raise CnnlabError(f"{key}: no values to search; give a range like loguniform(1e-4,1e-1) or choices a,b,c")
    return Dimension(key, "choice", choices=choices)


def parse_space(specs: Sequence[str]) -> list[Dimension]:
    """Parse ``--param`` specs; keys are checked against the config (same errors as ``--set``)."""
    space = [parse_dimension(s) for s in specs]
    keys = [d.key for d in space]
    if not space:
        raise CnnlabError("nothing to search: give at least one --param key=range, e.g. optim.lr=loguniform(1e-3,1)")
    if len(set(keys)) != len(keys):
        raise CnnlabError(f"a key is searched twice: {', '.join(k for k in keys if keys.count(k) > 1)}")
    return space


@dataclass
class Trial:
    """One short training run of the search.

    Args:
        round, index: its place in the search; params: searched key -> value (``--set`` text).
        epochs: its training length; score: the metric (NaN when it diverged); status: ``ok`` or ``diverged``.
        val_acc, val_loss: at the best epoch by the metric; train_loss: at that epoch.
        source: ``run`` (trained now), ``resumed`` (continued from its last checkpoint) or ``read``
            (finished before and read back from its folder by a resumed search).
    """

    round: int
    index: int
    params: dict[str, str]
    epochs: int
    run_dir: Path
    score: float = math.nan
    val_acc: float = math.nan
    val_loss: float = math.nan
    train_loss: float = math.nan
    best_epoch: int = 0
    status: str = "pending"
    time_s: float = 0.0
    source: str = "run"
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)


@dataclass
class SearchResult:
    """Every trial, the best one, and where the table and plot went."""

    trials: list[Trial]
    best: Trial
    search_dir: Path
    csv_path: Path
    plot_path: Path | None
    metric: str

    def best_overrides(self) -> list[str]:
        """The best trial's values as ``--set`` arguments for ``cnnlab train``."""
        return [f"{k}={v}" for k, v in self.best.params.items()]


def _better(metric: str, a: float, b: float) -> bool:
    """``a`` beats ``b`` (NaN never wins)."""
    if math.isnan(a):
        return False
    return math.isnan(b) or (a > b if metric == "val_acc" else a < b)


def propose(space: Sequence[Dimension], strategy: str, trials: int, grid_points: int,
            rng: random.Random) -> list[dict[str, str]]:
    """One round's parameter sets: every grid combination, or ``trials`` random samples."""
    if strategy == "grid":
        axes = [d.grid(grid_points) for d in space]
        return [dict(zip([d.key for d in space], combo)) for combo in itertools.product(*axes)]
    if strategy == "random":
        return [{d.key: d.sample(rng) for d in space} for _ in range(trials)]
    raise CnnlabError(f"unknown search strategy {strategy!r}; choose grid or random")


def search(base: TrainConfig, space: Sequence[Dimension], *, strategy: str = "random", trials: int | Sequence[int] = 8,
           epochs: Sequence[int] = (1, 3), metric: str = "val_acc", shrink: float = 0.25, grid_points: int = 3,
           seed: int = 0, name: str = "", plot: bool = True, resume: bool = False) -> SearchResult:
    """Run the rounds of a coarse-to-fine search; ``search.csv`` and ``best.json`` are rewritten after every trial.

    Args:
        base: the config every trial starts from (its ``epochs`` is replaced by each round's); without
            a validation split, 10% of the training split is held out (``data.val_fraction=0.1``).
        space: the dimensions (:func:`parse_space`).
        strategy: ``random`` (``trials`` samples per round) or ``grid`` (every combination, with
            ``grid_points`` values per numeric range).
        trials: per round, or one number for all rounds (random search only).
        epochs: one training length per round: short runs first, e.g. ``(1, 3)``.
        metric: ``val_acc`` (higher is better) or ``val_loss``; shrink: width factor of each refinement.
        seed: of the random proposals (every trial trains with ``base.seed``: same initial weights).
        name: the search folder under ``base.out_dir`` (default ``search-<model>-<data>-<date>``).
        resume: continue the search in that folder (see :func:`resume_search`): the arguments must equal
            those saved in its ``search.json``; finished trials are read back, an interrupted one continues
            from its last checkpoint, the rest run. The result equals an uninterrupted search's.
    """
    space = list(space)
    if metric not in ("val_acc", "val_loss"):
        raise CnnlabError(f"search metric {metric!r} is not one of val_acc, val_loss")
    rounds = len(epochs)
    if rounds == 0 or any(e < 1 for e in epochs):
        raise CnnlabError(f"search epochs must be one positive count per round, e.g. 1,3; got {list(epochs)}")
    per_round = [int(trials)] * rounds if isinstance(trials, int) else [int(t) for t in trials]
    if len(per_round) != rounds or any(t < 1 for t in per_round):
        raise CnnlabError(f"search trials must be one positive count, or one per round ({rounds}); got {trials}")
    if not 0 < shrink <= 1:
        raise CnnlabError(f"search shrink must be in (0, 1], got {shrink}")
    if grid_points < 1:
        raise CnnlabError(f"grid points must be at least 1, got {grid_points}")
    if strategy not in ("random", "grid"):
        raise CnnlabError(f"unknown search strategy {strategy!r}; choose grid or random")
    base = prepare_base(base)
    if resume and not (name or base.name):
        raise CnnlabError("resuming a search needs its folder: pass name=... (or cnnlab search --resume DIR)")
    search_dir = Path(base.out_dir) / (name or base.name or
                                       f"search-{base.model.name}-{Path(base.data.name).name}-{datetime.now():%Y%m%d-%H%M%S}")
    arguments = {"version": 1, "space": [_dim_to_dict(d) for d in space], "strategy": strategy, "trials": per_round,
                 "epochs": [int(e) for e in epochs], "metric": metric, "shrink": float(shrink),
                 "grid_points": int(grid_points), "seed": int(seed), "base": base.to_dict()}
    if resume:
        conflicts = argument_conflicts(load_arguments(search_dir), arguments)
        if conflicts:
            raise CnnlabError(f"{search_dir / 'search.json'} was started with other arguments: {'; '.join(conflicts)}. "
                              "Resume with the saved ones (cnnlab search --resume DIR takes them from the file)")
    elif (search_dir / "search.json").exists() or (search_dir / "search.csv").exists():
        raise CnnlabError(f"{search_dir} already holds a search; continue it with `cnnlab search --resume {search_dir}` "
                          "(search(..., resume=True)) or choose another name")
    elif is_main_process():  # saved first: a search killed at any later point can be resumed
        search_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(search_dir / "search.json", json.dumps(arguments, indent=2))
    try:
        return _run_search(base, space, strategy, per_round, list(epochs), metric, shrink, grid_points, seed,
                           search_dir, plot, resume)
    except KeyboardInterrupt:
        _say(base, f"search interrupted; search.csv holds the finished trials. Continue it with: "
                   f"cnnlab search --resume {search_dir}")
        raise


def _run_search(base: TrainConfig, space: list[Dimension], strategy: str, per_round: list[int], epochs: list[int],
                metric: str, shrink: float, grid_points: int, seed: int, search_dir: Path, plot: bool,
                resume: bool) -> SearchResult:
    rounds, keys = len(epochs), [d.key for d in space]
    csv_path = search_dir / "search.csv"
    rng = random.Random(seed)  # the proposals depend on the seed and the scores only: a resume recomputes them
    done: list[Trial] = []
    best: Trial | None = None
    progress = Progress(0)
    for r, round_epochs in enumerate(epochs, start=1):
        if best is not None:
            space = [d.narrow(best.params[d.key], shrink) for d in space]
        proposals = propose(space, strategy, per_round[r - 1], grid_points, rng)
        configs = [_trial_config(base, p, round_epochs, search_dir, r, i) for i, p in enumerate(proposals)]
        # later rounds' sizes: a grid's narrowed choices count once (numeric ranges may dedupe: an estimate)
        later = [per_round[k] if strategy == "random" else
                 math.prod(1 if d.kind == "choice" else len(d.grid(grid_points)) for d in space) for k in range(r, rounds)]
        total = len(done) + len(configs) + sum(later)
        progress.plan(sum(t.epochs for t in done) + len(configs) * round_epochs
                      + sum(n * e for n, e in zip(later, epochs[r:])))
        _say(base, f"search round {r}/{rounds}: {len(configs)} trials of {round_epochs} epoch(s) over "
                   + "; ".join(d.describe() for d in space))
        for i, (params, config) in enumerate(zip(proposals, configs)):
            trial, trained = _get_trial(config, params, r, i, metric, resume)
            done.append(trial)
            progress.finished(trial.epochs, trained, trial.time_s)
            mark = ""
            if best is None or _better(metric, trial.score, best.score):
                best, mark = trial, "  (best so far)"
            if is_main_process():  # under torchrun every rank runs the same trials; rank 0 writes
                write_table(csv_path, done, keys)
                atomic_write_text(search_dir / "best.json", json.dumps(
                    {"metric": metric, "score": best.score, "params": best.params, "run_dir": str(best.run_dir),
                     "trials_done": len(done), "trials_planned": total}, indent=2))
            shown = " ".join(f"{k}={v}" for k, v in params.items())
            how = {"run": f"{trial.time_s:.0f} s", "resumed": f"resumed, {trial.time_s:.0f} s", "read": "read back"}
            approx = "~" if strategy == "grid" and r < rounds else ""
            _say(base, f"  trial {len(done)}/{approx}{total} r{r} t{i:02d} {shown} -> {metric} {trial.score:.4f} "
                       f"({trial.status}, {how[trial.source]}){mark}  [{progress.line()}]")
    assert best is not None
    plot_path = (search_dir / "search.png") if plot else None
    if is_main_process() and plot_path is not None:
        plot_search(plot_path, done, space, metric)
    return SearchResult(done, best, search_dir, csv_path, plot_path, metric)


def resume_search(search_dir: str | Path, *, quiet: bool | None = None, plot: bool = True) -> SearchResult:
    """Continue the search in ``search_dir`` with the arguments saved in its ``search.json``.

    Finished trials (``results.json`` in their folder) are read back without training, an
    interrupted one continues from its last checkpoint, the others run; the table ends as an
    uninterrupted search's would (same proposals, scores and best).
    """
    search_dir = Path(search_dir)
    saved = load_arguments(search_dir)
    base = TrainConfig.from_dict(saved["base"])
    base.out_dir, base.name = str(search_dir.parent), search_dir.name
    if quiet is not None:
        base.quiet = quiet
    space = [_dim_from_dict(d) for d in saved["space"]]
    return search(base, space, strategy=saved["strategy"], trials=saved["trials"], epochs=saved["epochs"],
                  metric=saved["metric"], shrink=saved["shrink"], grid_points=saved["grid_points"], seed=saved["seed"],
                  name=search_dir.name, plot=plot, resume=True)


def prepare_base(base: TrainConfig) -> TrainConfig:
    """A copy of ``base`` with a validation split (10% of the training split when it has none)."""
    base = copy.deepcopy(base)
    if base.data.val_fraction == 0:
        base.data.val_fraction = 0.1  # trials are compared on held-out training images, never on the test split
        if not base.quiet and is_main_process():
            print("search: no validation split configured; holding out data.val_fraction=0.1 of the training set")
    return base


def load_arguments(search_dir: Path) -> dict[str, Any]:
    """The arguments a search saved in ``search_dir/search.json``."""
    saved = read_json(Path(search_dir) / "search.json", "a search folder")
    missing = [k for k in ("space", "strategy", "trials", "epochs", "metric", "shrink", "grid_points", "seed", "base")
               if k not in saved]
    if missing:
        raise CnnlabError(f"{search_dir / 'search.json'} lacks {', '.join(missing)}; it cannot be resumed")
    return saved


# config fields a trial overrides (or that only change what is printed): a resume may differ in them
IGNORED_BASE_KEYS = ("out_dir", "name", "quiet", "plots", "epochs")


def argument_conflicts(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """``name (saved a, given b)`` for each search argument (or base config key) that differs."""
    out = []
    for key in ("strategy", "trials", "epochs", "metric", "shrink", "grid_points", "seed"):
        if saved[key] != given[key]:
            out.append(f"{key} (saved {saved[key]!r}, given {given[key]!r})")
    if saved["space"] != given["space"]:
        show = lambda dims: "; ".join(_dim_from_dict(d).describe() for d in dims)  # noqa: E731
        out.append(f"space (saved {show(saved['space'])}, given {show(given['space'])})")
    out += [f"base config {d}" for d in config_differences(saved["base"], given["base"], IGNORED_BASE_KEYS)]
    return out


def _dim_to_dict(d: Dimension) -> dict[str, Any]:
    return {"key": d.key, "kind": d.kind, "low": float(d.low), "high": float(d.high), "choices": list(d.choices),
            "bounds": list(d.bounds) if d.bounds is not None else None}


def _dim_from_dict(d: dict[str, Any]) -> Dimension:
    return Dimension(d["key"], d["kind"], float(d["low"]), float(d["high"]), tuple(d["choices"]),
                     tuple(d["bounds"]) if d.get("bounds") is not None else None)  # type: ignore[arg-type]


def _say(config: TrainConfig, text: str) -> None:
    if not config.quiet and is_main_process():
        print(text, flush=True)


def _trial_config(base: TrainConfig, params: dict[str, str], epochs: int, search_dir: Path, r: int, i: int) -> TrainConfig:
    config = copy.deepcopy(base)
    apply_overrides(config, [f"{k}={v}" for k, v in params.items()])  # type-checked: a bad value fails before training
    config.epochs, config.out_dir, config.name = epochs, str(search_dir), f"r{r}-t{i:02d}"
    config.quiet, config.plots = True, False
    return config


def _get_trial(config: TrainConfig, params: dict[str, str], r: int, i: int, metric: str,
               resume: bool) -> tuple[Trial, int]:
    """(the trial, epochs trained now): read back when finished before, continued when interrupted, else run."""
    trial = Trial(r, i, params, config.epochs, Path(config.out_dir) / config.name)
    state, start = run_state(trial.run_dir) if resume else ("new", 0)
    marker = trial.run_dir / "diverged.json"
    if resume and state == "done":
        trial.source = "read"
        _score(trial, read_history(trial.run_dir), metric)
        trial.time_s = float(read_json(trial.run_dir / "results.json", "a finished run").get("wall_s", 0.0))
        return trial, 0
    if resume and marker.is_file():  # a diverged trial is a result: not retrained
        trial.source, trial.status = "read", "diverged"
        trial.time_s = float(read_json(marker, "a diverged trial's record").get("time_s", 0.0))
        return trial, 0
    t0 = time.perf_counter()
    try:
        if state == "partial":
            trial.source = "resumed"
            result = train(config, resume=True)
        else:
            result = train(config)
    except TrainingDiverged as e:
        trial.status = "diverged"  # a too-high learning rate is a result of the search, not an error
        trial.time_s = time.perf_counter() - t0
        if is_main_process():
            trial.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, json.dumps({"error": str(e), "time_s": trial.time_s}, indent=2))
        return trial, config.epochs - start
    _score(trial, result.history, metric)
    trial.time_s = time.perf_counter() - t0
    return trial, len(result.history) - start


def _score(trial: Trial, history: list[dict[str, Any]], metric: str) -> None:
    """Fill the trial's score and metrics from its best epoch by ``metric``."""
    trial.status, trial.history = "ok", history
    rows = [row for row in history if row.get(metric) is not None]
    pick = max if metric == "val_acc" else min
    row = pick(rows, key=lambda row: row[metric])
    trial.score, trial.best_epoch = float(row[metric]), int(row["epoch"])
    trial.val_acc, trial.val_loss, trial.train_loss = float(row["val_acc"]), float(row["val_loss"]), float(row["train_loss"])
    if not math.isfinite(trial.score):
        trial.status, trial.score = "diverged", math.nan


TABLE_COLUMNS = ("round", "trial", "epochs", "status", "score", "val_acc", "val_loss", "train_loss", "best_epoch", "time_s", "run_dir")


def write_table(path: Path, trials: Sequence[Trial], keys: Sequence[str]) -> Path:
    """One CSV row per trial: its parameters, scores and run folder."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["round", "trial", *keys, *TABLE_COLUMNS[2:]])
    for t in trials:
        writer.writerow([t.round, t.index, *(t.params.get(k, "") for k in keys), t.epochs, t.status,
                         *(f"{v:.6g}" for v in (t.score, t.val_acc, t.val_loss, t.train_loss)), t.best_epoch,
                         f"{t.time_s:.1f}", t.run_dir])
    return atomic_write_text(path, buf.getvalue())


def plot_search(path: Path, trials: Sequence[Trial], space: Sequence[Dimension], metric: str) -> Path:
    """Score against each searched value (one panel per key, colour = round) and the last round's loss curves."""
    plt = pyplot()

    n = len(space) + 1
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    rounds = sorted({t.round for t in trials})
    colors = plt.get_cmap("viridis")
    ok = [t for t in trials if t.status == "ok"]
    for ax, dim in zip(axes[0], space):
        categories = sorted({t.params[dim.key] for t in trials}) if dim.kind == "choice" else []
        for r in rounds:
            pts = [t for t in ok if t.round == r]
            xs = [categories.index(t.params[dim.key]) if categories else float(t.params[dim.key]) for t in pts]
            ax.scatter(xs, [t.score for t in pts], color=colors(r / max(len(rounds), 1) * 0.85), label=f"round {r}", s=28)
        if categories:
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        elif dim.log:
            ax.set_xscale("log")
        ax.set_xlabel(dim.key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    ax = axes[0][-1]
    last = [t for t in ok if t.round == rounds[-1]]
    best = min(last, key=lambda t: -t.score if metric == "val_acc" else t.score) if last else None
    for t in last:
        epochs = [row["epoch"] for row in t.history]
        ax.plot(epochs, [row["val_loss"] for row in t.history], "-", lw=2.5 if t is best else 0.8,
                label=f"t{t.index:02d} val" if t is best else None)
        if t is best:
            ax.plot(epochs, [row["train_loss"] for row in t.history], "--", lw=1.5, label=f"t{t.index:02d} train")
    ax.set_title(f"round {rounds[-1]} loss curves (best bold)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if best is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return path

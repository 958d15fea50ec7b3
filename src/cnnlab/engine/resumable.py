"""Shared by the resumable multi-run commands (search trials, bagging members): run-folder states, saved arguments, progress.

A multi-run command saves its own arguments first, then runs its runs one by one. Run again
with ``resume=True`` it reloads those arguments and, run by run, reads a finished run back
(``results.json``), continues an interrupted one from its last checkpoint, or starts it.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cnnlab._errors import CnnlabError
from cnnlab.engine.checkpoint import load_checkpoint
from cnnlab.engine.config import TrainConfig, _flatten


def run_state(run_dir: Path) -> tuple[str, int]:
    """(``done``, ``partial`` or ``new``, epochs already trained): where a run folder stands."""
    if (run_dir / "results.json").is_file() and (run_dir / "last.json").is_file():
        return "done", _checkpoint_epoch(run_dir)
    if (run_dir / "last.json").is_file():
        return "partial", _checkpoint_epoch(run_dir)
    return "new", 0


def _checkpoint_epoch(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "last.json").read_text()).get("epoch", 0))
    except (ValueError, OSError):
        return 0  # a torn checkpoint: train(resume=True) names the bad file


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """A run's per-epoch rows, with the exact floats the run had in memory (its last checkpoint's JSON)."""
    return list(load_checkpoint(run_dir, "last").meta.get("history", []))


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object cnnlab wrote, or a CnnlabError naming the file and ``what`` it should be."""
    if not path.is_file():
        raise CnnlabError(f"{path.parent} holds no {path.name}: it is not {what} (or one written by an older cnnlab)")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CnnlabError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CnnlabError(f"{path} does not hold a JSON object")
    return data


def config_differences(saved: dict[str, Any], given: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """``key (saved a, given b)`` for every flattened config key whose value differs (``ignore`` skipped)."""
    a = _flatten(TrainConfig.from_dict(saved).to_dict())  # both normalised the same way (types, defaults)
    b = _flatten(TrainConfig.from_dict(given).to_dict())
    skip = set(ignore)
    return [f"{k} (saved {a.get(k)!r}, given {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if k not in skip and a.get(k) != b.get(k)]


def hms(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Elapsed time and a time-left estimate, from the seconds per epoch trained by this process.

    Args:
        total_epochs: the epochs of all planned runs (updated with :meth:`plan` when a later round is known).
    Runs read back from their folders count as done but not in the rate, so a resumed command's
    estimate is not fooled by runs that took no time now.
    """

    def __init__(self, total_epochs: int) -> None:
        self.t0 = time.perf_counter()
        self.total = total_epochs
        self.done = 0
        self.trained = 0
        self.train_s = 0.0

    def plan(self, total_epochs: int) -> None:
        self.total = total_epochs

    def finished(self, epochs: int, trained_epochs: int, seconds: float) -> None:
        """A run of ``epochs`` is done; ``trained_epochs`` of them were trained now, in ``seconds``."""
        self.done += epochs
        if trained_epochs > 0:
            self.trained += trained_epochs
            self.train_s += seconds

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        text = f"{hms(elapsed)} elapsed"
        left = max(self.total - self.done, 0)
        if left == 0:
            return text
        if self.trained == 0:
            return text + ", time left unknown yet"
        return text + f", ~{hms(left * self.train_s / self.trained)} left"

"""The search space of ``cnnlab search``: one :class:`Dimension` per searched config key, parsed from ``--param``.

    >>> from cnnlab.engine.search_space import parse_space
    >>> [d.describe() for d in parse_space(["optim.lr=loguniform(1e-3, 1)", "optim.optimizer=sgd,adamw"])]
    ['optim.lr ~ loguniform(0.001, 1)', 'optim.optimizer in {sgd, adamw}']

The search loop is :mod:`cnnlab.engine.search`, which re-exports these names; this module needs no Optuna.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cnnlab._errors import CnnlabError, did_you_mean

_RANGE = re.compile(r"^\s*(uniform|loguniform|int)\s*\(\s*([^,]+?)\s*,\s*([^,]+?)\s*\)\s*$")


@dataclass(frozen=True)
class Dimension:
    """One searched config field.

    Args:
        key: a dotted config key (``optim.lr``); kind: ``choice``, ``uniform``, ``loguniform`` or ``int``.
        low, high: the range of numeric kinds (inclusive); choices: the values of ``choice``, as
            ``--set`` text (``"sgd"``, ``'{"drop_rate": 0.3}'``).
    """

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[str, ...] = ()

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"

    def suggest(self, trial: Any) -> Any:
        """The trial's value from Optuna (a number, or the choice's text)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(round(self.low)), int(round(self.high)))
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def text(self, value: Any) -> str:
        """A value as exact ``--set`` text (``repr`` of a float round-trips)."""
        return value if self.kind == "choice" else str(int(value)) if self.kind == "int" else repr(float(value))

    def grid(self, points: int) -> list[Any]:
        """``points`` evenly spaced values (log-spaced for ``loguniform``), or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            lo, hi = int(round(self.low)), int(round(self.high))
            return list(dict.fromkeys(round(lo + (hi - lo) * i / max(points - 1, 1)) for i in range(points)))
        if points == 1:
            return [math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2]
        lo, hi = (math.log(self.low), math.log(self.high)) if self.log else (self.low, self.high)
        values = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
        # the ends exactly: exp(log(x)) can leave the range by an ulp, which Optuna refuses
        return [self.low, *(float(f"{math.exp(v) if self.log else v:.6g}") for v in values[1:-1]), self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key} in {{{', '.join(self.choices)}}}"
        return f"{self.key} ~ {self.kind}({self.low:.4g}, {self.high:.4g})"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "low": float(self.low), "high": float(self.high),
                "choices": list(self.choices)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Dimension:
        return cls(d["key"], d["kind"], float(d["low"]), float(d["high"]), tuple(d["choices"]))


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
    """Parse ``--param`` specs; keys are checked against the config when a search starts (as ``--set``)."""
    space = [parse_dimension(s) for s in specs]
    keys = [d.key for d in space]
    if not space:
        raise CnnlabError("nothing to search: give at least one --param key=range, e.g. optim.lr=loguniform(1e-3,1)")
    if len(set(keys)) != len(keys):
        raise CnnlabError(f"a key is searched twice: {', '.join(k for k in keys if keys.count(k) > 1)}")
    return space

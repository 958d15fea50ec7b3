"""Errors that speak to the user, and the 'did you mean' helper they share."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class CnnlabError(ValueError):
    """A user-facing error: says what was wrong and what was expected."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates nearest to ``name`` (difflib ratio), best first."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:  # prefix match catches 'resnet' -> resnet18, resnet34, ...
        found = [c for c in candidates if c.startswith(name[: max(3, len(name) - 1)])][:n]
    return found


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    found = closest(name, candidates)
    return f"; did you mean {', '.join(found)}?" if found else ""

"""Checking a file path the user asked a command to write, before any work is done."""
from __future__ import annotations

import os
from pathlib import Path

from cnnlab._errors import CnnlabError, did_you_mean


def figure_suffixes() -> tuple[str, ...]:
    """The suffixes matplotlib can write (png, pdf, svg, jpg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(sorted(FigureCanvasBase.get_supported_filetypes()))


def output_path(path: str | None, flag: str, figure: bool = False, suffix: str = ".txt") -> Path | None:
    """Return ``path`` as a Path ready to be written, or raise a CnnlabError naming ``flag``.

    Refuses a path that is a folder, a parent that is a file, and (``figure=True``) a suffix matplotlib cannot
    write; creates missing parent folders (as run folders are created). '' or None means "no file".
    """
    if not path:
        return None
    out = Path(path)
    if out.is_dir():
        example = out / ("plot.png" if figure else "out" + suffix)
        raise CnnlabError(f"{flag} {path} is a folder; expected a file path, e.g. {example}")
    if figure and out.suffix:
        suffix = out.suffix.lstrip(".").lower()
        known = figure_suffixes()
        if suffix not in known:
            raise CnnlabError(f"{flag} {path}: cannot write a figure as .{suffix}{did_you_mean(suffix, known)}; "
                              f"expected one of {', '.join('.' + s for s in known)}")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise CnnlabError(f"{flag} {path}: {parent} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnnlabError(f"{flag} {path}: cannot create the folder {out.parent} ({e.strerror})") from None
    if not os.access(out.parent, os.W_OK):
        raise CnnlabError(f"{flag} {path}: the folder {out.parent} is not writable")
    return out

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
    """Return ``path`` as a Path that can be written once the work is done, or raise a CnnlabError naming ``flag``.

    Refuses a path that is a folder, a parent that is a file, a missing parent that cannot be created (the nearest
    existing folder is not writable) and (``figure=True``) a suffix matplotlib cannot write. Creates nothing: a
    command that fails half-way leaves no empty folders; :func:`make_parent` creates them just before the write.
    '' or None means "no file".
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
    existing = next(p for p in (out.parent, *out.parent.parents) if p.is_dir())  # '.' or '/' at the latest
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == out.parent else f"(the nearest existing folder above {out.parent}) is"
        raise CnnlabError(f"{flag} {path}: the folder {existing} {what} not writable")
    return out


def make_parent(path: str | os.PathLike | None, flag: str) -> Path | None:
    """Create the missing folders above ``path`` (checked earlier by :func:`output_path`) right before writing it."""
    if not path:
        return None
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnnlabError(f"{flag} {path}: cannot create the folder {out.parent} ({e.strerror})") from None
    return out


def data_argument(name: str | None, flag: str) -> None:
    """A ``--data`` value that is an existing file, or a path to nothing, fails here with what is expected."""
    if not name or name.startswith(("voc:", "coco:")):  # detection readers check their own paths, naming the file
        return
    from cnnlab.data.datasets import DATASETS

    expected = f"expected a dataset name ({', '.join(DATASETS)}) or a folder with one sub-folder of images per class"
    path = Path(name)
    if path.is_file():
        raise CnnlabError(f"{flag} {name} is a file; {expected}")
    if not path.exists() and ("/" in name or os.sep in name):  # a path, not a dataset name (those are checked later)
        raise CnnlabError(f"{flag} {name}: no such folder; {expected}")

"""Atomic file writes: a file cnnlab writes is either its old version or its complete new one, never half.

Each write goes to a temporary file in the same folder, is flushed to disk, then moved into place
with ``os.replace`` (atomic on POSIX and Windows). A crash or a full disk leaves the old file.
"""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnlab._errors import CnnlabError


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; restored at once
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], *, exclusive: bool = False) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then move it over ``path``.

    ``exclusive``: never replace an existing ``path`` (a FileExistsError instead): the finished file is hard-linked
    into place, which fails atomically if another process created it first.
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the work, with an IsADirectoryError
        raise CnnlabError(f"cannot write {path}: it is a folder; expected a file path")
    if not path.parent.is_dir():
        raise CnnlabError(f"cannot write {path}: the folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the permissions open() would
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if exclusive:
            _link_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _link_exclusive(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)  # FileExistsError when it exists: the atomic test-and-create
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: test, then rename (not atomic, the best it allows)
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str, *, exclusive: bool = False) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), exclusive=exclusive)


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``fig.savefig`` through a temporary file; the format comes from ``path``'s suffix."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def _finite(value: Any) -> Any:
    """``value`` with every NaN/infinity (inside dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):  # numpy.float64 too (a float subclass)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` whose output is always valid JSON: NaN and infinities (a diverged loss) are written as null.

    Python's json writes them as the bare words ``NaN``/``Infinity``, which JSON forbids (browsers, jq and
    pandas refuse the file). ``default=`` results are cleaned the same way. The standard library has no switch
    for this (simplejson's ``ignore_nan`` does it, not worth a dependency for ten lines).
    """
    default = kwargs.pop("default", None)
    if default is not None:
        kwargs["default"] = lambda o: _finite(default(o))
    kwargs.setdefault("allow_nan", False)  # a value this function misses fails loudly instead of writing NaN
    return json.dumps(_finite(obj), **kwargs)

"""Downloading dataset files with checksums, atomically (a partial download never looks complete)."""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from cnnlab._errors import CnnlabError


def default_cache_dir() -> Path:
    """``$CNNLAB_DATA``, else ``$XDG_CACHE_HOME/cnnlab/data``, else ``~/.cache/cnnlab/data``."""
    if os.environ.get("CNNLAB_DATA"):
        return Path(os.environ["CNNLAB_DATA"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnlab" / "data"


def file_hash(path: str | os.PathLike, algorithm: str = "md5") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: Path, md5: str | None) -> bool:
    """True when ``path`` exists and matches ``md5`` (any existing file when md5 is None)."""
    return path.is_file() and (md5 is None or file_hash(path) == md5)


def download(urls: str | Sequence[str], dest: str | os.PathLike, md5: str | None = None) -> Path:
    """Fetch ``dest`` from the first URL that works and verify its md5; keep an already valid file.

    The file is written to a temporary name in the same folder and moved into place only
    after the checksum matches, so an interrupted or corrupt download leaves nothing behind.
    """
    dest = Path(dest)
    if check_file(dest, md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in [urls] if isinstance(urls, str) else urls:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                if "://" in url:
                    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (https/file URLs)
                        while chunk := response.read(1 << 20):
                            out.write(chunk)
                else:  # a local file path (mirrors, tests)
                    with open(url, "rb") as src:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
            got = file_hash(tmp)
            if md5 is not None and got != md5:
                errors.append(f"{url}: checksum mismatch (md5 {got}, expected {md5})")
                continue
            os.replace(tmp, dest)
            return dest
        except OSError as e:
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise CnnlabError(f"could not download {dest.name}:\n  " + "\n  ".join(errors))

"""matplotlib for files only: the Agg backend (no display needed) and figures saved atomically, then closed."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cnnlab._io import atomic_savefig


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: plotting is never an import-time cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix) through a temporary file, and free it."""
    try:
        atomic_savefig(fig, path, dpi=dpi)
    finally:
        pyplot().close(fig)
    return Path(path)

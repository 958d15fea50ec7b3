"""Window origins for cutting a large image into tiles: shared by the tiled datasets and tiled inference."""
from __future__ import annotations

from typing import Any

from cnnlab._errors import CnnlabError


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one side: every ``stride``, plus one aligned to the far border; one when it fits."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def check_tiling(tile_size: Any, overlap: Any, names: tuple[str, str] = ("tile_size", "overlap")) -> None:
    """A window side in pixels (int >= 1) and the share of it neighbours overlap (in [0, 1)), else an error
    that uses the caller's ``names`` for the two (a config key, a CLI flag)."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise CnnlabError(f"{names[0]} must be a positive number of pixels (the window side), got {tile_size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
        raise CnnlabError(f"{names[1]} must be a fraction of the window in [0, 1), got {overlap!r}")

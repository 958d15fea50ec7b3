"""``nuclei``: one real fluorescence-microscopy image of cell nuclei with its hand-made instance mask.

The image (``stardist/data/images/img2d.tif``, 512 x 512 grey, values 0..235 in uint16) and its instance mask
(``mask2d.tif``, one id per nucleus, 0 = background) ship inside the ``stardist`` wheel on PyPI (BSD-3 licence).
cnnlab downloads that one wheel (``pip download stardist==0.9.2 --no-deps``, about 3 MB; the manylinux
CPython 3.11 build is asked for whatever the platform, since every build carries the same data) into
``<cache>/nuclei`` and reads the two TIFFs from the zip with ``tifffile``; it never imports stardist.

The task is foreground/background (U-Net's own kind of data): label 1 (``nucleus``) where the instance id is
above 0, 0 elsewhere. The image is cut into four quadrants: the **bottom-right** one is the test set (one
256 x 256 image, so every test pixel is counted once); the other three give the training tiles (``tile`` x
``tile`` pixels every ``stride`` pixels, the last row and column aligned to the quadrant's border; tiles never
cross a quadrant's border). With ``val_fraction > 0`` the bottom ``round(val_fraction * quadrant height)`` rows
of each training quadrant are held out as three validation strips and the training tiles come from the rows
above them only, so no validation pixel is ever in a training tile.

Pixels: integers within 0..255 (the real image) are kept as they are; other ranges are scaled linearly from
their minimum and maximum to 0..255. One channel (C = 1): the models take ``in_channels``.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab._errors import CnnlabError
from cnnlab.data.datasets import default_cache_dir
from cnnlab._tiles import tile_starts

WHEEL_VERSION = "0.9.2"
WHEEL_GLOB = f"stardist-{WHEEL_VERSION}-*.whl"
# one build for every platform: only the data files are read, and every build carries the same ones
PLATFORM_ARGS = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                 "--abi", "cp311")
IMAGE_MEMBER = "stardist/data/images/img2d.tif"
MASK_MEMBER = "stardist/data/images/mask2d.tif"
CLASSES = ["background", "nucleus"]
TEST_QUADRANT = "bottom_right"
TRAIN_QUADRANTS = ("top_left", "top_right", "bottom_left")
TILE, STRIDE = 128, 32


def nuclei_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root) if root is not None else default_cache_dir() / "nuclei"


def _pip_download(dest: Path) -> None:
    """``pip download stardist==0.9.2 --no-deps`` (one fixed build) with this interpreter's pip, into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", f"stardist=={WHEEL_VERSION}", "--no-deps",
           "--only-binary=:all:", *PLATFORM_ARGS, "-d", str(dest), "--quiet"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise CnnlabError(f"cannot run pip to download stardist {WHEEL_VERSION}: {e}") from None
    except subprocess.CalledProcessError as e:
        raise CnnlabError(f"could not download stardist {WHEEL_VERSION} from PyPI (offline?): "
                          f"{e.stderr.strip()[-400:]}") from None
    except subprocess.TimeoutExpired:
        raise CnnlabError(f"downloading stardist {WHEEL_VERSION} from PyPI timed out after 600 s (offline?)") from None


def wheel_path(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The cached ``stardist-0.9.2-*.whl`` (any build), downloaded first when missing (into a temporary folder,
    then moved: whole or absent)."""
    folder = nuclei_root(root)
    found = sorted(folder.glob(WHEEL_GLOB)) if folder.is_dir() else []
    if found:
        return found[0]
    if not download:
        raise CnnlabError(f"nuclei: no {WHEEL_GLOB} in {folder} and downloading is off; get it with `pip download "
                          f"stardist=={WHEEL_VERSION} --no-deps -d {folder}`")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        _pip_download(Path(tmp))
        got = sorted(Path(tmp).glob(WHEEL_GLOB))
        if not got:
            raise CnnlabError(f"pip download left no {WHEEL_GLOB} in {tmp} (found {os.listdir(tmp)})")
        path = folder / got[0].name
        os.replace(got[0], path)
    return path


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Integers within 0..255 unchanged; anything else scaled linearly from [min, max] to 0..255 (rounded)."""
    if not np.isfinite(pixels).all():
        raise CnnlabError("the nuclei image holds NaN or infinite values; expected a grey intensity image")
    lo, hi = float(pixels.min()), float(pixels.max())
    if np.issubdtype(pixels.dtype, np.integer) and lo >= 0 and hi <= 255:
        return pixels.astype(np.uint8)
    scaled = (pixels.astype(np.float64) - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
    return np.rint(scaled).astype(np.uint8)


def read_nuclei(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 (H, W), foreground uint8 (H, W) 0/1)`` from the wheel's two TIFFs."""
    import tifffile

    def member(z: zipfile.ZipFile, name: str) -> np.ndarray:
        try:
            data = z.read(name)
        except KeyError:
            raise CnnlabError(f"{wheel} has no {name}; expected stardist {WHEEL_VERSION}'s data files") from None
        try:
            array = tifffile.imread(io.BytesIO(data))
        except Exception as e:  # tifffile raises TiffFileError, ValueError, ... on damaged files
            raise CnnlabError(f"{wheel}: {name} is not a readable TIFF ({type(e).__name__}: {e})") from None
        if array.ndim != 2:
            raise CnnlabError(f"{wheel}: {name} has shape {array.shape}; expected one 2-D (H, W) plane")
        return array

    try:
        with zipfile.ZipFile(wheel) as z:
            image, instances = member(z, IMAGE_MEMBER), member(z, MASK_MEMBER)
    except (zipfile.BadZipFile, OSError) as e:
        raise CnnlabError(f"{wheel} is not a readable wheel ({e}); delete it to download it again") from None
    if image.shape != instances.shape:
        raise CnnlabError(f"{wheel}: {MASK_MEMBER} is {instances.shape[1]}x{instances.shape[0]} but "
                          f"{IMAGE_MEMBER} is {image.shape[1]}x{image.shape[0]}; a mask must have its image's size")
    if not np.issubdtype(instances.dtype, np.integer):
        raise CnnlabError(f"{wheel}: {MASK_MEMBER} is {instances.dtype}; expected integer instance ids (0 = none)")
    return to_uint8(image), (instances > 0).astype(np.uint8)


@dataclass
class NucleiSplits:
    """Tensors of the three splits (uint8): images (N, 1, h, w), masks (N, h, w) 0/1.

    ``train_origins`` are the (row, column) of each training tile in the whole image; ``fit_images`` the
    training pixels themselves (the three training regions, without the validation strips), on which the
    normalisation is fitted (each pixel once, not once per tile that covers it).
    """

    train_images: torch.Tensor
    train_masks: torch.Tensor
    train_origins: list[tuple[int, int]]
    val_images: torch.Tensor
    val_masks: torch.Tensor
    test_images: torch.Tensor
    test_masks: torch.Tensor
    fit_images: torch.Tensor


def quadrant_bounds(height: int, width: int) -> dict[str, tuple[int, int, int, int]]:
    """``{name: (row0, row1, col0, col1)}`` of the four quadrants, each ``height // 2`` x ``width // 2`` (an odd
    image's last row or column is in none)."""
    h, w = height // 2, width // 2
    return {"top_left": (0, h, 0, w), "top_right": (0, h, w, 2 * w), "bottom_left": (h, 2 * h, 0, w),
            "bottom_right": (h, 2 * h, w, 2 * w)}


def split_nuclei(image: np.ndarray, mask: np.ndarray, tile: int = TILE, stride: int = STRIDE,
                 val_fraction: float = 0.0) -> NucleiSplits:
    """Train tiles of the three training quadrants, validation strips, and the test quadrant (module docstring)."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise CnnlabError(f"the nuclei tile size must be a positive number of pixels, got {tile!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise CnnlabError(f"the nuclei tile stride must be a positive number of pixels, got {stride!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise CnnlabError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    bounds = quadrant_bounds(*image.shape)
    tiles, tile_masks, origins, strips, strip_masks, regions = [], [], [], [], [], []
    for name in TRAIN_QUADRANTS:
        r0, r1, c0, c1 = bounds[name]
        n_val = int(round((r1 - r0) * val_fraction))
        if val_fraction and n_val == 0:
            raise CnnlabError(f"data.val_fraction={val_fraction} holds out no row of a {r1 - r0}-row quadrant")
        top = r1 - n_val  # rows r0..top train, top..r1 validate
        if top - r0 < tile or c1 - c0 < tile:
            raise CnnlabError(f"nuclei: a {tile} px tile does not fit the {top - r0} x {c1 - c0} training part of "
                              f"the {name} quadrant; use a smaller data.image_size (tile) or data.val_fraction")
        if n_val:
            strips.append(image[top:r1, c0:c1])
            strip_masks.append(mask[top:r1, c0:c1])
        regions.append(image[r0:top, c0:c1])
        for y in tile_starts(top - r0, tile, stride):
            for x in tile_starts(c1 - c0, tile, stride):
                tiles.append(image[r0 + y:r0 + y + tile, c0 + x:c0 + x + tile])
                tile_masks.append(mask[r0 + y:r0 + y + tile, c0 + x:c0 + x + tile])
                origins.append((r0 + y, c0 + x))
    r0, r1, c0, c1 = bounds[TEST_QUADRANT]

    def images(arrays: list[np.ndarray], like: tuple[int, int]) -> torch.Tensor:
        if not arrays:
            return torch.zeros((0, 1, *like), dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays)).unsqueeze(1).contiguous()

    def masks(arrays: list[np.ndarray], like: tuple[int, int]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, *like), dtype=torch.uint8)

    return NucleiSplits(
        train_images=images(tiles, (tile, tile)), train_masks=masks(tile_masks, (tile, tile)), train_origins=origins,
        val_images=images(strips, (1, 1)), val_masks=masks(strip_masks, (1, 1)),
        test_images=images([image[r0:r1, c0:c1]], (1, 1)), test_masks=masks([mask[r0:r1, c0:c1]], (1, 1)),
        fit_images=images(regions, (1, 1)),  # the quadrants share one size, so these stack
    )


def load_nuclei(root: str | os.PathLike | None = None, download: bool = True, tile: int = TILE,
                stride: int = STRIDE, val_fraction: float = 0.0) -> NucleiSplits:
    """The splits of the stardist nuclei image (the wheel downloaded into ``root`` once, then read from there)."""
    image, mask = read_nuclei(wheel_path(root, download))
    return split_nuclei(image, mask, tile, stride, val_fraction)

"""The IDX file format of MNIST and Fashion-MNIST (LeCun et al.), gzipped or not."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from cnnlab._errors import CnnlabError

# IDX type codes -> numpy dtypes (big-endian), from http://yann.lecun.com/exdb/mnist/
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}


def _open(path: Path, mode: str):
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX array (``.gz`` or raw); a malformed file raises a CnnlabError naming it."""
    path = Path(path)
    try:
        with _open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise CnnlabError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise CnnlabError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CnnlabError(f"{path} is truncated: header of {header} bytes, file has {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise CnnlabError(f"{path} has {len(data)} bytes, expected {expected} for shape {shape}: truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8/int8 array as IDX (gzipped when the name ends in .gz); used by tests and fakes."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype not in _CODES:
        raise CnnlabError(f"write_idx supports uint8 and int8 arrays, got {array.dtype}")
    header = bytes([0, 0, _CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with _open(path, "wb") as f:
        f.write(header + array.tobytes())
    return path

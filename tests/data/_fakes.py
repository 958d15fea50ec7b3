"""Small fake dataset files in the layouts torchvision reads (IDX, CIFAR pickles), for tests that never download."""
from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import io
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> Path:
    """A uint8 array as an IDX file (LeCun's format: magic 0x0000 08 <ndim>, big-endian dims), gzipped for *.gz.

    Written by hand: torchvision reads IDX but has no writer.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def idx_arrays(n_train: int = 12, n_test: int = 5, size: int = 6, seed: int = 0) -> list[np.ndarray]:
    """train images, train labels, test images, test labels (the order of ``IDX_FILES``)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (n_train, size, size), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8),
            rng.integers(0, 256, (n_test, size, size), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8)]


def cifar_archive(path: Path, members: dict[str, dict]) -> Path:
    """A tar.gz of pickled batch dicts with str keys, as the authors' Python 2 pickles read under Python 3."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@contextlib.contextmanager
def serve_folder(folder: Path):
    """An HTTP server on the loopback interface serving ``folder`` (a fake mirror): yields its base URL.

    torchvision's downloader needs an HTTP response (it reads Content-Length), so a file:// URL will not do;
    nothing leaves the machine.
    """
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines in the test output
        pass

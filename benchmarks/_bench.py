"""What the benchmarks share: the machine a figure was measured on, and a median timing."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Any

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides the fast path


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def cpu_name() -> str:
    """The CPU model ('AMD EPYC', 'Intel(R) Xeon(R) ...')."""
    name = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), "")
    return name or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The vector-unit flags of :data:`FLAGS` this CPU has, space-separated ('none of them' without any)."""
    have = set(next((ln.split(":", 1)[1].split() for ln in _cpuinfo() if ln.startswith("flags")), []))
    return " ".join(f for f in FLAGS if f in have) or "none of " + ", ".join(FLAGS)


def median_ms(fn: Any, *args: Any, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall milliseconds of ``fn(*args)`` over ``repeats`` calls after ``warmup`` (under inference_mode)."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            fn(*args)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)

"""What the benchmarks share: the machine a figure was measured on, and a median timing."""
from __future__ import annotations

import statistics
import time
from typing import Any

from cnnlab._platform import cpu_flags, cpu_name  # noqa: F401  (re-exported: every benchmark names its machine)


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

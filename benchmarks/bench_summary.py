"""Speed of ``cnnlab.summary`` and ``compare`` (issue "Seeing inside a network", goal 6).

Goals: summarising resnet152 at 224 well under 2 s; ``compare`` over 10 models under 30 s.
Run: ``.venv/bin/python benchmarks/bench_summary.py``. Timings on a shared machine are noisy:
the script reports the first call (includes building the model and warming PyTorch's meta
kernels) and the median of later calls.

Recorded results: benchmarks/RESULTS.md (2026-11-23, quiet 2-core machine: resnet152 summary
0.25 s median, compare over 10 models 0.98 s, with --bench 6.8 s).
"""
from __future__ import annotations

import statistics
import time

from cnnlab.analysis import compare, summary

COMPARE = ["alexnet", "vgg16", "googlenet", "resnet50", "resnet152", "densenet121", "mobilenet_v2",
           "shufflenet_v2_x1_0", "squeezenet1_0", "efficientnet_b0"]


def timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def main() -> None:
    first = timed(summary, "resnet152")
    later = [timed(summary, "resnet152") for _ in range(5)]
    print(f"summary('resnet152') at 3x224x224: first call {first:.2f} s, then median {statistics.median(later):.2f} s "
          f"(min {min(later):.2f} s)  [goal: well under 2 s]")
    later = [timed(summary, "resnet152", training_memory=False) for _ in range(3)]
    print(f"  without the training-memory pass: median {statistics.median(later):.2f} s")
    t = timed(compare, COMPARE)
    print(f"compare over {len(COMPARE)} models at their default inputs: {t:.2f} s  [goal: under 30 s]")
    t = timed(compare, COMPARE, bench=True, repeats=3)
    print(f"  with --bench (builds each model, 1 warm-up + 3 timed CPU forwards): {t:.2f} s")


if __name__ == "__main__":
    main()

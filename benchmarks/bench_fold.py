"""Eager CPU latency of a model before and after BatchNorm folding (``cnnlab.compress.fold_bn``).

    python benchmarks/bench_fold.py --models resnet50 mobilenet_v2 efficientnet_b0 --batch 1 8 --threads 1

Prints one Markdown row per (model, batch): median milliseconds of ``--repeats`` timed calls after
``--warmup`` calls, unfolded and folded, the speed-up, the max relative output difference, and the CPU.
"""
from __future__ import annotations

import argparse

import torch

import cnnlab
from cnnlab.compress import fold_bn
from _bench import cpu_name, median_ms  # noqa: E402  (benchmarks/_bench.py)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2", "efficientnet_b0"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {args.threads} thread(s); input {args.size}px; "
          f"median of {args.repeats} after {args.warmup} warm-up calls")
    print("| model | batch | eager ms | folded ms | speed-up | BN folded/left | max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = cnnlab.create_model(name).eval()
        folded = fold_bn(model, input_size=(3, args.size, args.size))
        for batch in args.batch:
            x = torch.randn(batch, 3, args.size, args.size)
            with torch.inference_mode():
                ref, out = model(x), folded(x)
            diff = ((ref - out).abs().max() / ref.abs().max()).item()
            timing = {"warmup": args.warmup, "repeats": args.repeats}
            eager, fast = median_ms(model, x, **timing), median_ms(folded, x, **timing)
            print(f"| {name} | {batch} | {eager:.1f} | {fast:.1f} | {eager / fast:.2f}x | "
                  f"{folded.bn_fold.num_folded}/{folded.bn_fold.num_left} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()

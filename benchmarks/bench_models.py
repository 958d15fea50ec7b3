"""Speed of cnnlab's models against torchvision's, same input, same run.

Our models run the same kernels as torchvision's, so the ratio should be ~1.0 (target: within 3%).
Timings are interleaved (ours, theirs, ours, ...) and the median is taken, so drift in machine
load hits both sides alike.

    python benchmarks/bench_models.py                          # CPU, float32
    python benchmarks/bench_models.py --device cuda --bf16 --channels-last --batch 64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import cnnlab

MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121")


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(name, weights=None)
    ours = cnnlab.create_model(name)
    cnnlab.load_weights(ours, theirs.state_dict())  # same weights: same arithmetic
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=fmt)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    results: dict[str, list[float]] = {"ours_fwd": [], "tv_fwd": [], "ours_train": [], "tv_train": []}
    models = {"ours": ours.to(device, memory_format=fmt), "tv": theirs.to(device, memory_format=fmt)}
    optims = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    def forward(m):
        m.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=args.bf16):
            m(x)

    def train_step(key):
        m = models[key]
        m.train()
        with torch.autocast(device.type, dtype=dtype, enabled=args.bf16):
            loss = torch.nn.functional.cross_entropy(m(x), target)
        loss.backward()
        optims[key].step()
        optims[key].zero_grad(set_to_none=True)

    for key in models:  # warm-up
        forward(models[key])
        train_step(key)
    for _ in range(args.repeats):
        for key in models:
            results[f"{key}_fwd"].append(timed(lambda: forward(models[key]), device))
            results[f"{key}_train"].append(timed(lambda: train_step(key), device))
    return {k: statistics.median(v) for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, batch {args.batch}, {args.size}px, bf16={args.bf16}, "
          f"channels_last={args.channels_last}, median of {args.repeats}")
    print(f"{'model':<16} {'fwd ours':>9} {'fwd tv':>9} {'ratio':>6} {'train ours':>11} {'train tv':>9} {'ratio':>6}")
    for name in args.models:
        r = bench(name, args, device)
        print(f"{name:<16} {r['ours_fwd'] * 1e3:8.1f}ms {r['tv_fwd'] * 1e3:8.1f}ms {r['ours_fwd'] / r['tv_fwd']:6.3f} "
              f"{r['ours_train'] * 1e3:10.1f}ms {r['tv_train'] * 1e3:8.1f}ms {r['ours_train'] / r['tv_train']:6.3f}")


if __name__ == "__main__":
    main()

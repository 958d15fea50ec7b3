"""The optimiser update alone: torch's default (foreach) ``optimizer.step()`` against the fused one cnnlab uses.

Each model's trainable parameters get random gradients; SGD (momentum 0.9), Adam and AdamW are stepped a few
times to warm up, then timed (median of ``--repeats`` steps, one thread unless ``--threads``). The parameters are
split into a decay group and a no-decay group, as cnnlab's ``param_groups`` does.

    python benchmarks/bench_optim.py [--models resnet18 ssd] [--threads 1] [--repeats 15]
"""
from __future__ import annotations

import argparse
import time

import torch

import cnnlab

OPTIMIZERS = {"sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), "adam": (torch.optim.Adam, {"lr": 1e-3}),
              "adamw": (torch.optim.AdamW, {"lr": 1e-3})}


def model_params(name: str) -> list[torch.nn.Parameter]:
    if name == "ssd":  # as bench_detection trains it: ResNet-18 with stem and layer1 frozen
        model = cnnlab.create_model("ssd", backbone="resnet18", num_classes=11, size=128,
                                    trainable_backbone_layers=3)
    else:
        model = cnnlab.create_model(name, num_classes=10)
    return [p for p in model.parameters() if p.requires_grad]


def step_ms(params: list[torch.nn.Parameter], name: str, fused: bool, repeats: int) -> float:
    cls, kwargs = OPTIMIZERS[name]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 1e-4},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = cls(groups, **kwargs, **({"fused": True} if fused else {}))
    for _ in range(3):
        optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["simple_cnn_bn", "resnet18", "ssd"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); median ms per optimizer.step()")
    print(f"{'model':14s} {'params':>11s} {'optimizer':9s} {'default':>8s} {'fused':>8s} {'ratio':>6s}")
    for model in args.models:
        params = model_params(model)
        for p in params:
            p.grad = torch.randn_like(p)
        count = sum(p.numel() for p in params)
        for name in OPTIMIZERS:
            slow, fast = step_ms(params, name, False, args.repeats), step_ms(params, name, True, args.repeats)
            print(f"{model:14s} {count:11,d} {name:9s} {slow:8.2f} {fast:8.2f} {slow / fast:5.1f}x")


if __name__ == "__main__":
    main()

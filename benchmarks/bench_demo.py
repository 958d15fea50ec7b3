"""The demo's budget on slow CPUs (issue 8): bare training-step cost per model, and accuracy against time.

    # emulate the 2-core AVX2 EPYC without bf16 on a newer x86 CPU (check the first lines printed)
    export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
    export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)  # with compile: never the uncapped process's kernels
    python benchmarks/bench_demo.py steps fmnist_net fmnist_fast [--contiguous] [--batch-size 256]
    python benchmarks/bench_demo.py curve --out curve.json --set model.name=fmnist_fast --set epochs=5

``steps`` times forward + backward + SGD step of each model on a fixed batch, fp32, one thread,
and reports process CPU-seconds per 60,000-image epoch (min over repeats): on a machine shared
with other jobs CPU time is steadier than wall time, and one thread has no spin-waiting. Two
threads on a quiet machine take about half of it in wall time (see benchmarks/RESULTS.md).

``curve`` trains the demo's recipe (``cnnlab.engine.recipes.demo_config``, fp32 unless ``--set amp=bf16``)
with the test split evaluated after every epoch, and writes one row per epoch (test accuracy,
training CPU-seconds and wall seconds, cumulative) to a JSON file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def report_isa() -> str:
    """What the kernels will use: ATen's vector ISA and oneDNN's (set by the environment)."""
    import os

    return (f"torch {torch.__version__}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(default)')}, threads {torch.get_num_threads()}")


def step_cost(name: str, batch_size: int, channels_last: bool, steps: int, repeats: int) -> float:
    """CPU-seconds per 60,000-image epoch of one model's bare training step (min over repeats)."""
    from cnnlab import create_model

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(name).to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch_size, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch_size,))
    best = float("inf")
    for _ in range(repeats):
        for i in range(steps + 2):
            if i == 2:  # warm-up steps excluded (oneDNN primitive creation)
                cpu = time.process_time()
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        best = min(best, (time.process_time() - cpu) / steps)
    return best * 60_000 / batch_size


def cmd_steps(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    print(report_isa(), flush=True)
    base = None
    for name in args.models:
        for cl in ([True, False] if args.contiguous else [True]):
            cost = step_cost(name, args.batch_size, cl, args.steps, args.repeats)
            base = base or cost
            print(f"{name:14s} {'channels_last' if cl else 'contiguous   '} batch {args.batch_size}: "
                  f"{cost:6.1f} CPU-s/epoch (1 thread)  {cost / base:.2f}x the first", flush=True)


def cmd_curve(args: argparse.Namespace) -> None:
    from cnnlab.engine.recipes import demo_config
    from cnnlab.engine import apply_overrides, train

    try:
        from cnnlab.data.bundle import build_data
    except ImportError:  # older tree
        from cnnlab.engine.data_setup import build_data

    if args.threads:
        torch.set_num_threads(args.threads)
    print(report_isa(), flush=True)
    config = demo_config()
    config.amp, config.device, config.quiet, config.plots = "none", "cpu", True, False
    config.out_dir, config.name = tempfile.mkdtemp(prefix="bench_demo-"), "curve"
    apply_overrides(config, args.overrides)
    data = build_data(config.data, torch.device("cpu"), seed=config.seed, channels_last=config.model.channels_last,
                      in_channels=1)
    data = dataclasses.replace(data, val=data.test)  # the test split after every epoch: the curve
    rows: list[dict] = []
    wall0 = time.perf_counter()
    cum = {"cpu": 0.0, "wall": 0.0}

    def record(row: dict) -> None:
        cum["cpu"] += row["cpu_s"]
        cum["wall"] += row["time_s"]
        rows.append({"epoch": row["epoch"], "test_acc": row["val_acc"], "train_cpu_s": round(cum["cpu"], 1),
                     "train_wall_s": round(cum["wall"], 1), "since_start_s": round(time.perf_counter() - wall0, 1)})
        print(json.dumps(rows[-1]), flush=True)

    result = train(config, callbacks=[record], data=data)
    out = {"config": {k: v for k, v in config.to_dict().items() if k in ("model", "data", "optim", "epochs", "amp")},
           "isa": report_isa(), "rows": rows, "final_test_acc": rows[-1]["test_acc"], "wall_s": result.wall_s}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"final test accuracy {rows[-1]['test_acc']:.4f}; {result.wall_s:.0f} s wall", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("steps", help="bare training-step cost per model")
    s.add_argument("models", nargs="+")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--contiguous", action="store_true", help="also time contiguous (NCHW) memory")
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--repeats", type=int, default=3)
    s.set_defaults(func=cmd_steps)
    c = sub.add_parser("curve", help="the demo's recipe with the test accuracy after every epoch")
    c.add_argument("--out", required=True)
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--threads", type=int, default=0)
    c.set_defaults(func=cmd_curve)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())

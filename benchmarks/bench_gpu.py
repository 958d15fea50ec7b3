"""GPU targets of the training issue: Fashion-MNIST time-to-accuracy, and ResNet-50 throughput with MFU.

    python benchmarks/bench_gpu.py fmnist [--preset 94|95|demo] [--seeds 0 1 2] [--set KEY=VALUE ...]
    python benchmarks/bench_gpu.py resnet50 [--batch 256] [--steps 30]
    python benchmarks/bench_gpu.py smoke          # both paths, tiny, on the CPU: checks the script runs

``fmnist`` runs ``cnnlab.engine.train`` (the same engine as ``cnnlab train``: data resident on the
device, batched augmentation, bf16, channels_last, ``torch.compile``) on the 60,000 training images
and tests on the official 10,000. "Training time" is the sum of the epochs' own clocks (each ends
with a device sync), so it excludes the checkpoint writes and the final test pass, which are
reported with the whole call. A first untimed run of one epoch compiles the network, so the timed
runs read inductor's caches; the first timed epoch still re-traces (dynamo), and the table also
shows the steady-state estimate (median epoch x epochs) that leaves that out.

``resnet50`` measures training images/s at 224x224 on random images resident on the GPU, 1000
classes, SGD, the same batches for every loop:

- cnnlab: ``train()`` on ``resnet50`` with bf16 autocast, channels_last, ``torch.compile``, fused SGD;
- torchvision eager fp32: ``torchvision.models.resnet50()`` in the textbook loop (the reference of
  the target: cnnlab >= 1.4x);
- torchvision eager bf16 + channels_last: what the same tricks give without compile.

MFU = images/s x 6 x MACs per image / peak dense bf16 FLOP/s of the device (forward 2 x MACs,
backward 4 x MACs; MACs from ``cnnlab.summary``; the peak from the device name or ``--peak-tflops``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

# dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2}

# recipes for the time-to-accuracy targets; the 94/95 ones are starting points to tune on the device
PRESETS = {
    "demo": dict(model="fmnist_net", options={}, epochs=9, batch=256, lr=0.15),
    "94": dict(model="wrn", options={"depth": 10, "widen_factor": 4, "block_drop_rate": 0.0}, epochs=10, batch=512, lr=0.4),
    "95": dict(model="wrn", options={"depth": 16, "widen_factor": 4, "block_drop_rate": 0.0}, epochs=18, batch=512, lr=0.4),
}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # the most specific name first
        if all(part in name for part in key.split()):
            return PEAK_TFLOPS[key] * 1e12
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmnist_config(preset: str, seed: int, device: str, overrides: list[str], out_dir: str):
    from cnnlab.engine import apply_overrides
    from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

    p = PRESETS[preset]
    config = TrainConfig(
        model=ModelConfig(name=p["model"], options=dict(p["options"]), channels_last=True, compile=device != "cpu"),
        data=DataConfig(name="fashion_mnist", batch_size=p["batch"], eval_batch_size=2000, flip=True, crop_padding=2),
        optim=OptimConfig(lr=p["lr"], label_smoothing=0.1, weight_decay=5e-4),
        epochs=p["epochs"], seed=seed, device=device, amp="auto", tta_flip=True, out_dir=out_dir,
        name=f"{preset}-seed{seed}-{time.time_ns()}", plots=False, quiet=True)
    return apply_overrides(config, overrides)


def bench_fmnist(args: argparse.Namespace) -> None:
    from cnnlab.engine import train

    with tempfile.TemporaryDirectory() as out:
        warm = fmnist_config(args.preset, 0, args.device, args.set + ["epochs=1"], out)
        t0 = time.perf_counter()
        train(warm)  # compile once; not timed
        print(f"warm-up (compile + 1 epoch): {time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        for seed in args.seeds:
            config = fmnist_config(args.preset, seed, args.device, args.set, out)
            t0 = time.perf_counter()
            result = train(config)
            call = time.perf_counter() - t0
            epochs = [r["time_s"] for r in result.history]
            rows.append((seed, result.test.accuracy, sum(epochs), statistics.median(epochs) * len(epochs), call))
            print(f"seed {seed}: test {result.test.accuracy:.2%}  training {sum(epochs):.2f} s  "
                  f"(steady {rows[-1][3]:.2f} s, first epoch {epochs[0]:.2f} s)  whole call {call:.1f} s", flush=True)
    p = PRESETS[args.preset]
    print(f"\npreset {args.preset}: {p['model']} {p['options']} {config.epochs} epochs, batch {config.data.batch_size}, "
          f"overrides {args.set or 'none'}, {device_name(torch.device(args.device))}")
    print("| seed | test accuracy | training s | steady-state s | whole call s |\n|---|---|---|---|---|")
    for seed, acc, t, steady, call in rows:
        print(f"| {seed} | {acc:.2%} | {t:.2f} | {steady:.2f} | {call:.1f} |")
    accs = [r[1] for r in rows]
    print(f"mean {statistics.mean(accs):.2%}, min {min(accs):.2%} over {len(accs)} seeds; "
          f"median training {statistics.median(r[2] for r in rows):.2f} s")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else "CPU"


def random_images(n: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, device=device, dtype=torch.uint8)
    return images, torch.randint(0, 1000, (n,), generator=g, device=device)


def eager_loop(model, batches, device: torch.device, amp: bool, channels_last: bool, warmup: int) -> float:
    """The textbook loop over the same device-resident batches; images/s after ``warmup`` steps."""
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)
    seen, start = 0, None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            sync(device)
            start, seen = time.perf_counter(), 0
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    sync(device)
    return seen / (time.perf_counter() - start)


def bench_resnet50(args: argparse.Namespace) -> None:
    import torchvision

    from cnnlab.analysis import summary
    from cnnlab.data.augment import Compose, RandomFlip
    from cnnlab.data.loader import TensorLoader
    from cnnlab.data.preprocess import Normalize
    from cnnlab.engine import train
    from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
    from cnnlab.engine.data_setup import DataBundle

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    images, labels = random_images(args.batch * args.steps, args.size, device)
    norm = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet statistics

    def loader(channels_last: bool, seed: int = 0) -> TensorLoader:
        return TensorLoader(images, labels, args.batch, shuffle=True, drop_last=True, transform=Compose([RandomFlip()]),
                            preprocess=norm, channels_last=channels_last, seed=seed)

    results = {}
    torch.manual_seed(0)
    results["torchvision eager fp32"] = eager_loop(torchvision.models.resnet50(), loader(False), device, False, False,
                                                   args.warmup)
    torch.manual_seed(0)
    results["torchvision eager bf16 + channels_last"] = eager_loop(torchvision.models.resnet50(), loader(True), device,
                                                                   device.type == "cuda", True, args.warmup)
    bundle = DataBundle(train=loader(True), val=None, test=TensorLoader(images[:args.batch], labels[:args.batch], args.batch),
                        classes=[str(i) for i in range(1000)], input_shape=(3, args.size, args.size), preprocess=norm,
                        preprocess_state={"kind": "standard", "mean": list(norm.mean), "std": list(norm.std)})
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(model=ModelConfig(name="resnet50", channels_last=True, compile=not args.no_compile),
                             data=DataConfig(batch_size=args.batch), optim=OptimConfig(lr=0.1, schedule="cosine"),
                             epochs=args.epochs, device=str(device), amp="auto", out_dir=out, name="resnet50", plots=False,
                             quiet=True)
        history = train(config, data=bundle).history
    # epoch 1 holds compilation (and the first epoch's warm-up); the best later epoch is the steady state
    results[f"cnnlab train (bf16, channels_last{'' if args.no_compile else ', compile'}, fused SGD)"] = max(
        r["images_per_s"] for r in history[1:])
    macs = summary("resnet50", (3, args.size, args.size), training_memory=False).totals.macs
    peak = peak_flops(device, args.peak_tflops)
    base = results["torchvision eager fp32"]
    print(f"ResNet-50 at {args.size}x{args.size}, batch {args.batch}, {args.steps} steps per pass, "
          f"{device_name(device)}; {macs / 1e9:.2f} GMACs per image")
    print("| loop | images/s | vs eager fp32 | MFU |\n|---|---|---|---|")
    for name, speed in results.items():
        mfu = f"{speed * 6 * macs / peak:.1%}" if peak else "n/a (give --peak-tflops)"
        print(f"| {name} | {speed:,.0f} | {speed / base:.2f}x | {mfu} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("fmnist", "resnet50", "smoke"))
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", choices=sorted(PRESETS), default="94")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (fmnist)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30, help="batches per pass (resnet50)")
    p.add_argument("--epochs", type=int, default=3, help="passes of cnnlab train; the first compiles (resnet50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps of the eager loops (resnet50)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, when its name is not in the table")
    args = p.parse_args()
    if args.what == "smoke":  # a few seconds on the CPU: every code path of both benchmarks
        args.device, args.batch, args.steps, args.size, args.epochs, args.warmup = "cpu", 4, 3, 64, 2, 1
        args.no_compile, args.seeds, args.preset = True, [0], "demo"
        args.set += ["data.name=mnist_5k", "data.train_limit=256", "data.flip=false", "epochs=2"]
        bench_fmnist(args)
        bench_resnet50(args)
    elif args.what == "fmnist":
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        bench_fmnist(args)
    else:
        bench_resnet50(args)


if __name__ == "__main__":
    main()

"""int8 post-training static quantisation on the CPU: fp32 eager PyTorch vs ONNX Runtime int8 vs torchao PT2E int8.

    python benchmarks/bench_quantize.py --models fmnist_net resnet18 --epochs 1 --threads 2
    python benchmarks/bench_quantize.py --run runs/demo --threads 2      # an existing Fashion-MNIST run folder

Each model is trained briefly on Fashion-MNIST with the demo's recipe (``demo_config``; ``--epochs``,
``--train-limit`` shorten it), or taken from ``--run``. Calibration: ``--calibration-batches`` batches of 32
training images (not augmented). Prints one Markdown row per (model, path, batch): median latency (ms) of
``--repeats`` calls after warm-up, speed-up over fp32 eager, the Fashion-MNIST test accuracy of that path
(whole test split) and the share of test images where its top-1 class is fp32's. Issue 12 item 3 target: int8
>= 2x faster than fp32 eager at batch 1 and 32, <= 0.5 points lost.
"""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from _bench import cpu_flags, cpu_name, median_ms  # noqa: E402  (benchmarks/_bench.py)


def _train(name: str, epochs: int, train_limit: int | None, out_dir: Path, threads: int, image_size: int,
           lr: float | None) -> Path:
    from cnnlab.engine.recipes import demo_config
    from cnnlab.engine.trainer import train

    config = demo_config()
    config.model = dataclasses.replace(config.model, name=name)
    config.epochs = epochs
    if lr is not None:
        config.optim.lr = lr
    config.data.train_limit = train_limit or 0
    if not name.startswith("fmnist"):  # the ResNets take >= 32 px: Fashion-MNIST resized, as for `cnnlab train`
        config.data.image_size = image_size
    config.out_dir, config.name, config.quiet, config.plots, config.device = str(out_dir), name, True, False, "cpu"
    config.threads = threads
    config.time_budget = 0.0  # the demo's 300 s guard is set by cmd_demo, not the recipe
    t0 = time.time()
    train(config)
    print(f"trained {name}: {epochs} epoch(s) in {time.time() - t0:.0f} s")
    return out_dir / name


def _predictions(fn, x: torch.Tensor, bs: int = 500) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([torch.as_tensor(fn(x[i:i + bs])).argmax(1) for i in range(0, len(x), bs)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fmnist_net", "resnet18"])
    p.add_argument("--run", nargs="*", default=[], help="existing Fashion-MNIST run folders instead of training")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-limit", type=int, default=None, help="train on this many images (stratified)")
    p.add_argument("--image-size", type=int, default=32, help="resize Fashion-MNIST to this for non-fmnist models")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the demo recipe's)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--method", default="minmax", help="ORT activation calibration: minmax, percentile or entropy")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--no-pt2e", action="store_true", help="skip torchao (its torch.compile takes minutes)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    from cnnlab.compress.quantize import calibration_batches, quantize_onnx, quantize_pt2e
    from cnnlab.data.bundle import build_data
    from cnnlab.engine.runs import load_run
    from cnnlab.export import to_onnx

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"CPU: {cpu_name()} ({cpu_flags()}); torch {torch.__version__}, onnxruntime {ort.__version__}; "
          f"{args.threads} thread(s); load at start: {load}")
    work = Path(tempfile.mkdtemp(prefix="bench_quantize."))
    runs = [Path(r) for r in args.run] or [_train(m, args.epochs, args.train_limit, work, args.threads,
                                                  args.image_size, args.lr)
                                           for m in args.models]
    rows = []
    for run_dir in runs:
        run = load_run(run_dir)
        model = run.model.eval()
        data = build_data(run.config.data, torch.device("cpu"), seed=run.config.seed, in_channels=run.input_shape[0])
        xs, ys = zip(*[(x.float().contiguous(), y) for x, y in data.test])
        x_test, y_test = torch.cat(xs), torch.cat(ys)
        cal = calibration_batches(run, n_batches=args.calibration_batches, batch_size=32)
        fp32_path, int8_path = work / f"{run_dir.name}.fp32.onnx", work / f"{run_dir.name}.int8.onnx"
        to_onnx(model, fp32_path, input_size=run.input_shape, overwrite=True)
        q = quantize_onnx(fp32_path, int8_path, cal, overwrite=True, method=args.method)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        sess = ort.InferenceSession(str(int8_path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        paths = {"fp32 eager": lambda x: model(x),
                 "ORT int8": lambda x: sess.run(None, {name: x.numpy()})[0]}
        if not args.no_pt2e:
            t0 = time.time()
            lowered = quantize_pt2e(model, cal)
            for b in args.batch:  # compile for each batch size before timing (dynamic batch)
                lowered(x_test[:b])
            print(f"{run_dir.name}: torchao PT2E quantise + compile {time.time() - t0:.0f} s")
            paths["torchao int8 (compiled)"] = lambda x: lowered(x)
        pred = {k: _predictions(fn, x_test) for k, fn in paths.items()}
        acc = {k: float((p == y_test).float().mean()) for k, p in pred.items()}
        agree = {k: float((p == pred["fp32 eager"]).float().mean()) for k, p in pred.items()}
        for b in args.batch:
            x = x_test[:b].contiguous()
            base = None
            for k, fn in paths.items():
                ms = median_ms(fn, x, warmup=args.warmup, repeats=args.repeats)
                base = base or ms
                rows.append((run.config.model.name, k, b, ms, base / ms, acc[k], acc["fp32 eager"] - acc[k], agree[k]))
        print(f"{run_dir.name}: ONNX fp32 {q.fp32_size_bytes / 1e6:.2f} MB, int8 {q.size_bytes / 1e6:.2f} MB "
              f"({q.ratio:.2f}x)")
    print("\n| model | path | batch | median ms | speed-up vs fp32 eager | test acc | points lost | top-1 = fp32's |")
    print("|---|---|---|---|---|---|---|---|")
    for m, k, b, ms, sp, a, lost, ag in rows:
        print(f"| {m} | {k} | {b} | {ms:.2f} | {sp:.2f}x | {a:.4f} | {100 * lost:+.2f} | {ag:.4f} |")
    met = {}
    for m, k, b, ms, sp, a, lost, _ in rows:
        if k != "fp32 eager":
            met.setdefault((m, k), []).append(sp >= 2 and 100 * lost <= 0.5)
    for (m, k), ok in met.items():
        print(f"target (>= 2x at every batch, <= 0.5 points lost) {m} {k}: {'MET' if all(ok) else 'NOT met'}")
    print(f"load at end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()

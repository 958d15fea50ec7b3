"""Binary networks and Deep Compression's pruning + weight sharing on Fashion-MNIST (cnnlab.compress).

    python benchmarks/bench_binary_sharing.py --model fmnist_net --epochs 3 --train-limit 12000 --threads 1

Trains, with the engine and the same recipe, the full-precision model, its binary-weight copy (BWN) and its
XNOR copy (first conv and classifier kept real), each from scratch for ``--epochs``; then Deep Compression
on the full-precision model: magnitude pruning per layer (``torch.nn.utils.prune``, conv ``--prune-conv``,
linear ``--prune-linear``), one epoch of retraining under the masks, pruning made permanent, weight sharing
(5-bit conv / 4-bit linear codebooks by default) and one epoch of codebook fine-tuning. Prints Markdown
tables (test accuracy on the official 10,000 test images, weight storage, compression per stage) and
the CPU; ``--json FILE`` saves the numbers; ``--no-binary`` runs the Deep Compression part only.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch
import torch.nn.utils.prune as prune
from torch import nn

import cnnlab
from cnnlab.compress.binary import binarize, binary_storage_bytes
from cnnlab.compress.sharing import SharingConfig, compression_report, share_weights
from cnnlab.engine import DataConfig, ModelConfig, OptimConfig, TrainConfig, evaluate, train
from cnnlab.engine.data_setup import build_data
from _bench import cpu_name, cpu_flags  # noqa: E402  (benchmarks/_bench.py)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist_net")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-limit", type=int, default=12000, help="training images (0 = all 60,000)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--optimizer", default="adam", help="the same for every run (binary nets train best with Adam)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--prune-conv", type=float, default=0.6)
    p.add_argument("--prune-linear", type=float, default=0.8)
    p.add_argument("--conv-bits", type=int, default=5)
    p.add_argument("--linear-bits", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-binary", action="store_true", help="train the full-precision model only, then compress it")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = tempfile.mkdtemp(prefix="bench_binary_sharing_")

    def config(name: str, epochs: int, lr: float) -> TrainConfig:
        return TrainConfig(model=ModelConfig(name=args.model, channels_last=False),
                           data=DataConfig(name="fashion_mnist", batch_size=args.batch, flip=True,
                                           train_limit=args.train_limit),
                           optim=OptimConfig(optimizer=args.optimizer, lr=lr, weight_decay=0.0 if args.optimizer == "adam"
                                             else 5e-4), epochs=epochs, out_dir=out_dir, name=name, quiet=True,
                           plots=False, device="cpu", threads=args.threads, seed=args.seed)

    base = config("fp32", args.epochs, args.lr)
    data = build_data(base.data, torch.device("cpu"), seed=args.seed, channels_last=False, in_channels=1)

    def accuracy(model: nn.Module) -> float:
        return 100 * evaluate(model, data.test, data.num_classes).accuracy

    def run(name: str, model: nn.Module, epochs: int, lr: float) -> tuple[nn.Module, float, float]:
        result = train(config(name, epochs, lr), model=model, data=data)
        return result.model, 100 * result.test.accuracy, result.cpu_s  # CPU-s: the machine may be shared

    print(f"CPU: {cpu_name()} ({cpu_flags()}); torch {torch.__version__}; {args.threads} thread(s); {args.model}; "
          f"Fashion-MNIST, {args.train_limit or 60000} training images, {args.epochs} epochs, batch {args.batch}, "
          f"{args.optimizer} lr {args.lr} one-cycle, flip; test = official 10,000 images", flush=True)
    numbers: dict = {"cpu": cpu_name(), "flags": cpu_flags(), "args": vars(args)}

    torch.manual_seed(args.seed)
    fresh = cnnlab.create_model(args.model, num_classes=10)
    rows = []
    for mode in ("fp32",) if args.no_binary else ("fp32", "bwn", "xnor"):
        model = fresh if mode == "fp32" else binarize(fresh, mode=mode)  # the same initial weights
        trained, acc, wall = run(mode, model, args.epochs, args.lr)
        storage = binary_storage_bytes(trained)
        rows.append((mode, acc, wall, storage))
        numbers[mode] = {"accuracy": acc, "cpu_s": wall, "binary_layer_ratio": storage.ratio,
                         "model_ratio": storage.total_ratio, "binary_layers": len(storage.layers)}
        if mode == "fp32":
            full = trained
        print(f"  {mode}: {acc:.2f}% in {wall:.0f} CPU-s", flush=True)
    print("\n| model | test accuracy | weight storage of the binary layers | whole model | train CPU-s |")
    print("|---|---|---|---|---|")
    for mode, acc, wall, s in rows:
        if s.layers:
            layers = f"{s.fp32_bits / 8192:.1f} -> {s.binary_bits / 8192:.1f} KiB ({s.ratio:.1f}x, {len(s.layers)} layers)"
        else:
            layers = "-"
        total = (s.fp32_bits + s.other_bits) / 8192, (s.binary_bits + s.other_bits) / 8192
        print(f"| {mode} | {acc:.2f}% | {layers} | {total[0]:.1f} -> {total[1]:.1f} KiB ({s.total_ratio:.1f}x) | {wall:.0f} |")

    # Deep Compression: prune -> retrain under the mask -> share -> fine-tune the codebooks
    pruned = full.to(memory_format=torch.contiguous_format)
    for module in pruned.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            amount = args.prune_linear if isinstance(module, nn.Linear) else args.prune_conv
            prune.l1_unstructured(module, "weight", amount=amount)
    acc_pruned = accuracy(pruned)
    pruned, acc_retrained, wall_retrain = run("pruned", pruned, 1, args.lr / 10)
    for module in pruned.modules():
        if prune.is_pruned(module) and hasattr(module, "weight_orig"):
            prune.remove(module, "weight")
    shared = share_weights(pruned, config=SharingConfig(conv_bits=args.conv_bits, linear_bits=args.linear_bits))
    acc_shared = accuracy(shared)
    shared, acc_tuned, wall_tune = run("shared", shared, 1, args.lr / 10)
    report = compression_report(shared)
    print(f"\nDeep Compression (prune conv {args.prune_conv:.0%} / linear {args.prune_linear:.0%}, share "
          f"{args.conv_bits}/{args.linear_bits} bits): fp32 {numbers['fp32']['accuracy']:.2f}% -> pruned {acc_pruned:.2f}% "
          f"-> retrained 1 epoch {acc_retrained:.2f}% -> shared {acc_shared:.2f}% -> codebook fine-tuned 1 epoch "
          f"{acc_tuned:.2f}% ({wall_retrain:.0f} + {wall_tune:.0f} CPU-s)\n")
    print(report.table())
    kib = 8192
    stages = {stage: report.total(stage) / kib for stage in ("original", "pruned", "shared", "huffman")}
    print("\nstages (conv/linear weights): " + ", ".join(
        f"{k} {v:.1f} KiB ({stages['original'] / v:.1f}x)" for k, v in stages.items()))
    numbers["deep_compression"] = {
        "accuracy": {"fp32": numbers["fp32"]["accuracy"], "pruned": acc_pruned, "retrained": acc_retrained,
                     "shared": acc_shared, "fine_tuned": acc_tuned},
        "kib": stages, "ratio": report.ratio, "model_ratio": report.model_ratio,
        "layers": [vars(layer) for layer in report.layers]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)


if __name__ == "__main__":
    main()

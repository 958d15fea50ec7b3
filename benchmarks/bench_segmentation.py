"""Every segmentation model on fashion_seg: parameters, MACs, CPU latency and the mIoU a short budget reaches.

    OMP_NUM_THREADS=1 python benchmarks/bench_segmentation.py measure --json seg_measure.json
    OMP_NUM_THREADS=1 python benchmarks/bench_segmentation.py train --seconds 60 --json seg_train.json [--only unet ...]

``measure``: parameters and MACs (``cnnlab.summary``) at fashion_seg's 1 x 128 x 128 input, median CPU latency at
batch 1 (inference mode, ``torch.set_num_threads(--threads)``). ``train``: each variant through the engine
(``cnnlab.engine.train`` with ``time_budget``, AdamW, one-cycle, bf16 autocast, horizontal flips, batch 16), its
validation and test splits cut to the first ``--val``/``--test`` canvases so that evaluating a heavy model does not
eat the budget (the engine's budget includes evaluation); mIoU is the engine's dataset-level mIoU on those test
canvases (``SegmentationMetrics``: one confusion matrix over the subset, absent classes excluded).

``unet_bilinear`` is the small padded U-Net with each 2x2 stride-2 up-conv replaced by bilinear x2 + a 1x1 conv to
the same width (``unet(up="bilinear")``, same decoder otherwise): the bilinear-vs-transposed comparison of
docs/upsampling.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import cpu_flags, cpu_name, median_ms  # noqa: E402

NUM_CLASSES, SIZE = 11, 128
SMALL_UNET = {"padding": "same", "channels": [16, 32, 64, 128, 256]}
# name -> (registered model, options, why this variant). Light backbones where the paper's would not train in the
# budget at one thread; fcn_resnet50 / deeplabv3_resnet50 have a fixed ResNet-50 layout (no backbone option).
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "fcn32s": ("fcn32s", {"backbone": "vgg11", "fc_channels": 512}, "VGG-11, fc6/fc7 512 wide (VGG-16/4096 too slow)"),
    "fcn16s": ("fcn16s", {"backbone": "vgg11", "fc_channels": 512}, "VGG-11, fc 512"),
    "fcn8s": ("fcn8s", {"backbone": "vgg11", "fc_channels": 512}, "VGG-11, fc 512"),
    "fcn": ("fcn", {"backbone": "resnet18"}, "ResNet-18 dilated, output stride 8"),
    "fcn_resnet50": ("fcn_resnet50", {}, "torchvision layout (ResNet-50, OS 8)"),
    "deconvnet": ("deconvnet", {"backbone": "vgg11_bn", "fc_channels": 512, "fc_kernel": 4},
                  "VGG-11-BN, fc6 4x4 (the 4x4 map at 128 px), fc 512"),
    "segnet": ("segnet", {"backbone": "vgg11_bn"}, "VGG-11-BN encoder"),
    "unet": ("unet", SMALL_UNET, "padded, widths 16-256 (paper's layout at 1/4 width)"),
    "unet_resnet18": ("unet", {"backbone": "resnet18"}, "smp-style decoder on ResNet-18"),
    "pspnet": ("pspnet", {"backbone": "resnet18"}, "ResNet-18"),
    "deeplabv3": ("deeplabv3", {"backbone": "resnet18", "output_stride": 16}, "ResNet-18, OS 16"),
    "deeplabv3_resnet50": ("deeplabv3_resnet50", {}, "torchvision layout (ResNet-50, OS 8)"),
    "deeplabv3plus": ("deeplabv3plus", {"backbone": "resnet18"}, "ResNet-18, OS 16"),
    "unet_bilinear": ("unet", {**SMALL_UNET, "up": "bilinear"}, "small padded U-Net, up-convs -> bilinear x2 + 1x1 conv"),
}


def build(key: str) -> nn.Module:
    from cnnlab import create_model

    name, options, _ = VARIANTS[key]
    return create_model(name, num_classes=NUM_CLASSES, in_channels=1, **options)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out["out"] if isinstance(out, dict) else out


def measure(keys: list[str], threads: int) -> list[dict]:
    import cnnlab

    torch.set_num_threads(threads)
    rows = []
    for key in keys:
        row = {"variant": key, "model": VARIANTS[key][0], "options": VARIANTS[key][1], "why": VARIANTS[key][2]}
        try:
            model = build(key).eval()
            s = cnnlab.summary(model, (1, SIZE, SIZE))
            x = torch.randn(1, 1, SIZE, SIZE)
            out = _logits(model, x)
            assert out.shape == (1, NUM_CLASSES, SIZE, SIZE), out.shape
            row.update(params=int(s.totals.params), macs=int(s.totals.macs), latency_ms=round(median_ms(_logits, model, x), 2))
        except Exception as e:  # a variant that does not build is recorded, not fatal
            row["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _subset_bundle(config, seed: int, n_val: int, n_test: int):
    # fashion_seg's bundle as the engine builds it (same normalisation fitted on all train canvases, same
    # augmentation), with val/test cut to their first canvases
    from cnnlab.data import fashion_seg as FS
    from cnnlab.data import segmentation_data as SD

    splits = FS.load_fashion_seg(FS.FASHION_SEG_CONFIG, root=config.root, download=config.download)
    splits["val"] = tuple(t[:n_val] for t in splits["val"])
    splits["test"] = tuple(t[:n_test] for t in splits["test"])
    return SD._tensor_bundle(config, torch.device("cpu"), seed, splits, FS.FASHION_SEG_CLASSES, splits["train"][0],
                             SD.segmentation_augment(config, grey=True))


def train_one(key: str, seconds: float, args: argparse.Namespace) -> dict:
    from cnnlab.engine import DataConfig, ModelConfig, OptimConfig, TrainConfig, apply_overrides, train

    name, options, why = VARIANTS[key]
    config = TrainConfig(
        model=ModelConfig(name=name, options={**options, "in_channels": 1}),
        data=DataConfig(name="fashion_seg", batch_size=args.batch, flip=True, num_workers=0),
        optim=OptimConfig(optimizer="adamw", lr=args.lr), epochs=100, device="cpu", amp="bf16",
        threads=args.threads, time_budget=seconds, out_dir=args.out_dir, name=f"{key}-{int(seconds)}s",
        plots=False, quiet=True)
    if args.set:
        apply_overrides(config, args.set)  # model.options.backbone_weights=RUN and the like
    bundle = _subset_bundle(config.data, config.seed, args.val, args.test)
    t0 = time.perf_counter()
    res = train(config, data=bundle)
    m = res.test.metrics
    epochs = res.history[-1].get("epoch") if res.history else None
    return {"variant": key, "why": why, "seconds": seconds, "wall_s": round(time.perf_counter() - t0, 1),
            "epochs": epochs, "train_images_per_s": res.history[-1].get("images_per_s") if res.history else None,
            "test_miou": round(float(m.get("miou", float("nan"))), 4),
            "test_pixel_acc": round(float(m.get("pixel_acc", float("nan"))), 4),
            "run_dir": str(res.run_dir), "uptime": os.popen("uptime").read().strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["measure", "train"])
    p.add_argument("--only", nargs="*", default=None, help="variants (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--out-dir", default="runs/bench_segmentation")
    p.add_argument("--json", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig override for train (repeatable), e.g. model.options.backbone_weights=RUN")
    args = p.parse_args()
    keys = args.only or list(VARIANTS)
    header = {"cpu": cpu_name(), "flags": cpu_flags(), "threads": args.threads, "torch": torch.__version__}
    if args.what == "measure":
        rows = measure(keys, args.threads)
    else:
        rows = []
        for key in keys:
            try:
                row = train_one(key, args.seconds, args)
            except Exception as e:
                row = {"variant": key, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**header, "rows": rows}, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()

"""The notes' claims about the two-stage family, measured on this CPU: latency per stage, and mAP per budget.

``latency``: per-image inference time at batch 1 of R-CNN, SPP-net, Fast R-CNN and Faster R-CNN on one backbone
and the same images, eval mode, ``torch.inference_mode``, random-init weights (latency does not depend on them,
except through how many boxes pass ``box_score_thresh`` into NMS: every model keeps the default 0.05 and 100
detections per image, and the table reports the detections kept). The proposal stage (selective search fast and
quality, the grid) is timed apart from the network stage; the network stage is split by forward hooks into
backbone / RPN / RoI pooling (R-CNN: crop-and-warp) / box head (R-CNN: the whole CNN per region) / the rest
(transform, per-class NMS, mapping boxes back). Both process CPU time (``time.process_time``; with one torch and
one OpenCV thread it is the work done, nearly independent of other jobs on the machine) and wall time are kept;
the first call of each model is a warm-up and is not counted; the table gives medians over the images.

Two image sets: ``canvas`` (fashion_det test canvases, 128 x 128 grey, run at ``--min-size``, default their own
128 px) and ``real`` (500 x 375 windows of the ``trees`` validation crop, NEON aerial RGB, from the cached
deepforest wheel; tiled fashion_det canvases if the wheel is absent), run at ``--real-min-size`` (default 375,
their own size; the papers use 600).

R-CNN runs its CNN on every region (warped to the classifier's 224 px): at 2,000 regions that is minutes per
image on this CPU, so it gets ``--rcnn-proposals`` regions (default 100 and 200; selective-search boxes, padded
with grid windows to exactly that count); its time at 2,000 is extrapolated linearly from those two counts
(the table says so), and the two per-region costs show whether the cost is linear.

Proposal counts: SPP-net and Fast R-CNN get every selective-search (fast) box of the image (at most 2,000), and
Fast R-CNN is timed again with them padded to ``--fast-rcnn-proposals`` (2,000: the papers' count). Faster R-CNN
(``faster_rcnn``, ``fpn=False``: one stride-16 map, the paper's layout and the map the other two pool from) keeps
what its RPN gives; a random-init RPN's flat scores leave few boxes after its NMS at 0.7, so it is timed again
with the RPN keeping ``--faster-rcnn-proposals`` boxes (NMS at 0.99; the paper tests with 300).
``faster_rcnn_fpn`` is the FPN variant (torchvision's layout on the same backbone).

``train``: one detector trained through ``cnnlab.engine.train`` with a time budget, then its COCO AP / AP50 on
the test split (the issue's accuracy targets).

    OMP_NUM_THREADS=1 python benchmarks/bench_detection.py latency --images 4 --out latency.json
    python benchmarks/bench_detection.py train --model faster_rcnn --backbone resnet18 --minutes 20
    python benchmarks/bench_detection.py train --minutes 1 --train-limit 64 --dry-run   # config only

``time-runs``: trained run folders timed at batch 1 on a data set's images (trees windows or canvases).
``ceiling``: fashion_det's AP50 with perfect boxes, each scored by a classification run's softmax on the item's
painted square (neighbours included): what the backbone's own classification leaves a detector to reach.

``frames``: a classification run's accuracy on its test images centred in larger black frames, and enlarged to
fill them: whether its features still classify an item that does not fill the input, as on a canvas.

``errors``: where a trained fashion_det detector's AP50 goes: the same detections with the true class on every
box that finds an item (the AP lost to classification), class-agnostic AP50 and recall at IoU 0.5 (the AP
lost to localisation), and AP50 over COCO's small and medium items.

    python benchmarks/bench_detection.py errors runs/fd_ssd --images 1000
    python benchmarks/bench_detection.py time-runs runs/tr_ssd runs/tr_yolov3 --data trees --images 4
    python benchmarks/bench_detection.py ceiling runs/pre_resnet18_40
    python benchmarks/bench_detection.py frames runs/pre_resnet18_40   # its items in larger frames
    python benchmarks/bench_detection.py crops data/fashion_det_crops   # a backbone's pretraining folder
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

NUM_CLASSES = 11  # fashion_det: 10 classes + background
MODELS = ("rcnn", "sppnet", "fast_rcnn", "faster_rcnn", "faster_rcnn_fpn")
TRAIN_MODELS = ("rcnn", "sppnet", "fast_rcnn", "faster_rcnn", "fasterrcnn_resnet50_fpn", "ssd", "retinanet",
                "yolov1", "yolov3")
ONE_STAGE = ("ssd", "retinanet", "yolov1", "yolov3")
FIXED_SIZE = ("ssd", "yolov1", "yolov3")  # resize every image to size x size (no min_size/max_size)
PROPOSAL_METHODS = ("selective_search_fast", "selective_search_quality", "grid")
EXTRAPOLATE_TO = 2000
# the train command's Faster R-CNN on a 2-core CPU (off with --torchvision-defaults): one 8-canvas step at 128 px
# takes 9.5 s of CPU with torchvision's head settings (512 sampled RoIs per image through a 12544 -> 1024 FC,
# and RoIAlign's slow CPU backward) and 1.4 s with these; fashion_det has <= 4 items per canvas, so 128 RoIs
# (32 foreground) per image are enough; 300 RPN boxes at test time is the paper's count
LIGHT_FASTER_RCNN = {"box_batch_size_per_image": 128, "representation_size": 512, "fpn_channels": 128,
                     "rpn_post_nms_top_n_train": 600, "rpn_post_nms_top_n_test": 300}


# -- machine ------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU model, the vector flags that matter for convolutions, torch build, load average."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpus": os.cpu_count()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
                info["flags"] = {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                                                         "amx_bf16", "amx_tile", "amx_int8")}
    except (OSError, subprocess.SubprocessError):
        pass
    info["mkldnn_bf16"] = bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)())
    return info


def has_bf16(info: dict[str, Any]) -> bool:
    """Whether :func:`machine` found bf16 units (AVX-512 BF16 or AMX): then bf16 autocast is timed too."""
    flags = info.get("flags") or {}
    return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))


# -- images -------------------------------------------------------------------------------------------------
def canvas_images(n: int) -> list[Tensor]:
    """The first ``n`` fashion_det test canvases, (3, 128, 128) floats in 0..1 (grey, expanded to 3 channels)."""
    return canvases_and_targets(n)[0]


def real_images(n: int, canvases: Callable[[int], list[Tensor]]) -> tuple[list[Tensor], str]:
    """``n`` 500 x 375 images: windows of the trees validation crop, or (no cached wheel) tiled canvases."""
    try:
        from cnnlab.data.trees import VAL_IMAGE, read_scene, wheel_path

        scene = read_scene(wheel_path(download=False), VAL_IMAGE)
        image = scene.image.float().div(255)
        _, h, w = image.shape
        starts = [(y, x) for y in range(0, h - 375 + 1, 375) for x in range(0, w - 500 + 1, 500)]
        crops = [image[:, y:y + 375, x:x + 500].contiguous() for y, x in starts[:n]]
        return crops, f"trees val crop {VAL_IMAGE} ({w}x{h}), 500x375 windows"
    except Exception as e:  # noqa: BLE001 (no wheel, no network: fall back to canvases)
        tiles = canvases(12 * n)
        out = []
        for i in range(n):
            rows = [torch.cat(tiles[12 * i + 4 * r:12 * i + 4 * r + 4], dim=2) for r in range(3)]
            out.append(torch.cat(rows, dim=1)[:, :375, :500].contiguous())
        return out, f"4 x 3 tiled fashion_det canvases cropped to 500x375 (trees unavailable: {e})"


# -- timing ---------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``'s result, process CPU seconds, wall seconds."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


class StageTimer:
    """Forward hooks adding each named module's CPU and wall seconds (reset per call)."""

    def __init__(self, stages: dict[str, nn.Module]) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.handles = []
        for name, module in stages.items():
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._stop(name)))
        self._t0: dict[str, tuple[float, float]] = {}

    def _start(self, name: str):
        def hook(module, args):
            self._t0[name] = (time.process_time(), time.perf_counter())
        return hook

    def _stop(self, name: str):
        def hook(module, args, output):
            c0, w0 = self._t0.pop(name)
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w0
        return hook

    def reset(self) -> None:
        self.cpu, self.wall = {}, {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


# -- models ---------------------------------------------------------------------------------------------------
def build(name: str, backbone: str, min_size: int, max_size: int) -> nn.Module:
    from cnnlab.models import create_model

    common = {"backbone": backbone, "num_classes": NUM_CLASSES, "min_size": min_size, "max_size": max_size}
    if name.startswith("faster_rcnn"):  # torchvision's defaults otherwise: 1000 RPN proposals kept at test time
        # fpn=False: one stride-16 map, the paper's and the same map Fast R-CNN and SPP-net pool from
        model = create_model("faster_rcnn", **common, fpn=name == "faster_rcnn_fpn", box_score_thresh=0.05,
                             box_detections_per_img=100)
    else:  # RegionHeadConfig's defaults: score 0.05, NMS 0.3, 100 detections
        model = create_model(name, **common, proposals={"method": "selective_search_fast", "cache": False})
    return model.eval()


def stages_of(name: str, model: nn.Module) -> dict[str, nn.Module]:
    heads = model.roi_heads
    if name == "rcnn":
        return {"warp": heads.box_roi_pool, "cnn_per_region": heads.box_head, "predictor": heads.box_predictor}
    stages = {"backbone": model.backbone}
    if name.startswith("faster_rcnn"):
        stages["rpn"] = model.rpn
    stages.update({"roi_pool": heads.box_roi_pool, "box_head": heads.box_head, "predictor": heads.box_predictor})
    return stages


def pad_to(boxes: Tensor, count: int, image: Tensor) -> Tensor:
    """Exactly ``count`` boxes: the first of ``boxes``, then grid windows (R-CNN's cost depends on the count only)."""
    from cnnlab.detection.proposals import grid_proposals

    if len(boxes) >= count:
        return boxes[:count]
    extra = grid_proposals(tuple(image.shape[-2:]), max_proposals=count, step=0.1)
    out = torch.cat([boxes, extra])[:count]
    while len(out) < count:  # a tiny image with few windows: repeat (the cost is per region)
        out = torch.cat([out, out])[:count]
    return out


def bench_proposals(images: list[Tensor], methods: list[str]) -> tuple[dict[str, Any], dict[str, list[Tensor]]]:
    """Each proposal method on each image, uncached: median CPU/wall seconds and box count; and the boxes."""
    from cnnlab.detection.proposals import RegionProposer

    rows, boxes = {}, {}
    for method in methods:
        proposer = RegionProposer({"method": method, "cache": False})
        proposer.propose(images[0])  # warm-up (OpenCV's first call allocates)
        cpu, wall, counts, found = [], [], [], []
        for image in images:
            b, c, w = timed(lambda: proposer.propose(image))
            cpu.append(c)
            wall.append(w)
            counts.append(len(b))
            found.append(b)
        rows[method] = {"cpu_s": median(cpu), "wall_s": median(wall), "proposals": median(counts),
                        "cpu_s_all": cpu, "wall_s_all": wall, "proposals_all": counts}
        boxes[method] = found
        print(f"    {method:26s} cpu {median(cpu):8.3f} s  wall {median(wall):8.3f} s  "
              f"boxes {median(counts):6.0f}", flush=True)
    return rows, boxes


def bench_network(name: str, model: nn.Module, images: list[Tensor], proposals: list[Tensor] | None) -> dict[str, Any]:
    """The network stage (proposals given, or the RPN's own) per image: totals and per-stage medians."""
    timer = StageTimer(stages_of(name, model))
    rpn_counts: list[int] = []
    handle = None
    if name.startswith("faster_rcnn"):
        handle = model.rpn.register_forward_hook(lambda m, a, out: rpn_counts.append(len(out[0][0])))

    def call(i: int):
        if proposals is None:
            return model([images[i]])
        return model([images[i]], proposals=[proposals[i]])

    try:
        with torch.inference_mode():
            call(0)  # warm-up, not counted
            rpn_counts.clear()
            cpu, wall, dets, stage_cpu, stage_wall = [], [], [], [], []
            for i in range(len(images)):
                timer.reset()
                out, c, w = timed(lambda: call(i))
                cpu.append(c)
                wall.append(w)
                dets.append(len(out[0]["boxes"]))
                stage_cpu.append({**timer.cpu, "other": c - sum(timer.cpu.values())})
                stage_wall.append({**timer.wall, "other": w - sum(timer.wall.values())})
    finally:
        timer.remove()
        if handle is not None:
            handle.remove()
    n_props = rpn_counts if name.startswith("faster_rcnn") else [len(p) for p in proposals]
    keys = list(stage_cpu[0])
    return {"cpu_s": median(cpu), "wall_s": median(wall), "proposals": median(n_props),
            "detections": median(dets), "cpu_s_all": cpu, "wall_s_all": wall,
            "stages_cpu_s": {k: median([s.get(k, 0.0) for s in stage_cpu]) for k in keys},
            "stages_wall_s": {k: median([s.get(k, 0.0) for s in stage_wall]) for k in keys}}


def bench_case(case: str, images: list[Tensor], min_size: int, max_size: int, args) -> dict[str, Any]:
    h, w = images[0].shape[-2:]
    print(f"\n== {case}: {len(images)} images of {w}x{h}, min_size {min_size} ==", flush=True)
    print("  proposal stage (uncached, 1 thread):", flush=True)
    proposal_rows, boxes = bench_proposals(images, args.proposal_methods)
    ss = boxes.get("selective_search_fast") or boxes[args.proposal_methods[0]]
    network: dict[str, Any] = {}
    print("  network stage:", flush=True)
    for name in args.models:
        model = build(name, args.backbone, min_size, max_size)
        if name == "rcnn":
            for count in args.rcnn_proposals:
                key = f"rcnn@{count}"
                network[key] = bench_network(name, model, images, [pad_to(b, count, im) for b, im in zip(ss, images)])
                print(f"    {key:14s} cpu {network[key]['cpu_s']:8.3f} s  wall {network[key]['wall_s']:8.3f} s  "
                      f"({network[key]['cpu_s'] / count * 1000:.2f} ms cpu per region)", flush=True)
        else:
            runs = [(name, None if name.startswith("faster_rcnn") else ss)]
            if name == "fast_rcnn":  # also at fixed counts: the head's cost grows with the proposals
                runs += [(f"fast_rcnn@{c}", [pad_to(b, c, im) for b, im in zip(ss, images)])
                         for c in args.fast_rcnn_proposals]
            if name == "faster_rcnn":  # a random-init RPN's flat scores leave few boxes after its NMS at 0.7:
                # also at fixed counts (NMS at 0.99 only drops duplicates), as a trained RPN gives (the paper: 300)
                runs += [(f"faster_rcnn@{c}", None) for c in args.faster_rcnn_proposals]
            for key, given in runs:
                rpn = getattr(model, "rpn", None)
                saved = None if rpn is None else (rpn.pre_nms_top_n_test, rpn.post_nms_top_n_test, rpn.nms_thresh)
                if "@" in key and key.startswith("faster_rcnn"):
                    count = int(key.split("@")[1])
                    rpn.pre_nms_top_n_test, rpn.post_nms_top_n_test = max(saved[0], count), count
                    rpn.nms_thresh = 0.99
                network[key] = bench_network(name, model, images, given)
                if saved is not None:
                    rpn.pre_nms_top_n_test, rpn.post_nms_top_n_test, rpn.nms_thresh = saved
                print(f"    {key:14s} cpu {network[key]['cpu_s']:8.3f} s  wall {network[key]['wall_s']:8.3f} s  "
                      f"proposals {network[key]['proposals']:.0f}", flush=True)
        network.setdefault("_load", []).append(os.getloadavg()[0])
        del model
    return {"images": len(images), "size": [int(w), int(h)], "min_size": min_size, "max_size": max_size,
            "proposals": proposal_rows, "network": network}


def rcnn_fit(network: dict[str, Any], counts: list[int], key: str) -> dict[str, Any] | None:
    """Least-squares line t = a + b * regions through the measured R-CNN counts, and its value at 2,000."""
    points = [(c, network[f"rcnn@{c}"][key]) for c in counts if f"rcnn@{c}" in network]
    if len(points) < 2:
        return None
    xs, ys = zip(*points)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return {"intercept_s": a, "per_region_s": b, "at_2000_s": a + b * EXTRAPOLATE_TO,
            "per_region_measured_s": {str(x): y / x for x, y in points}}


def summary_rows(result: dict[str, Any], counts: list[int]) -> list[dict[str, Any]]:
    """One row per model: proposal stage (selective search fast, or the RPN inside the network), network, total."""
    net, props = result["network"], result["proposals"]
    ss = props.get("selective_search_fast", {"cpu_s": math.nan, "wall_s": math.nan})
    rows = []
    fit_cpu, fit_wall = rcnn_fit(net, counts, "cpu_s"), rcnn_fit(net, counts, "wall_s")
    for c in counts:
        r = net.get(f"rcnn@{c}")
        if r:
            rows.append({"model": f"R-CNN ({c} regions)", "proposals": c, "proposal_cpu_s": ss["cpu_s"],
                         "network_cpu_s": r["cpu_s"], "network_wall_s": r["wall_s"],
                         "main_stage": "cnn_per_region", "main_stage_cpu_s": r["stages_cpu_s"].get("cnn_per_region"),
                         "detections": r["detections"]})
    if fit_cpu:
        rows.append({"model": f"R-CNN ({EXTRAPOLATE_TO} regions, extrapolated)", "proposals": EXTRAPOLATE_TO,
                     "proposal_cpu_s": ss["cpu_s"], "network_cpu_s": fit_cpu["at_2000_s"],
                     "network_wall_s": fit_wall["at_2000_s"] if fit_wall else math.nan, "extrapolated": True})
    names = {"sppnet": "SPP-net", "fast_rcnn": "Fast R-CNN",
             **{k: f"Fast R-CNN (SS padded to {k.split('@')[1]})" for k in net if k.startswith("fast_rcnn@")},
             "faster_rcnn": "Faster R-CNN (C4 map, no FPN)",
             **{k: f"Faster R-CNN (C4, RPN kept {k.split('@')[1]})" for k in net if k.startswith("faster_rcnn@")},
             "faster_rcnn_fpn": "Faster R-CNN + FPN"}
    for key, label in names.items():
        r = net.get(key)
        if not r:
            continue
        rows.append({"model": label, "proposals": r["proposals"],
                     "proposal_cpu_s": 0.0 if key.startswith("faster_rcnn") else ss["cpu_s"],
                     "network_cpu_s": r["cpu_s"], "network_wall_s": r["wall_s"],
                     "rpn_cpu_s": r["stages_cpu_s"].get("rpn"), "detections": r["detections"]})
    for row in rows:
        row["total_cpu_s"] = row["proposal_cpu_s"] + row["network_cpu_s"]
        row["proposal_share"] = row["proposal_cpu_s"] / row["total_cpu_s"] if row["total_cpu_s"] else math.nan
    return rows


def print_table(case: str, result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    w, h = result["size"]
    print(f"\n{case}: {w}x{h}, min_size {result['min_size']}, {result['images']} images, medians, "
          "CPU seconds (1 thread); wall in brackets")
    print(f"  {'model':36s} {'props':>6s} {'proposal s':>11s} {'network s':>18s} {'total s':>9s} "
          f"{'prop share':>10s} {'dets':>5s}")
    for r in rows:
        print(f"  {r['model']:36s} {r['proposals']:6.0f} {r['proposal_cpu_s']:11.3f} "
              f"{r['network_cpu_s']:8.3f} [{r['network_wall_s']:7.3f}] {r['total_cpu_s']:9.3f} "
              f"{100 * r['proposal_share']:9.1f}% {r.get('detections', math.nan):5.0f}")
    print("  proposal methods:", ", ".join(f"{m} {p['cpu_s']:.3f} s cpu [{p['wall_s']:.3f} wall], "
                                           f"{p['proposals']:.0f} boxes" for m, p in result["proposals"].items()))
    print("  network stages (CPU s):")
    for key, r in result["network"].items():
        if not key.startswith("_"):
            print(f"    {key:14s} " + ", ".join(f"{k} {v:.4f}" for k, v in r["stages_cpu_s"].items()))


def latency(args) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    try:
        import cv2

        cv2.setNumThreads(args.threads)
    except ImportError:
        pass
    torch.manual_seed(0)
    info = machine()
    info["load_start"] = os.getloadavg()
    print(f"cpu: {info.get('cpu')}  flags: {info.get('flags')}  torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); load average {info['load_start']}", flush=True)
    results: dict[str, Any] = {"machine": info, "args": vars(args), "cases": {}}
    t0 = time.perf_counter()
    cases = []
    if "canvas" in args.cases:
        cases.append(("canvas", canvas_images(args.images), args.min_size, max(args.min_size, 1333)))
    if "real" in args.cases:
        images, source = real_images(args.real_images or args.images, canvas_images)
        results["real_source"] = source
        print(f"real images: {source}", flush=True)
        cases.append(("real", images, args.real_min_size, 1000))
    for case, images, min_size, max_size in cases:
        result = bench_case(case, images, min_size, max_size, args)
        result["rcnn_fit_cpu"] = rcnn_fit(result["network"], args.rcnn_proposals, "cpu_s")
        result["rows"] = summary_rows(result, args.rcnn_proposals)
        results["cases"][case] = result
    info["load_end"] = os.getloadavg()
    results["elapsed_s"] = time.perf_counter() - t0
    for case, result in results["cases"].items():
        print_table(case, result, result["rows"])
        fit = result["rcnn_fit_cpu"]
        if fit:
            per = ", ".join(f"{k} regions: {1000 * v:.2f} ms" for k, v in fit["per_region_measured_s"].items())
            print(f"  R-CNN per region (CPU): {per}; fit {1000 * fit['per_region_s']:.2f} ms/region + "
                  f"{fit['intercept_s']:.3f} s -> {fit['at_2000_s']:.1f} s at {EXTRAPOLATE_TO} (extrapolated)")
    print(f"\nload average start {info['load_start']}, end {info['load_end']}; whole run "
          f"{results['elapsed_s']:.0f} s wall. Wall times are noisy on a shared machine; CPU times are the measure.")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=float))
        print(f"wrote {args.out}")
    return results


# -- training -------------------------------------------------------------------------------------------------
def train_config(args):
    """The TrainConfig the ``train`` command runs (model options from the flags, then ``--set`` overrides)."""
    from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, apply_overrides

    options: dict[str, Any] = {"backbone": args.backbone}
    if args.model in FIXED_SIZE:
        options["size"] = args.min_size
    else:
        options.update(min_size=args.min_size, max_size=args.max_size)
    if args.model == "faster_rcnn" and not args.torchvision_defaults:
        options.update(LIGHT_FASTER_RCNN)
    if args.anchor_sizes:
        options["anchor_sizes"] = [[int(s)] for s in args.anchor_sizes.split(",")] if args.model == "faster_rcnn" \
            else None
        if options["anchor_sizes"] is None:
            raise SystemExit("--anchor-sizes applies to faster_rcnn only")
    if args.model in ("rcnn", "sppnet", "fast_rcnn"):
        options["proposals"] = {"method": args.proposals, "max_proposals": args.max_proposals}
    config = TrainConfig(
        model=ModelConfig(name=args.model, options=options, channels_last=False),
        data=DataConfig(name=args.data, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                        train_limit=args.train_limit, flip=args.flip, download=False),
        optim=OptimConfig(optimizer=args.optimizer, lr=args.lr, momentum=0.9, nesterov=False, weight_decay=1e-4,
                          schedule=args.schedule, warmup_epochs=args.warmup_epochs),
        epochs=args.epochs, seed=args.seed, device=args.device, threads=args.threads,
        time_budget=args.minutes * 60, out_dir=args.out_dir, name=args.name or "", plots=not args.no_plots)
    if args.set:
        apply_overrides(config, args.set)  # model.options.KEY=VALUE included
    return config


class FirstBatches:
    """The first ``n`` batches of a loader (``len``, ``set_epoch`` and other attributes pass through)."""

    def __init__(self, batches: Any, n: int) -> None:
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return min(self.n, len(self.batches))

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.n:
                return
            yield batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.batches, name)


def train(args) -> dict[str, Any] | None:
    config = train_config(args)
    print(config.describe(), flush=True)
    if args.dry_run:  # the config and the model it builds; no data, no training
        from cnnlab.engine.config import validate
        from cnnlab.models import create_model

        validate(config)

        model = create_model(config.model.name, num_classes=NUM_CLASSES, **config.model.options)
        params = sum(p.numel() for p in model.parameters())
        print(f"dry run: {config.model.name} builds ({params / 1e6:.2f}M parameters); not training")
        return None
    from cnnlab.engine import train as engine_train

    data = None
    if args.val_images or args.test_images:  # the engine's own loaders, val/test cut to their first images
        import dataclasses

        from cnnlab.data.detection_data import build_detection_data

        bundle = build_detection_data(config.data, torch.device(config.device), seed=config.seed)
        cut = {}
        for split, count in (("val", args.val_images), ("test", args.test_images)):
            batches = getattr(bundle, split)
            if count and batches is not None:
                cut[split] = FirstBatches(batches, -(-count // config.data.eval_batch_size))
                print(f"{split}: the first {len(cut[split]) * config.data.eval_batch_size} images only")
        data = dataclasses.replace(bundle, **cut)
    result = engine_train(config, data=data)
    metrics = result.test.metrics if result.test is not None else {}
    out = {"model": args.model, "backbone": args.backbone, "data": args.data, "minutes": args.minutes,
           "run_dir": str(result.run_dir), "epochs_run": len(result.history), "best_epoch": result.best_epoch,
           "planned_steps": result.planned_steps, "wall_s": result.wall_s, "cpu_s": result.cpu_s,
           "test": {k: float(v) for k, v in metrics.items()}}
    print(f"\n{args.model} ({args.backbone}) on {args.data}, {args.minutes} min budget: "
          f"test AP {metrics.get('AP', math.nan):.4f}, AP50 {metrics.get('AP50', math.nan):.4f} "
          f"({len(result.history)} epochs, {result.wall_s:.0f} s wall, run {result.run_dir})")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


# -- one-stage vs two-stage --------------------------------------------------------------------------------------
# each family's recipe for the same budget: the one-stage heads barely leave their priors under SGD at these
# learning rates (RetinaNet: AP 0.03 after 12 epochs at lr 0.01, diverged at 0.03; AdamW 1e-3: AP 0.58), the
# two-stage ones train with the SGD recipe measured above
RECIPES = {name: {"optimizer": "adamw", "lr": 1e-3, "warmup_epochs": 0.0} for name in ONE_STAGE}
RECIPES.update({name: {"optimizer": "sgd", "lr": 0.01, "warmup_epochs": 0.05}
                for name in ("rcnn", "sppnet", "fast_rcnn", "faster_rcnn")})
MODEL_OPTIONS = {"yolov3": ["model.options.anchors=kmeans"], "yolov1": ["model.options.dropout=0.0"]}


def _with(args, name: str):
    """``args`` for training ``name`` (its model options as the train command builds them)."""
    import copy

    out = copy.copy(args)
    out.model, out.name, out.torchvision_defaults, out.anchor_sizes = name, "", False, ""
    out.optimizer, out.warmup_epochs = "sgd", 0.0
    out.set = list(args.set or []) + MODEL_OPTIONS.get(name, [])
    if name in ("rcnn", "sppnet", "fast_rcnn"):
        out.proposals, out.max_proposals = "grid", 300
    return out


def time_detector(model: nn.Module, images: list[Tensor], bf16: bool) -> dict[str, float]:
    """Median CPU and wall seconds per image at batch 1 (eval, inference_mode; one warm-up call)."""
    model.eval()
    cpu, wall = [], []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        try:
            model([images[0]])
        except RuntimeError as e:  # an op without a bf16 kernel (torchvision's roi_pool on the CPU)
            return {"cpu_s": math.nan, "wall_s": math.nan, "error": str(e).splitlines()[0][:200]}
        for image in images:
            _, c, w = timed(lambda: model([image]))
            cpu.append(c)
            wall.append(w)
    return {"cpu_s": median(cpu), "wall_s": median(wall)}


def time_onnx(model: nn.Module, images: list[Tensor], threads: int) -> dict[str, float]:
    """Median CPU and wall seconds per image at batch 1 in ONNX Runtime (``cnnlab.export.to_onnx``: the exported
    graph, checked against eager; one warm-up call): the fastest path cnnlab has for a detector on the CPU."""
    import tempfile

    import onnxruntime as ort

    from cnnlab.export import to_onnx

    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            export = to_onnx(model, path, input_size=tuple(images[0].shape))
        except Exception as e:  # a model that does not export is recorded, not fatal
            return {"cpu_s": math.nan, "wall_s": math.nan, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        feeds = [{name: image.numpy()} for image in images]
        session.run(None, feeds[0])
        cpu, wall = [], []
        for feed in feeds:
            _, c, w = timed(lambda: session.run(None, feed))
            cpu.append(c)
            wall.append(w)
    return {"cpu_s": median(cpu), "wall_s": median(wall), "export_max_abs_diff": export.max_abs_diff}


def latencies(model: nn.Module, images: list[Tensor], bf16: bool, threads: int, onnx: bool = False
              ) -> dict[str, dict[str, float]]:
    """A detector's batch-1 timings: ``latency_fp32`` always, ``latency_bf16`` (autocast) where the CPU has bf16
    units, ``latency_onnx`` (ONNX Runtime) when asked."""
    out = {"latency_fp32": time_detector(model, images, False)}
    if bf16:
        out["latency_bf16"] = time_detector(model, images, True)
    if onnx:
        out["latency_onnx"] = time_onnx(model, images, threads)
    return out


def compare(args) -> dict[str, Any]:
    """Train each detector with the same backbone and budget, then time it at batch 1; a table, JSON and a plot."""
    import copy

    from cnnlab.engine.runs import load_run
    from cnnlab.models import create_model

    torch.set_num_threads(args.threads)
    info = machine()
    bf16 = has_bf16(info)
    images = canvas_images(args.latency_images)
    rows = []
    for name in args.models:
        if args.latency_only:  # random init, no training: the speed half of the comparison only
            options = dict(train_config(_with(args, name)).model.options)
            if options.get("anchors") == "kmeans":  # nothing to fit them to: the paper's, scaled to the input
                options["anchors"] = "coco"
            model = create_model(name, num_classes=NUM_CLASSES, **options)
            row = {"model": name, "stage": "one" if name in ONE_STAGE else "two", "test": {}, "epochs_run": 0,
                   **latencies(model, images, bf16, args.threads, args.onnx)}
            rows.append(row)
            print(f"  {name}: {1000 * row['latency_fp32']['cpu_s']:.1f} ms/image fp32 (cpu)", flush=True)
            continue
        run_args = copy.copy(args)
        run_args.model, run_args.name, run_args.out = name, f"{args.prefix}{name}", None
        recipe = RECIPES.get(name, {})
        run_args.optimizer, run_args.lr = recipe.get("optimizer", "sgd"), recipe.get("lr", args.lr)
        run_args.warmup_epochs = recipe.get("warmup_epochs", 0.0)
        run_args.set = list(args.set or []) + MODEL_OPTIONS.get(name, [])
        run_args.dry_run, run_args.torchvision_defaults, run_args.anchor_sizes = False, False, ""
        if name in ("rcnn", "sppnet", "fast_rcnn"):
            run_args.proposals, run_args.max_proposals = "grid", 300
        trained = train(run_args)
        model = load_run(trained["run_dir"]).model
        row = {"model": name, "stage": "one" if name in ONE_STAGE else "two", **trained,
               **latencies(model, images, bf16, args.threads, args.onnx)}
        rows.append(row)
        print(f"  {name}: AP {row['test'].get('AP', math.nan):.3f}  AP50 {row['test'].get('AP50', math.nan):.3f}  "
              f"{1000 * row['latency_fp32']['cpu_s']:.0f} ms/image fp32 (cpu)", flush=True)
    result = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "func"}, "rows": rows}
    print(f"\n{'model':12s} {'stage':>5s} {'AP':>6s} {'AP50':>6s} {'epochs':>6s} {'fp32 ms':>8s} {'bf16 ms':>8s} "
          f"{'ORT ms':>8s}")
    for r in rows:
        b = r.get("latency_bf16", {}).get("cpu_s", math.nan)
        o = r.get("latency_onnx", {}).get("cpu_s", math.nan)
        print(f"{r['model']:12s} {r['stage']:>5s} {r['test'].get('AP', math.nan):6.3f} {r['test'].get('AP50', math.nan):6.3f} "
              f"{r['epochs_run']:6d} {1000 * r['latency_fp32']['cpu_s']:8.1f} {1000 * b:8.1f} {1000 * o:8.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=float))
        print(f"wrote {args.out}")
    if args.plot:
        plot_speed_accuracy(rows, args.plot)
        print(f"wrote {args.plot}")
    return result


def plot_speed_accuracy(rows: list[dict[str, Any]], path: str,
                        title: str = "fashion_det: same backbone, same training budget") -> None:
    """AP50 against CPU ms per image (log), one point per detector, coloured by stage; ``rows`` as ``compare``
    writes them (``model``, ``stage``, ``test.AP50``, ``latency_fp32.cpu_s``)."""
    from cnnlab._plot import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        x, y = 1000 * r["latency_fp32"]["cpu_s"], r["test"].get("AP50", math.nan)
        ax.scatter([x], [y], color="tab:orange" if r["stage"] == "one" else "tab:blue", s=40)
        ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.scatter([], [], color="tab:orange", label="one-stage")
    ax.scatter([], [], color="tab:blue", label="two-stage")
    ax.set_xscale("log")
    ax.set_xlabel("CPU ms per image, batch 1, fp32 eager (log)")
    ax.set_ylabel("test AP50")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# -- trained detectors, timed -------------------------------------------------------------------------------------
def latency_images(data: str, n: int) -> tuple[list[Tensor], str]:
    """``n`` images of ``data`` to time a detector on: trees validation windows or fashion_det test canvases."""
    if data == "trees":
        return real_images(n, canvas_images)
    return canvas_images(n), "fashion_det test canvases (128 x 128)"


def time_runs(args) -> list[dict[str, Any]]:
    """Each trained run's per-image latency at batch 1 (eager fp32, and bf16 autocast where the CPU has bf16)."""
    from cnnlab.engine.runs import load_run

    torch.set_num_threads(args.threads)
    info = machine()
    bf16 = has_bf16(info)
    images, what = latency_images(args.data, args.images)
    print(f"{len(images)} images: {what}; {args.threads} thread(s)")
    rows = []
    for run_dir in args.runs:
        model = load_run(run_dir).model
        row = {"run": str(run_dir), "model": getattr(model, "model_name", type(model).__name__),
               **latencies(model, images, bf16, args.threads)}
        rows.append(row)
        b = row.get("latency_bf16", {}).get("cpu_s", math.nan)
        print(f"  {row['model']:12s} fp32 {1000 * row['latency_fp32']['cpu_s']:7.1f} ms (cpu)  "
              f"{1000 * row['latency_fp32']['wall_s']:7.1f} ms (wall)  bf16 {1000 * b:7.1f} ms (cpu)  {run_dir}",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": info, "images": what, "rows": rows}, indent=1,
                                             default=float))
    return rows


# -- the classification ceiling ----------------------------------------------------------------------------------
def item_crops(composed: Any, source_images: np.ndarray, n: int, side: int, sides: range = range(20, 65)
               ) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """Each item of the first ``n`` canvases cut out of its canvas at the square it was painted in, resized to
    ``side``; the same items painted alone (no neighbours), likewise; and the canvases' targets. What a detector
    with perfect boxes would have to classify, overlaps and scale included. The square is recovered exactly: of the painting sides ``sides`` (``FashionDetConfig``'s
    min_scale..max_scale), the one at which the item's 28 px source, resized as ``compose`` does, has a tight box
    of the painted box's width and height (the smallest such side; an item with none is refused)."""
    from cnnlab.data.fashion_det import FashionDetConfig, _resize_items, _tight_box

    threshold = FashionDetConfig().mask_threshold
    stop = int(composed.offsets[n])
    sources = source_images[composed.source[:stop]]
    found: list[tuple[int, int, int, np.ndarray] | None] = [None] * stop  # (side, tight x1, y1, painted item)
    for s in sides:
        for m, item in enumerate(_resize_items(sources, np.full(stop, s))):
            if found[m] is None:
                tb = _tight_box(item > threshold)
                x1, y1, x2, y2 = composed.boxes[m].tolist()
                if tb is not None and (tb[2] - tb[0], tb[3] - tb[1]) == (round(x2 - x1), round(y2 - y1)):
                    found[m] = (s, tb[0], tb[1], np.where(item > threshold, item, 0))
    if any(f is None for f in found):
        raise SystemExit(f"{found.count(None)} items match no painting side in {sides}: not fashion_det's default "
                         "composition")
    def resized(square: Tensor) -> Tensor:
        return resized_square(square, side)[0]

    crops, alone, targets = [], [], []
    for i in range(n):
        sl = composed.items(i)
        canvas = torch.from_numpy(composed.images[i]).float()[None, None] / 255
        for m in range(sl.start, sl.stop):
            s, tx, ty, painted = found[m]  # type: ignore[misc]
            x, y = int(composed.boxes[m][0]) - tx, int(composed.boxes[m][1]) - ty
            crops.append(resized(canvas[..., y:y + s, x:x + s]))
            alone.append(resized(torch.from_numpy(painted).float()[None, None] / 255))
        targets.append({"boxes": torch.from_numpy(composed.boxes[sl].copy()),
                        "labels": torch.from_numpy(composed.labels[sl].copy())})
    return torch.stack(crops), torch.stack(alone), targets


def resized_square(x: Tensor, side: int) -> Tensor:
    """(N, C, h, w) -> (N, C, side, side), bilinear with antialiasing (as ``compose`` paints items)."""
    import torch.nn.functional as F

    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def run_softmax(run: Any, images: Tensor) -> Tensor:
    """A classification run's class probabilities for grey (N, 1, H, W) images in [0, 1], through its own
    preprocessing, 256 at a time."""
    from cnnlab.engine.data_setup import preprocess_from_state

    preprocess = preprocess_from_state(run.preprocess)
    x = images.expand(-1, run.input_shape[0], -1, -1)
    x = preprocess(x) if preprocess is not None else x
    with torch.inference_mode():
        return torch.cat([run.model(x[i:i + 256]).float().softmax(1) for i in range(0, len(x), 256)])


def ceiling(args) -> dict[str, Any]:
    """The AP a detector would reach on fashion_det with perfect boxes and the backbone's own classification:
    every true box reported once per class, scored by the classifier run's softmax on the item's crop."""
    from cnnlab.data.datasets import fashion_mnist
    from cnnlab.data.fashion_det import load_fashion_det
    from cnnlab.detection import evaluate
    from cnnlab.engine.runs import load_run

    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    height = run.input_shape[1]
    test = load_fashion_det(download=False)["test"]
    n = min(args.images or len(test), len(test))
    fm = fashion_mnist(download=False)
    crops, alone, targets = item_crops(test, fm.test_images[:, 0].numpy(), n, height)
    stop = len(crops)
    sources = fm.test_images[torch.from_numpy(test.source[:stop])].float() / 255
    sources = resized_square(sources, height)
    probs = run_softmax(run, crops)
    classes = probs.shape[1]
    predictions, k = [], 0
    for t in targets:
        m = len(t["labels"])
        p = probs[k:k + m]
        k += m
        predictions.append({"boxes": t["boxes"].repeat_interleave(classes, 0), "scores": p.reshape(-1),
                            "labels": torch.arange(1, classes + 1).repeat(m)})
    labels = torch.cat([t["labels"] for t in targets]) - 1
    accuracy = (probs.argmax(1) == labels).float().mean().item()
    # the same items, as the classifier was trained on them (the 28 px source) and as painted but alone
    source_accuracy = (run_softmax(run, sources).argmax(1) == labels).float().mean().item()
    alone_accuracy = (run_softmax(run, alone).argmax(1) == labels).float().mean().item()
    metrics = evaluate(predictions, targets, "coco", class_names=run.classes)
    voc = evaluate(predictions, targets, "voc", class_names=run.classes)
    per_class = {str(name): round(float(v), 4) for name, v in metrics.per_class_ap50.items()}
    out = {"run": str(args.run), "canvases": n, "items": len(labels), "crop_accuracy": accuracy,
           "source_accuracy": source_accuracy, "alone_accuracy": alone_accuracy,
           "AP50": float(metrics["AP50"]), "AP": float(metrics["AP"]), "voc_AP": float(voc["mAP"]),
           "per_class_AP50": per_class, "machine": machine()}
    print(f"{n} test canvases, {len(labels)} items: accuracy on the 28 px sources {source_accuracy:.4f}, on the "
          f"items painted alone {alone_accuracy:.4f}, on their squares in the canvas {accuracy:.4f}")
    print(f"perfect boxes scored by the "
          f"classifier: AP50 {out['AP50']:.4f} (COCO AP {out['AP']:.4f}, VOC AP {out['voc_AP']:.4f})")
    for name, v in per_class.items():
        print(f"  {name:12s} {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    return out


def framed(images: Tensor, side: int) -> Tensor:
    """(N, C, h, w) images centred in black (zero) frames of ``side`` x ``side``: the same pixels, more
    background around them, as a detector's canvas puts around an item."""
    n, c, h, w = images.shape
    if side < max(h, w):
        raise SystemExit(f"frame side {side} is smaller than the images ({h} x {w})")
    out = images.new_zeros(n, c, side, side)
    top, left = (side - h) // 2, (side - w) // 2
    out[..., top:top + h, left:left + w] = images
    return out


def frames(args) -> dict[str, Any]:
    """Does a classification run's backbone still classify its test images when they sit in a larger black
    frame (the item unchanged, only more background), or enlarged to fill one? A detector fine-tuned from it
    sees its items so: on a canvas, not filling the input. Accuracy, and the share of the most predicted class
    (1.0: every image given one class)."""
    from cnnlab.data.datasets import fashion_mnist
    from cnnlab.engine.runs import load_run

    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    height = run.input_shape[1]
    fm = fashion_mnist(download=False)
    n = min(args.images, len(fm.test_images))
    sources, labels = fm.test_images[:n].float() / 255, fm.test_labels[:n]

    def scores(x: Tensor) -> dict[str, float]:
        pred = run_softmax(run, x).argmax(1)
        return {"accuracy": (pred == labels).float().mean().item(),
                "top_class_share": torch.bincount(pred).max().item() / len(pred)}

    item = args.item or height
    at_size = resized_square(sources, item)
    rows = []
    for side in dict.fromkeys(args.sides or [item, item + 8, round(1.6 * item), 128]):  # in order, once each
        rows.append({"frame": side, "item": item, **scores(framed(at_size, side))})
        if side != item:
            rows.append({"frame": side, "item": side, **scores(resized_square(sources, side))})
    print(f"{args.run}: trained at {height} px; {n} Fashion-MNIST test images")
    for r in rows:
        print(f"  item {r['item']:4d} px in a {r['frame']:4d} px frame: accuracy {r['accuracy']:.4f}, most "
              f"predicted class {r['top_class_share']:.3f} of the images")
    out = {"run": str(args.run), "images": n, "rows": rows, "machine": machine()}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    return out


def write_crops(args) -> None:
    """fashion_det's items as a classification folder (``root/train|test/<i>_<class>/*.png``, 40 px grey by
    default): each item's painted square cut from its canvas, neighbours included (:func:`item_crops`). train/
    from the train canvases, test/ from the val canvases (the detector's test split stays unseen). A backbone
    pretrained on these (``cnnlab train --model resnet18 --data ROOT --set model.options.in_channels=1``) sees
    items as a detector does."""
    from PIL import Image

    from cnnlab.data.datasets import FASHION_CLASSES, fashion_mnist
    from cnnlab.data.fashion_det import load_fashion_det

    root = Path(args.root)
    splits = load_fashion_det(download=False)
    sources = fashion_mnist(download=False).train_images[:, 0].numpy()  # train and val canvases draw from it
    for split, folder in (("train", "train"), ("val", "test")):
        composed = splits[split]
        crops, _, targets = item_crops(composed, sources, len(composed), args.size)
        labels = torch.cat([t["labels"] for t in targets]) - 1
        for k, (crop, label) in enumerate(zip(crops, labels.tolist())):
            out = root / folder / f"{label}_{FASHION_CLASSES[label].replace('/', '_')}"  # index first: class order
            out.mkdir(parents=True, exist_ok=True)
            pixels = (crop[0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(out / f"{k:06d}.png")
        print(f"{folder}/: {len(crops)} crops from the {len(composed)} {split} canvases")


# -- where a detector's AP goes ----------------------------------------------------------------------------------
def canvases_and_targets(n: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The first ``n`` fashion_det test canvases (as the engine feeds them: (3, 128, 128) floats in 0..1) and
    their targets (``boxes``, ``labels``)."""
    from cnnlab.data.config import DataConfig
    from cnnlab.data.detection_data import build_detection_data

    bundle = build_detection_data(DataConfig(name="fashion_det", eval_batch_size=32, download=False),
                                  torch.device("cpu"))
    images, targets = [], []
    for batch_images, batch_targets in bundle.test:
        images.extend(i.contiguous() for i in batch_images)
        targets.extend({"boxes": t["boxes"], "labels": t["labels"]} for t in batch_targets)
        if len(images) >= n:
            break
    return images[:n], targets[:n]


def relabelled(predictions: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], iou: float = 0.5,
               agnostic: bool = False) -> list[dict[str, Tensor]]:
    """Each detection that overlaps a true box at ``iou`` takes that box's label (its best-overlapping one), and
    the detections that became duplicates of a better-scoring one (same label, IoU >= ``iou``) are dropped:
    the AP the detector would have with the same boxes and scores and never a wrong class (TIDE's
    classification oracle, Bolya et al. 2020). ``agnostic``: every detection gets label 1 instead (with the
    same de-duplication, so a box reported once per class counts once)."""
    from torchvision.ops import batched_nms, box_iou

    out = []
    for p, t in zip(predictions, targets):
        labels = torch.ones_like(p["labels"]) if agnostic else p["labels"].clone()
        if not agnostic and len(t["boxes"]) and len(p["boxes"]):
            best, which = box_iou(p["boxes"], t["boxes"]).max(1)
            labels[best >= iou] = t["labels"][which[best >= iou]]
        keep = batched_nms(p["boxes"], p["scores"], labels, iou)
        out.append({"boxes": p["boxes"][keep], "scores": p["scores"][keep], "labels": labels[keep]})
    return out


def errors(args) -> dict[str, Any]:
    """Where a trained fashion_det detector's AP50 goes: classification (the same boxes with the true classes),
    localisation (class-agnostic AP50, recall at IoU 0.5) and item size (COCO's small / medium / large)."""
    from torchvision.ops import box_iou

    from cnnlab.detection import evaluate
    from cnnlab.engine.runs import load_run

    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    model = run.model.eval()
    images, targets = canvases_and_targets(args.images)
    predictions = []
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            predictions.extend({k: v if k == "labels" else v.float() for k, v in p.items()}
                               for p in model(images[i:i + 32]))
    metrics = evaluate(predictions, targets, "coco", class_names=run.classes)
    fixed = evaluate(relabelled(predictions, targets), targets, "coco", class_names=run.classes)
    agnostic = evaluate(relabelled(predictions, targets, agnostic=True),
                        [{**t, "labels": torch.ones_like(t["labels"])} for t in targets], "coco")
    # per true box: found by some detection (any class, IoU >= 0.5); the class of the best-scoring one that does
    found = right = total = 0
    for p, t in zip(predictions, targets):
        total += len(t["boxes"])
        if not len(t["boxes"]) or not len(p["boxes"]):
            continue
        hit = box_iou(t["boxes"], p["boxes"]) >= 0.5  # (G, D)
        for g in torch.nonzero(hit.any(1))[:, 0].tolist():
            found += 1
            d = torch.nonzero(hit[g])[:, 0]
            right += int(p["labels"][d[p["scores"][d].argmax()]] == t["labels"][g])
    # COCO's area ranges (all, small, medium, large): AP at IoU 0.5, 100 detections, as COCOeval.summarize
    precision = metrics.details["precision"][0, :, :, :, -1]  # (R, K, A)
    sides = torch.cat([((t["boxes"][:, 2:] - t["boxes"][:, :2]).prod(1)).sqrt() for t in targets])
    by_size = {}
    for a, (name, lo, hi) in enumerate((("small", 0, 32), ("medium", 32, 96), ("large", 96, math.inf)), start=1):
        p = precision[:, :, a]
        by_size[name] = {"items": int(((sides >= lo) & (sides < hi)).sum()),
                         "AP50": float(p[p > -1].mean()) if (p > -1).any() else math.nan}
    out = {"run": str(args.run), "canvases": len(images), "items": total,
           "AP50": float(metrics["AP50"]), "AP": float(metrics["AP"]),
           "AP50_true_classes": float(fixed["AP50"]), "AP50_class_agnostic": float(agnostic["AP50"]),
           "recall50_any_class": found / max(1, total), "right_class_of_found": right / max(1, found),
           "by_size": by_size, "per_class_AP50": {str(k): float(v) for k, v in metrics.per_class_ap50.items()},
           "machine": machine()}
    print(f"{args.run}: {len(images)} test canvases, {total} items")
    print(f"  AP50 {out['AP50']:.4f} (AP {out['AP']:.4f}); the same detections with the true class wherever they "
          f"find an item: {out['AP50_true_classes']:.4f}; class-agnostic: {out['AP50_class_agnostic']:.4f}")
    print(f"  items found at IoU 0.5 by some detection: {out['recall50_any_class']:.4f}; of those, the best-scoring "
          f"finder has the right class: {out['right_class_of_found']:.4f}")
    for name, v in by_size.items():
        print(f"  {name:6s} {v['items']:5d} items: AP50 {v['AP50']:.4f}")
    for name, v in out["per_class_AP50"].items():
        print(f"  {name:12s} {v:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    lat = sub.add_parser("latency", help="per-image inference time per stage of the four detectors")
    lat.add_argument("--backbone", default="resnet18")
    lat.add_argument("--images", type=int, default=4, help="images per case (medians over them)")
    lat.add_argument("--real-images", type=int, default=0, help="images in the real case (default --images)")
    lat.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads")
    lat.add_argument("--min-size", type=int, default=128, help="canvas case: short side the models resize to")
    lat.add_argument("--real-min-size", type=int, default=375, help="real case: short side (375: no resize)")
    lat.add_argument("--cases", nargs="+", default=["canvas", "real"], choices=["canvas", "real"])
    lat.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    lat.add_argument("--proposal-methods", nargs="+", default=list(PROPOSAL_METHODS), choices=PROPOSAL_METHODS)
    lat.add_argument("--rcnn-proposals", type=int, nargs="+", default=[100, 200],
                     help="R-CNN region counts (>= 2 for the linear extrapolation to 2,000)")
    lat.add_argument("--fast-rcnn-proposals", type=int, nargs="*", default=[2000],
                     help="also time Fast R-CNN with selective-search boxes padded to these counts")
    lat.add_argument("--faster-rcnn-proposals", type=int, nargs="*", default=[300, 1000],
                     help="also time Faster R-CNN (C4) with the RPN keeping these many boxes (its NMS at 0.99)")
    lat.add_argument("--out", help="JSON file for all numbers")

    tr = sub.add_parser("train", help="train with a time budget through cnnlab.engine.train, print test AP/AP50")
    tr.add_argument("--model", default="faster_rcnn", choices=TRAIN_MODELS)
    tr.add_argument("--backbone", default="resnet18")
    tr.add_argument("--data", default="fashion_det", help="fashion_det or trees")
    tr.add_argument("--minutes", type=float, default=20.0, help="budget of the whole run (time_budget)")
    tr.add_argument("--epochs", type=int, default=100, help="upper limit; the budget decides")
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--eval-batch-size", type=int, default=32)
    tr.add_argument("--lr", type=float, default=0.02)
    tr.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "adamw"))
    tr.add_argument("--schedule", default="cosine")
    tr.add_argument("--warmup-epochs", type=float, default=0.0)
    tr.add_argument("--min-size", type=int, default=128)
    tr.add_argument("--max-size", type=int, default=1333)
    tr.add_argument("--torchvision-defaults", action="store_true",
                    help="faster_rcnn with torchvision's head settings, not LIGHT_FASTER_RCNN")
    tr.add_argument("--anchor-sizes", default="", help="faster_rcnn, FPN: a size per level: 16,32,64,128,256")
    tr.add_argument("--proposals", default="grid", help="rcnn/sppnet/fast_rcnn proposal method (grid: no search cost)")
    tr.add_argument("--max-proposals", type=int, default=2000)
    tr.add_argument("--train-limit", type=int, default=0)
    tr.add_argument("--val-images", type=int, default=0, help="validate on the first N val images (0: all)")
    tr.add_argument("--test-images", type=int, default=0, help="test on the first N test images (0: all)")
    tr.add_argument("--flip", action="store_true")
    # 1: on the shared 2-core machine two OpenMP threads spin-wait on each other (5-8 s per step instead of 1.3)
    tr.add_argument("--threads", type=int, default=1)
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out-dir", default="runs/bench_detection")
    tr.add_argument("--name", default="")
    tr.add_argument("--no-plots", action="store_true")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="a TrainConfig override (repeatable)")
    tr.add_argument("--dry-run", action="store_true", help="print the config and build the model only")
    tr.add_argument("--out", help="JSON file for the result")

    cmp = sub.add_parser("compare", parents=[], help="one-stage vs two-stage: each detector trained with the same "
                         "backbone and budget, then timed at batch 1; a table, JSON and a speed-accuracy plot")
    for action in tr._actions:  # the train command's options (its --model is replaced by --models)
        if action.dest not in ("help", "model", "name", "out", "dry_run") and action.option_strings:
            cmp._add_action(action)
    cmp.add_argument("--models", nargs="+", default=["ssd", "retinanet", "yolov3", "faster_rcnn"],
                     choices=TRAIN_MODELS)
    cmp.add_argument("--latency-images", type=int, default=20, help="test canvases timed per model")
    cmp.add_argument("--latency-only", action="store_true", help="random-init models timed, nothing trained")
    cmp.add_argument("--onnx", action="store_true", help="also time each model exported to ONNX Runtime")
    cmp.add_argument("--prefix", default="cmp_", help="run folder names: PREFIX + model")
    cmp.add_argument("--out", help="JSON file for the results")
    cmp.add_argument("--plot", default="", help="PNG of AP50 against latency")

    def one_run(name: str, about: str, run: str, images: int, images_help: str) -> None:
        """A subcommand on one run folder and the first ``--images`` test canvases, with --threads and --out."""
        command = sub.add_parser(name, help=about)
        command.add_argument("run", help=run)
        command.add_argument("--images", type=int, default=images, help=images_help)
        command.add_argument("--threads", type=int, default=1)
        command.add_argument("--out", help="JSON file for the result")

    one_run("ceiling", "fashion_det's AP with perfect boxes and a classifier run's scores: what the backbone's "
            "classification allows a detector", "a classification run folder (the backbone, e.g. "
            "runs/pre_resnet18_40)", 0, "the first N test canvases (0: all)")

    tm = sub.add_parser("time-runs", help="trained detectors' per-image latency at batch 1 on a data set's images")
    tm.add_argument("runs", nargs="+", help="detection run folders")
    tm.add_argument("--data", default="fashion_det", choices=("fashion_det", "trees"))
    tm.add_argument("--images", type=int, default=10)
    tm.add_argument("--threads", type=int, default=1)
    tm.add_argument("--out", help="JSON file for the result")

    pl = sub.add_parser("plot", help="the speed-accuracy plot from a JSON of rows (compare's --out, or results "
                        "gathered by hand: {\"title\": ..., \"rows\": [...]})")
    pl.add_argument("json")
    pl.add_argument("--out", required=True, help="PNG to write")

    cr = sub.add_parser("crops", help="fashion_det's items cut from their canvases as a classification folder "
                        "(backbone pretraining that sees neighbours as a detector does)")
    cr.add_argument("root", help="the folder to write (root/train, root/test)")
    cr.add_argument("--size", type=int, default=40, help="side of the square crops in pixels")

    fr = sub.add_parser("frames", help="a classification run's accuracy on its test images in larger black frames "
                        "(how far its features transfer to a canvas)")
    fr.add_argument("run", help="a fashion_mnist classification run folder")
    fr.add_argument("--sides", type=int, nargs="*", help="frame sides (default: its size, +8, 1.6x, 128)")
    fr.add_argument("--item", type=int, default=0, help="side the images are resized to (default: the run's size)")
    fr.add_argument("--images", type=int, default=2000)
    fr.add_argument("--threads", type=int, default=1)
    fr.add_argument("--out", help="JSON file for the result")

    one_run("errors", "where a trained fashion_det detector's AP50 goes: classification, localisation, item size",
            "a detection run folder", 1000, "the first N test canvases")

    args = parser.parse_args(argv)
    if args.command == "errors":
        errors(args)
        return
    if args.command == "frames":
        frames(args)
        return
    if args.command == "crops":
        write_crops(args)
        return
    if args.command == "plot":
        data = json.loads(Path(args.json).read_text())
        plot_speed_accuracy(data["rows"], args.out, data.get("title", "same backbone, same training budget"))
        print(f"wrote {args.out}")
        return
    if args.command == "time-runs":
        time_runs(args)
        return
    if args.command == "ceiling":
        ceiling(args)
        return
    if args.command == "compare":
        compare(args)
        return
    if args.command == "latency":
        if any(c < 1 for c in args.rcnn_proposals) or args.images < 1:
            parser.error("--images and --rcnn-proposals must be >= 1")
        latency(args)
    else:
        train(args)


if __name__ == "__main__":
    main()

"""Speed of cnnlab's COCO mAP against pycocotools' COCOeval on the same detections, and their equality.

A synthetic COCO-like set (deterministic): 5,000 images of 640 x 480, 20 classes, 1-15 gt boxes per image
(small to large, 5% crowd), 100 detections per image (jittered gt boxes with mostly the right label, plus
random boxes), float32 scores. pycocotools is timed from its loaded ground truth (loadRes, evaluate,
accumulate, summarize), cnnlab from the per-image dicts (validation included). Both run single-threaded.

    OMP_NUM_THREADS=1 python benchmarks/bench_map.py                 # 5,000 x 100 (pycocotools takes minutes)
    OMP_NUM_THREADS=1 python benchmarks/bench_map.py --images 500    # quick look
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time

import numpy as np

from cnnlab._platform import cpu_flags, cpu_name


def make_set(n_images: int, n_dets: int, n_classes: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(seed)
    predictions, targets = [], []
    for _ in range(n_images):
        g = int(rng.integers(1, 16))
        wh = np.exp(rng.uniform(np.log(8), np.log(400), (g, 2)))  # log-uniform sizes: all three area ranges
        xy = rng.uniform(0, 1, (g, 2)) * (np.array([640, 480]) - np.minimum(wh, [639, 479]))
        gt = np.concatenate([xy, np.minimum(xy + wh, [640, 480])], 1).astype(np.float32)
        labels = rng.integers(1, n_classes + 1, g)
        targets.append({"boxes": gt, "labels": labels, "iscrowd": (rng.random(g) < 0.05).astype(np.int64)})
        near = rng.random(n_dets) < 0.6
        src = rng.integers(0, g, n_dets)
        size = gt[src, 2:] - gt[src, :2]
        jitter = rng.normal(0, 0.12, (n_dets, 4)) * np.concatenate([size, size], 1)
        wh = np.exp(rng.uniform(np.log(8), np.log(300), (n_dets, 2)))
        xy = rng.uniform(0, 600, (n_dets, 2))
        boxes = np.where(near[:, None], gt[src] + jitter, np.concatenate([xy, xy + wh], 1))
        boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], 1)
        lab = np.where(near & (rng.random(n_dets) < 0.9), labels[src], rng.integers(1, n_classes + 1, n_dets))
        scores = np.where(near, rng.beta(4, 2, n_dets), rng.beta(2, 4, n_dets))
        predictions.append({"boxes": boxes.astype(np.float32), "scores": scores.astype(np.float32), "labels": lab})
    return predictions, targets


def to_coco(predictions: list[dict], targets: list[dict], n_classes: int):
    from pycocotools.coco import COCO

    anns, results = [], []
    for i, t in enumerate(targets):
        for (x1, y1, x2, y2), c, crowd in zip(t["boxes"].astype(np.float64).tolist(), t["labels"].tolist(),
                                              t["iscrowd"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd})
    for i, p in enumerate(predictions):
        for (x1, y1, x2, y2), s, c in zip(p["boxes"].astype(np.float64).tolist(), p["scores"].tolist(),
                                          p["labels"].tolist()):
            results.append({"image_id": i + 1, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1} for i in range(len(targets))], "annotations": anns,
                      "categories": [{"id": c} for c in range(1, n_classes + 1)]}
        gt.createIndex()
    return gt, results


def run_pycocotools(gt, results) -> np.ndarray:
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-pycocotools", action="store_true")
    args = parser.parse_args()

    from cnnlab.detection.metrics import evaluate

    predictions, targets = make_set(args.images, args.dets, args.classes, args.seed)
    print(f"cpu: {cpu_name()} ({cpu_flags(('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'))})")
    print(f"set: {args.images} images x {args.dets} detections, {args.classes} classes, "
          f"{sum(len(t['labels']) for t in targets)} gt boxes")
    start = time.perf_counter()
    ours = evaluate(predictions, targets, "coco", class_names=[str(c) for c in range(1, args.classes + 1)])
    t_ours = time.perf_counter() - start
    print(f"cnnlab      coco: {t_ours:8.2f} s   AP={ours['AP']:.4f} AP50={ours['AP50']:.4f}")
    for metric in ("voc", "voc07"):
        start = time.perf_counter()
        voc = evaluate(predictions, targets, metric)
        print(f"cnnlab {metric:>5}: {time.perf_counter() - start:8.2f} s   mAP={voc['mAP']:.4f}")
    if args.skip_pycocotools:
        return
    gt, results = to_coco(predictions, targets, args.classes)
    start = time.perf_counter()
    stats = run_pycocotools(gt, results)
    t_ref = time.perf_counter() - start
    diff = float(np.max(np.abs(np.array(list(ours.values())) - stats)))
    print(f"pycocotools coco: {t_ref:8.2f} s   AP={stats[0]:.4f} AP50={stats[1]:.4f}")
    print(f"speed-up: {t_ref / t_ours:.1f}x   max |difference| over the 12 numbers: {diff:.2e}")
    if diff > 1e-6:
        raise SystemExit(f"cnnlab and pycocotools differ by {diff:.3e} (> 1e-6)")


if __name__ == "__main__":
    main()

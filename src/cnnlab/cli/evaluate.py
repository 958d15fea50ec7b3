"""``cnnlab eval RUN`` (classification: accuracy, top-k, per-class precision/recall, confusion matrix; other tasks:
their metrics, detection's mAP table) and ``cnnlab predict RUN IMAGE...``."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a trained run on a test set",
                              description="Evaluate the best (else last) checkpoint of a run folder on the test split "
                                          "of its dataset, or of --data.")
    p.add_argument("run", help="run folder (runs/<name>)")
    p.add_argument("--data", help="another dataset name or image folder with the same classes")
    p.add_argument("--checkpoint", choices=("best", "last"), help="default: best when present, else last")
    p.add_argument("--top", type=int, default=5, help="also report top-k accuracy (default 5)")
    p.add_argument("--device", default="auto")
    p.add_argument("--plot", metavar="PNG", help="write the confusion matrix to this file")
    p.add_argument("--metric", choices=("coco", "voc", "voc07"),
                   help="detection runs: also the mAP by these rules (the COCO numbers are always printed)")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("predict", help="classify image files with a trained run (detection: list the objects)",
                              description="Top-k classes with probabilities for each image file (resized and "
                                          "converted to the model's input size and channels). Detection runs: the "
                                          "objects scored >= 0.5 (up to --top), boxes in the image's own pixels.")
    p.add_argument("run", help="run folder (runs/<name>)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--checkpoint", choices=("best", "last"))
    p.set_defaults(func=cmd_predict)


def cmd_eval(args: argparse.Namespace) -> int:
    from cnnlab._errors import CnnlabError
    from cnnlab.cli._format import table
    from cnnlab.cli._paths import data_argument, make_parent, output_path
    from cnnlab.engine.data_setup import build_data
    from cnnlab.engine.evaluate import evaluate
    from cnnlab.engine.runs import load_run
    from cnnlab.engine.trainer import resolve_device, use_amp

    if args.top < 1:
        raise CnnlabError(f"--top must be >= 1, got {args.top}")
    output_path(args.plot, "--plot", figure=True)
    data_argument(args.data, "--data")
    run = load_run(args.run, args.checkpoint)
    device = resolve_device(args.device)
    data_config = run.config.data
    if args.data:  # other data: all of its training split fits the normalisation
        data_config.name = args.data
        data_config.val_fraction = 0.0
    # else the run's own split, so the normalisation is fitted on the same images as in training and
    # `cnnlab eval RUN` reproduces results.json
    if args.metric and run.task != "detection":
        raise CnnlabError(f"--metric chooses a detection mAP; {args.run} is a {run.task} run")
    if run.task != "classification":  # the task's own data and metrics (classification's tables follow below)
        return _eval_task(args, run, device)
    data = build_data(data_config, device, seed=run.config.seed, channels_last=run.config.model.channels_last,
                      in_channels=run.input_shape[0])
    if data.classes != run.classes:
        raise CnnlabError(f"--data {data_config.name} has classes {data.classes[:5]}..., the run was trained on "
                          f"{run.classes[:5]}...; they must match")
    if data.input_shape != run.input_shape:
        raise CnnlabError(f"--data {data_config.name} has images of shape {data.input_shape}, the run was trained on "
                          f"{run.input_shape}; set data.image_size in a folder run or use matching data")
    model = run.model.to(device)
    result = evaluate(model, data.test, len(run.classes), amp=use_amp(run.config.amp, device),
                      tta_flip=run.config.tta_flip, topk=(args.top,))
    print(f"{args.run} ({run.tag} checkpoint, epoch {run.epoch}) on {data_config.name} test split: {result.count} images")
    print(f"  accuracy {result.accuracy:.4f}" + "".join(f"   top-{k} {v:.4f}" for k, v in result.topk.items())
          + f"   loss {result.loss:.4f}")
    if args.top not in result.topk:  # evaluate() leaves out a k that covers every class
        n = len(run.classes)
        print(f"  (no top-{args.top} accuracy: the run has {n} classes, so every image's class is among the top "
              f"{args.top} and it would be 1.0 by definition; use --top {max(n - 1, 1)} or less)")
    print()
    rows = [[c, f"{p:.4f}", f"{r:.4f}", int(n)] for c, p, r, n in
            zip(run.classes, result.precision.tolist(), result.recall.tolist(), result.confusion.sum(1).tolist())]
    print(table(["class", "precision", "recall", "support"], rows, align="lrrr"))
    if len(run.classes) <= 20:
        print("\nconfusion matrix (rows: true, columns: predicted):")
        print(table(["true \\ pred"] + [str(i) for i in range(len(run.classes))],
                    [[f"{i} {c[:12]}"] + row for i, (c, row) in enumerate(zip(run.classes, result.confusion.tolist()))]))
    if args.plot:
        from cnnlab.engine.report import plot_confusion

        print(f"\nconfusion matrix plot: {plot_confusion(make_parent(args.plot, '--plot'), result.confusion, run.classes)}")
    return 0


def _eval_task(args: argparse.Namespace, run, device) -> int:
    """A run of another task: its data through the task (detection: lists of images), its metrics and tables."""
    from cnnlab._errors import CnnlabError
    from cnnlab.engine.tasks import get_task
    from cnnlab.engine.trainer import use_amp

    task = get_task(run.task, loss=run.config.loss)
    data = task.build_data(run.config, device)
    name = run.config.data.name
    if data.classes != run.classes:
        raise CnnlabError(f"--data {name} has classes {data.classes[:5]}..., the run was trained on "
                          f"{run.classes[:5]}...; they must match")
    if run.task != "detection" and data.input_shape != run.input_shape:  # detectors take images of any size
        raise CnnlabError(f"--data {name} has images of shape {data.input_shape}, the run was trained on "
                          f"{run.input_shape}; set data.image_size in a folder run or use matching data")
    task.prepare(data)
    result = task.evaluate(run.model.to(device), data.test, data, amp=use_amp(run.config.amp, device),
                           tta_flip=run.config.tta_flip)
    print(f"{args.run} ({run.tag} checkpoint, epoch {run.epoch}) on {name} test split: {result.count} images")
    print("  " + task.headline(result) + (f", loss {result.loss:.4f}" if run.task == "detection" else ""))
    if run.task == "detection":
        _print_map(result, data.classes, args.metric)
    if run.task == "segmentation":
        _print_iou(result)
    return 0


def _print_iou(result) -> None:
    """Per-class IoU and accuracy of a segmentation evaluation (all test pixels counted together)."""
    from cnnlab.cli._format import table
    from cnnlab.engine.tasks.segmentation import per_class_rows

    def cell(v):
        return "-" if v is None else f"{v:.4f}"

    rows = per_class_rows(result.details, result.details["classes"])
    print("\nper class (-: the class is in neither the truth nor the prediction, or has no true pixel):")
    print(table(["class", "IoU", "acc", "true px", "predicted px"],
                [[r["class"], cell(r["iou"]), cell(r["acc"]), r["gt_pixels"], r["pred_pixels"]] for r in rows],
                align="lrrrr"))


def _print_map(result, classes: list[str], metric: str | None) -> None:
    """The twelve COCO numbers (as pycocotools prints them), per-class AP, and another metric's mAP if asked."""
    from cnnlab.cli._format import table
    from cnnlab.detection.metrics import evaluate as mean_ap

    found = result.details["map"]
    print()
    print(table(list(found), [[f"{v:.4f}" for v in found.values()]], align="r" * len(found)))
    print("\nper class (COCO: AP at IoU 0.50:0.95, AP50 at 0.5; gt: boxes that are not crowd; -1: no gt):")
    print(table(["class", "gt", "AP", "AP50"], [[c, found.num_gt[c], f"{found.per_class[c]:.4f}",
                                                  f"{(found.per_class_ap50 or {}).get(c, -1.0):.4f}"]
                                                 for c in found.classes], align="lrrr"))
    if metric and metric != "coco":
        voc = mean_ap(result.details["predictions"], result.details["targets"], metric, class_names=classes)
        print(f"\n{metric} (IoU 0.5{', 11-point' if metric == 'voc07' else ', all points'}): mAP {voc['mAP']:.4f}")
        print(table(["class", "gt", "AP"], [[c, voc.num_gt[c], f"{voc.per_class[c]:.4f}"] for c in voc.classes],
                    align="lrr"))


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from cnnlab._errors import CnnlabError
    from cnnlab.data.folder import read_image
    from cnnlab.engine.data_setup import preprocess_from_state
    from cnnlab.engine.runs import load_run

    if args.top < 1:
        raise CnnlabError(f"--top must be >= 1, got {args.top}")
    run = load_run(args.run, args.checkpoint)
    if run.task == "detection":  # at each image's own size, so the boxes are in its pixels (cnnlab detect draws them)
        return _predict_detection(args, run)
    channels, height, width = run.input_shape
    preprocess = preprocess_from_state(run.preprocess)
    images = torch.stack([read_image(path, channels, (height, width)) for path in args.images])  # errors name the file
    x = images.float() / 255
    if preprocess is not None:
        x = preprocess(x)
    from cnnlab.engine.tasks import get_task

    task = get_task(run.task, loss=run.config.loss)
    with torch.no_grad():
        outputs = run.model(x)
    for path, line in zip(args.images, task.predict_lines(images.float() / 255, outputs, run.classes, args.top)):
        print(f"{path}: {line}")
    return 0


def _predict_detection(args: argparse.Namespace, run) -> int:
    import torch

    from cnnlab.data.folder import read_image
    from cnnlab.engine.tasks import get_task

    images = [read_image(path, 3, None).float() / 255 for path in args.images]  # errors name the file
    task = get_task(run.task, loss=run.config.loss)
    with torch.no_grad():
        outputs = [run.model([image])[0] for image in images]
    for path, line in zip(args.images, task.predict_lines(images, outputs, run.classes, args.top)):
        print(f"{path}: {line}")
    return 0

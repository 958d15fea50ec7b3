"""Detection: torchvision's interface (lists of images, per-image target dicts), named losses, COCO mAP.

A detector takes ``images: list[Tensor[C, H, W]]`` in [0, 1] and, in training, ``targets`` (``boxes`` x1, y1,
x2, y2 and ``labels`` 1..K) and returns a dict of named losses; in eval it returns one dict of ``boxes``,
``labels``, ``scores`` per image. The task sums the named losses into the loss it trains and keeps each
(``train_loss_classifier``, ``train_loss_box_reg``, ... in metrics.csv); its metrics are pycocotools' twelve
COCO numbers (``cnnlab.detection.metrics.evaluate``), and a run is judged by ``val_AP``. See docs/detection.md.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.engine.tasks.base import LossMeter, StepOutput, Task, TaskResult

# pycocotools' COCOeval.summarize, in its order (test split: all twelve; results.json, the eval table)
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# the per-epoch validation columns (val_AP ...): the area-range numbers are noisy on small sets, and the
# twelve panels would crowd the learning curves
EPOCH_METRICS = ("AP", "AP50", "AP75", "AR100")
# the modules that switch between losses and detections with train()/eval(): kept in training mode for the
# validation loss, while every layer (BatchNorm, dropout, drop-path) stays in eval mode
DETECTOR_MODULES = ("cnnlab.detection", "torchvision.models.detection")
VAL_LOSS_SEED = 0  # the proposal and RoI sampling of the validation loss: the same on every pass
EVAL_CHUNK = 8  # images per forward in evaluation, whatever the loader's batch (data.eval_batch_size)
DRAW_SCORE_THRESH = 0.5
DRAWN_IMAGES = 8
TRUE_COLOUR, PRED_COLOUR = "#00d000", "#ff2a2a"


def loss_key(name: str) -> str:
    """A model's loss name as a metrics key: ``loss_classifier`` stays, ``classifier`` becomes ``loss_classifier``."""
    return name if name.startswith("loss") else f"loss_{name}"


def named_losses(output: Any) -> dict[str, torch.Tensor]:
    """The training-mode output of a detector, checked: ``{loss name: scalar float32 tensor}``."""
    if not isinstance(output, Mapping) or not output:
        raise CnnlabError("a detection model in training mode must return a dict of named losses (torchvision's "
                          f"interface: {{'loss_classifier': ..., 'loss_box_reg': ...}}), got {type(output).__name__}")
    losses = {}
    for name, value in output.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise CnnlabError(f"the detection loss {name!r} must be a scalar tensor, got "
                              f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}")
        losses[loss_key(str(name))] = value.float().reshape(())
    return losses


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(losses.values())).sum()


def unpack_batch(batch: Any) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """``(images, targets)`` of a detection loader, or a CnnlabError saying what a detection batch is."""
    expected = ("detection batches are (list of C x H x W images, list of target dicts with boxes and labels), "
                "as cnnlab.data.collate_detection makes them; use a detection dataset (fashion_det, trees, "
                "voc:PATH, coco:PATH/annotations.json)")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise CnnlabError(f"{expected}; got a {type(batch).__name__}")
    images, targets = batch
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)  # a stacked batch of same-size images is a list too
    if not isinstance(images, (list, tuple)) or not isinstance(targets, (list, tuple)):
        raise CnnlabError(f"{expected}; got {type(images).__name__} and {type(targets).__name__}")
    if len(images) != len(targets) or not all(isinstance(t, Mapping) for t in targets):
        raise CnnlabError(f"{expected}; got {len(images)} images and {len(targets)} targets")
    return list(images), list(targets)


def model_targets(targets: Sequence[Mapping[str, Any]], drop_degenerate: bool = False) -> list[dict[str, torch.Tensor]]:
    """What a box detector learns from: ``boxes`` and ``labels`` (masks, areas, ids left out: the detector's
    transform would resize masks it never reads). Crowd regions are not objects to learn and are left out, as
    detectron2 does; ``drop_degenerate`` also drops boxes of zero width or height (validation targets keep
    them for mAP, but a detector refuses them in training mode)."""
    out = []
    for t in targets:
        boxes, labels = t["boxes"], t["labels"]
        keep = None
        if "iscrowd" in t:
            keep = torch.as_tensor(t["iscrowd"], device=boxes.device).reshape(-1) == 0
        if drop_degenerate and len(boxes):
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            keep = valid if keep is None else keep & valid
        if keep is not None and not bool(keep.all()):
            boxes, labels = boxes[keep], labels[keep]
        out.append({"boxes": boxes, "labels": labels})
    return out


def detect(model: nn.Module, images: list[torch.Tensor], tiles: tuple[int, float] | None = None) -> list[dict]:
    """``model(images)`` in eval mode, or with ``tiles = (tile_size, overlap)`` each image by overlapping windows
    merged (``cnnlab.detection.tiling.predict_tiled``): the detections of ``data.eval_tile`` runs."""
    if tiles is None:
        return model(images)
    from cnnlab.detection.tiling import predict_tiled

    return [predict_tiled(model, image, tiles[0], tiles[1], batch_size=EVAL_CHUNK) for image in images]


def _cpu_prediction(p: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"boxes": p["boxes"].detach().float().cpu(), "labels": p["labels"].detach().long().cpu(),
            "scores": p["scores"].detach().float().cpu()}


def _cpu_target(t: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The fields mAP reads (crowd regions, annotated areas, VOC's difficult), on the CPU."""
    out = {"boxes": t["boxes"].detach().float().cpu(), "labels": t["labels"].detach().long().cpu()}
    for key in ("iscrowd", "area", "difficult"):
        if key in t:
            out[key] = torch.as_tensor(t[key]).detach().cpu()
    return out


def _loss_mode(model: nn.Module) -> None:
    """Training mode for the detector's own modules only (they sample and return losses), eval for every layer."""
    model.eval()
    model.training = True
    for module in model.modules():
        if type(module).__module__.startswith(DETECTOR_MODULES):
            module.training = True


def _chunks(batches: Any, size: int = EVAL_CHUNK):
    """The loader's batches cut into forwards of at most ``size`` images (an evaluation batch of 1000 images would
    be one padded tensor of 1000 images and their feature maps: gigabytes)."""
    for batch in batches:
        images, targets = unpack_batch(batch)
        for start in range(0, len(images), size):
            yield images[start:start + size], targets[start:start + size]


def training_box_wh(model: nn.Module, batches: Any, max_boxes: int = 20_000) -> torch.Tensor:
    """(N, 2) widths and heights of the training boxes in the model's input pixels (``model.input_box_wh``), crowd
    and degenerate boxes left out. Tensor-resident sets are read directly (all boxes); others batch by batch until
    ``max_boxes`` are seen (k-means and the anchor check need a sample, not every image decoded), with the global
    RNG streams untouched (the run's augmentation draws stay those of a run without the pass)."""
    if all(hasattr(batches, a) for a in ("boxes", "offsets", "images")):  # TensorDetectionBatches: one image size
        boxes = batches.boxes.float()
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return model.input_box_wh(boxes[keep], tuple(batches.images.shape[-2:])).cpu()
    found, seen = [], 0
    with torch.random.fork_rng(devices=[]):
        for batch in batches:
            images, targets = unpack_batch(batch)
            for image, target in zip(images, model_targets(targets, drop_degenerate=True)):
                found.append(model.input_box_wh(target["boxes"], tuple(image.shape[-2:])).cpu())
                seen += len(found[-1])
            if seen >= max_boxes:
                break
    return torch.cat(found) if found else torch.zeros(0, 2)


class _DetectionMeter(LossMeter):
    """The mean total loss and the mean of each named loss, summed on the device (one host sync per epoch)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.sums: dict[str, torch.Tensor] = {}

    def update(self, out: StepOutput) -> None:
        super().update(out)
        for name, value in out.output.items():
            weighted = value.detach().float() * out.count
            self.sums[name] = self.sums[name] + weighted if name in self.sums else weighted

    def compute(self) -> dict[str, float]:
        values = super().compute()
        if self.sums:
            sums = torch.stack(list(self.sums.values())).tolist()
            values.update({name: s / max(self.seen, 1) for name, s in zip(self.sums, sums)})
        return values


class DetectionTask(Task):
    """Detectors with torchvision's interface; mAP by COCO's rules; best checkpoint by ``val_AP``.

    The validation loss is the training loss on the validation images: the detector's own modules in training
    mode (they sample anchors and RoIs, with the sampling seeded so every pass draws the same), every layer in
    eval mode (BatchNorm statistics and dropout untouched), no gradients. It costs a second forward pass per
    image (``DetectionTask.compute_loss = False`` skips it: the losses are then NaN) and gives the learning curves
    a validation loss to read over-fitting from. Evaluation runs in float32
    whatever ``amp`` says (as torchvision's references evaluate): bf16 box regressions would move boxes by
    pixels on large images, and mAP at IoU 0.95 with them.
    """

    name = "detection"
    metrics = EPOCH_METRICS
    losses = ("sum",)  # the sum of the named losses the model returns
    uses_labels = False
    model_takes_num_classes = True  # K + 1: the background counts, as in torchvision
    default_monitor = "val_AP"
    # the second (loss) pass per evaluated image; False: val_loss/test_loss are NaN and evaluation takes half the time
    compute_loss: bool = True

    def __init__(self, loss: str = "auto") -> None:
        super().__init__(loss)
        self._teacher = None  # config.distill's classifier, teaching an SSD's class scores per box
        self._distill = None  # the run's DistillConfig, for results.json

    @staticmethod
    def model_kwargs(num_classes: int, input_shape: Sequence[int]) -> dict[str, int]:
        """``create_model`` arguments for data with ``num_classes`` foreground classes (the background is added)."""
        kwargs = {"num_classes": int(num_classes) + 1}
        if int(input_shape[0]) != 3:  # detectors are RGB by default; only other inputs name their channels
            kwargs["in_channels"] = int(input_shape[0])
        return kwargs

    def build_data(self, config, device):
        if config.data.mixup or config.data.cutmix:
            raise CnnlabError("data.mixup and data.cutmix mix class labels of whole images; detection targets are "
                              "boxes: set them to 0")
        if config.tta_flip:
            raise CnnlabError("tta_flip averages a classifier's logits over mirrored images; the detection task has "
                              "no test-time flipping: set tta_flip=false")
        try:
            from cnnlab.data.detection_data import build_detection_data
        except ImportError as e:
            raise CnnlabError(f"detection data cannot be loaded ({e}); cnnlab.data.detection_data is missing") from None
        return build_detection_data(config.data, device, seed=config.seed)

    def build_model(self, config, data, weights):
        from cnnlab.engine.tasks._model import load_model_weights
        from cnnlab.models import create_model

        options = dict(config.model.options)
        kwargs = self.model_kwargs(data.num_classes, data.input_shape)
        given = options.pop("num_classes", kwargs["num_classes"])
        if given != kwargs["num_classes"]:
            raise CnnlabError(f"model.options.num_classes={given} but data {config.data.name!r} has "
                              f"{data.num_classes} classes, so the detector needs {kwargs['num_classes']} (the "
                              "background counts); leave it out (it comes from the data)")
        options.pop("in_channels", None)
        from_file = weights is not None and weights not in ("torchvision", "timm")
        model = create_model(config.model.name, weights=None if from_file else weights, **kwargs, **options)
        if callable(getattr(model, "fit_to_data", None)):  # parts fitted to the data (YOLOv3's k-means anchors)
            model.fit_to_data(training_box_wh(model, data.train), seed=config.seed)
        if from_file:  # (a checkpoint's fitted parts, anchors included, replace the fit)  # a whole detector's weights; only its class-specific predictor may differ in size
            load_model_weights(model, weights, config.model.name, default_head="roi_heads.box_predictor")
        distill = getattr(config, "distill", None)
        if distill is not None and distill.teacher is not None:
            self._prepare_teacher(config, data, model)  # a wrong teacher fails now, before the first step
        return model

    def _prepare_teacher(self, config, data, model: nn.Module) -> None:
        """``config.distill``'s classifier as a box teacher (loaded once, on the CPU), for a detector that takes one
        (SSD: ``distill_from``) on data of the teacher's classes."""
        from cnnlab.compress.distill import Teacher

        if not callable(getattr(model, "distill_from", None)):
            raise CnnlabError(f"distill.teacher (--teacher) teaches a detector's class scores per box; "
                              f"{config.model.name} has no such loss (SSD and ssd300_vgg16 do): leave the teacher out")
        if self._teacher is None or self._distill.teacher != config.distill.teacher:
            teacher = Teacher.load(config.distill.teacher)
            teacher.check_box_classes(data.classes)
            self._teacher, self._distill = teacher, config.distill
        model.distill_from(config.distill.temperature, config.distill.alpha)

    def _with_teacher_logits(self, images: list[torch.Tensor], targets: list[dict]) -> list[dict]:
        """Each target with ``teacher_logits`` (N, K): the teacher's view of every box's crop of the training image
        as the step sees it (augmented), without gradients."""
        teacher = self._teacher
        device = images[0].device if images else torch.device("cpu")
        if teacher.placement != (device, False):
            teacher.to(device)
        logits = teacher.box_logits(images, [t["boxes"] for t in targets]).split([len(t["boxes"]) for t in targets])
        return [{**t, "teacher_logits": z} for t, z in zip(targets, logits)]

    def prepare(self, data) -> None:
        if not data.classes:
            raise CnnlabError("the detection data names no classes; a detector needs at least one (labels 1..K)")

    def step(self, net, batch, config):
        images, targets = unpack_batch(batch)
        targets = model_targets(targets)
        if self._teacher is not None:
            targets = self._with_teacher_logits(images, targets)
        losses = named_losses(net(images, targets))
        return StepOutput(total_loss(losses), losses, None, len(images))

    def meter(self, device):
        return _DetectionMeter(device)

    @torch.no_grad()
    def evaluate(self, model, batches, data, *, amp=False, tta_flip=False):
        from cnnlab.detection.metrics import evaluate as mean_ap

        if tta_flip:
            raise CnnlabError("the detection task has no test-time flipping (tta_flip); set tta_flip=false")
        was_training = model.training
        device = next(model.parameters()).device
        meter = _DetectionMeter(device)
        tiles = getattr(data, "eval_tiles", None)
        predictions: list[dict[str, torch.Tensor]] = []
        targets: list[dict[str, torch.Tensor]] = []
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        try:  # the sampling of the loss pass must not move the training's random streams
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(VAL_LOSS_SEED)
                for images, batch_targets in _chunks(batches):
                    model.eval()
                    # float32 (not under amp): bf16 box deltas move boxes by pixels
                    outputs = detect(model, images, tiles)
                    if len(outputs) != len(images):
                        raise CnnlabError(f"a detection model in eval mode must return one dict per image; got "
                                          f"{len(outputs)} for {len(images)} images")
                    predictions += [_cpu_prediction(p) for p in outputs]
                    targets += [_cpu_target(t) for t in batch_targets]
                    if self.compute_loss and tiles is None:  # tiled: no whole-image loss pass (NaN)
                        _loss_mode(model)
                        losses = named_losses(model(images, model_targets(batch_targets, drop_degenerate=True)))
                        meter.update(StepOutput(total_loss(losses), losses, None, len(images)))
        finally:
            model.train(was_training)
        found = mean_ap(predictions, targets, "coco", class_names=data.classes)
        values = meter.compute() if meter.seen else {}
        loss = values.pop("loss", math.nan)
        return TaskResult(loss=loss, metrics={k: float(found[k]) for k in COCO_METRICS}, count=len(predictions),
                          details={"map": found, "losses": values, "predictions": predictions, "targets": targets})

    def higher_is_better(self, metric: str) -> bool:
        name = metric.removeprefix("train_").removeprefix("val_").removeprefix("test_")
        return not name.startswith("loss")  # the named losses too (loss_classifier ...)

    def monitor_keys(self) -> tuple[str, ...]:
        # val_loss is the config's default and means the task's (val_AP): see default_monitor
        return tuple(f"val_{m}" for m in self.metrics)

    def summary(self, test: TaskResult) -> dict[str, Any]:
        found = test.details.get("map")
        out: dict[str, Any] = {"test_loss": test.loss, **{f"test_{k}": v for k, v in test.metrics.items()},
                               "metric": "coco", "test_losses": test.details.get("losses", {})}
        if found is not None:
            out["per_class"] = per_class_rows(found)
        if self._teacher is not None:  # a distilled run says from whom and how
            out.update(self._teacher.describe(), temperature=self._distill.temperature, alpha=self._distill.alpha)
        return out

    def headline(self, test: TaskResult) -> str:
        m = test.metrics
        return f"test AP {m['AP']:.4f}, AP50 {m['AP50']:.4f}, AP75 {m['AP75']:.4f}, AR100 {m['AR100']:.4f}"

    def plots(self, run_dir: Path, test: TaskResult, data, model: nn.Module) -> None:
        found = test.details.get("map")
        if found is not None:
            plot_pr_curves(run_dir / "pr_curves.png", found)
        split = data.val if data.val is not None else data.test
        plot_detections(run_dir / "detections.png", model, split, data.classes,
                        "validation" if data.val is not None else "test", tiles=getattr(data, "eval_tiles", None))

    def predict_lines(self, images, outputs, classes, top):
        lines = []
        for out in outputs:
            keep = out["scores"] >= DRAW_SCORE_THRESH
            boxes, labels, scores = out["boxes"][keep][:top], out["labels"][keep][:top], out["scores"][keep][:top]
            found = [f"{_name(classes, int(c))} {s:.0%} at ({', '.join(f'{v:.0f}' for v in b.tolist())})"
                     for b, c, s in zip(boxes, labels.tolist(), scores.tolist())]
            lines.append(f"{int(keep.sum())} objects scored >= {DRAW_SCORE_THRESH:.0%}" + (": " + "; ".join(found)
                                                                                           if found else ""))
        return lines


def _name(classes: Sequence[str], label: int) -> str:
    return str(classes[label - 1]) if 1 <= label <= len(classes) else str(label)


def per_class_rows(found: Any) -> list[dict[str, Any]]:
    """results.json's per-class table: class, ground-truth boxes, AP@[.5:.95], AP50 (-1: no ground truth)."""
    ap50 = found.per_class_ap50 or {}
    return [{"class": str(c), "gt": int(found.num_gt[c]), "AP": float(found.per_class[c]),
             "AP50": float(ap50.get(c, -1.0))} for c in found.classes]


# ---------------------------------------------------------------- drawing


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A float image in [0, 1] (1 or 3 channels) -> uint8 RGB on the CPU, for drawing."""
    image = image.detach().float().cpu()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def draw_detections(image: torch.Tensor, prediction: Mapping[str, torch.Tensor] | None, classes: Sequence[str], *,
                    target: Mapping[str, torch.Tensor] | None = None, score_thresh: float = DRAW_SCORE_THRESH,
                    min_side: int = 0) -> torch.Tensor:
    """uint8 (3, H', W') with the true boxes (green) and the predictions scored >= ``score_thresh`` (red,
    labelled "class score" in white on red), drawn by ``torchvision.utils.draw_bounding_boxes``.

    Args:
        image: (C, H, W) float in [0, 1] or uint8. prediction: boxes, labels, scores at the image's size.
        classes: names of labels 1..K. target: the ground truth (boxes, labels) or None.
        min_side: enlarge (nearest neighbour) so the shorter side is at least this, to keep labels legible.
    """
    from torchvision.utils import draw_bounding_boxes

    canvas = image.cpu() if image.dtype == torch.uint8 else to_uint8(image)
    if canvas.shape[0] == 1:
        canvas = canvas.expand(3, -1, -1)
    scale = max(1, math.ceil(min_side / max(min(canvas.shape[1:]), 1))) if min_side else 1
    if scale > 1:
        canvas = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    canvas = canvas.contiguous()
    if target is not None and len(target["boxes"]):
        canvas = draw_bounding_boxes(canvas, target["boxes"].detach().float().cpu() * scale, colors=TRUE_COLOUR,
                                     width=1)
    if prediction is not None:
        keep = prediction["scores"].detach().cpu() >= score_thresh
        boxes = prediction["boxes"].detach().float().cpu()[keep]
        if len(boxes):
            labels = [f"{_name(classes, int(c))} {s:.2f}" for c, s in
                      zip(prediction["labels"].cpu()[keep].tolist(), prediction["scores"].cpu()[keep].tolist())]
            canvas = draw_bounding_boxes(canvas, boxes * scale, labels=labels, colors=PRED_COLOUR,
                                         width=2 if scale > 1 else 1, fill_labels=True, label_colors="white")
    return canvas


@torch.no_grad()
def plot_detections(path: Path, model: nn.Module, batches: Any, classes: Sequence[str], split: str,
                    count: int = DRAWN_IMAGES, tiles: tuple[int, float] | None = None) -> Path | None:
    """The first ``count`` images of ``batches`` with their true boxes and the model's predictions (by ``tiles``
    when given, see :func:`detect`), in a grid."""
    from cnnlab._plot import pyplot, save_figure

    images, targets = [], []
    for ims, tgts in _chunks(batches, count):
        images += ims
        targets += tgts
        if len(images) >= count:
            break
    images, targets = images[:count], targets[:count]
    if not images:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            predictions = [_cpu_prediction(p) for p in detect(model, images, tiles)]
    finally:
        model.train(was_training)
    drawn = [draw_detections(im, p, classes, target=t, min_side=192) for im, p, t in zip(images, predictions, targets)]
    plt = pyplot()
    cols = min(4, len(drawn))
    rows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p in zip(axes.flat, drawn, targets, predictions):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(f"{len(t['boxes'])} true, {int((p['scores'] >= DRAW_SCORE_THRESH).sum())} found", fontsize=8)
    fig.suptitle(f"{split} images: true boxes green, predictions scored >= {DRAW_SCORE_THRESH} red")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_pr_curves(path: Path, found: Any) -> Path | None:
    """Precision against recall per class at IoU 0.5 and 0.75 (COCO's 101-point interpolated curves)."""
    from cnnlab._plot import pyplot, save_figure

    curves = {iou: found.pr_curves(iou) for iou in (0.5, 0.75)}
    if not curves[0.5]:
        return None  # no class has ground truth
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), squeeze=False)
    ap50 = found.per_class_ap50 or {}
    for ax, (iou, by_class) in zip(axes.flat, curves.items()):
        for c, (recall, precision) in by_class.items():
            label = f"{c} (AP50 {ap50.get(c, float('nan')):.3f})" if iou == 0.5 else str(c)
            ax.plot(recall, precision.clip(min=0), label=label.replace("$", r"\$"))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"IoU {iou}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("test precision-recall per class (COCO 101-point interpolation, up to 100 detections per image)")
    fig.tight_layout()
    return save_figure(fig, path)


def report_sections(run_dir: Path, results: dict[str, Any]) -> list:
    """report.html's part for a detection run: per-class AP, PR curves, drawn validation images."""
    from cnnlab.engine.html_report import ReportSection

    if not results:
        return []  # still training: the tables and images come from the final model
    run_dir = Path(run_dir)
    sections = []
    rows = results.get("per_class") or []
    if rows:
        sections.append(ReportSection(
            "Per-class AP", "Test split, COCO rules: AP is averaged over IoU 0.50:0.05:0.95, AP50 at IoU 0.5; gt "
                            "counts the boxes that are not crowd regions; -1 marks a class with no test boxes.",
            table=[dict(r) for r in rows]))
    sections.append(ReportSection(
        "Precision-recall curves", "Per class at IoU 0.5 (left) and 0.75 (right). A curve that stays high to a "
                                   "large recall finds most objects without false alarms; a short curve misses "
                                   "objects (proposals or score threshold), a low one confuses classes or boxes.",
        images=[run_dir / "pr_curves.png"]))
    sections.append(ReportSection(
        "Detections", f"The first validation images (test images when the run had no validation split): true "
                      f"boxes green, the reported model's predictions scored >= {DRAW_SCORE_THRESH} red.",
        images=[run_dir / "detections.png"]))
    return sections

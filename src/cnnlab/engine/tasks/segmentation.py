"""Semantic segmentation: per-pixel cross-entropy (and Dice), mIoU from a dataset-wide confusion matrix.

A segmentation model takes a normalised float batch ``(N, C, H, W)`` and returns per-pixel logits
``(N, K, H, W)`` at the input size, or ``{"out": logits, "aux": logits}`` when an auxiliary head is on (both at
the input size, in training and eval mode alike, as torchvision's models do). ``K`` counts the background,
class 0. Loaders yield ``(images, masks)``: float images and int64 masks ``(N, H, W)`` where the ignore index
(255: VOC's borders and the padding of ``SegmentationCollate``) marks pixels that count in no loss and no
metric. The metrics are :class:`cnnlab.segmentation.metrics.SegmentationMetrics`' (mIoU over the classes
present, as mmsegmentation); a run is judged by ``val_miou``. See docs/segmentation.md.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.engine.tasks.base import LossMeter, StepOutput, Task, TaskResult
from cnnlab.segmentation.metrics import IGNORE_INDEX, SegmentationMetrics, check_labels

# the auxiliary head's loss weight: PSPNet's 0.4 (Zhao et al. 2017, sec. 4.1), torchvision's reference 0.5
AUX_LOSS_WEIGHT = 0.4
DRAWN_IMAGES = 8
# images per forward in evaluation, whatever the loader's batch (data.eval_batch_size is 1000 by default: one
# forward of 1000 images would hold gigabytes of feature maps)
EVAL_CHUNK = 16
OVERLAY_ALPHA = 0.55
EPOCH_METRICS = ("miou", "pixel_acc")


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """PASCAL VOC's colour map (its devkit's ``labelcolormap``): label 0 black, 1 dark red, 2 green, ... and the
    ignore label 255 cream (224, 224, 192). The bits of the label are spread over R, G and B, so neighbouring
    labels get distinct colours."""
    colours = []
    for label in range(n):
        r = g = b = 0
        c = label
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return colours


PALETTE = voc_palette()


def split_output(output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main logits, auxiliary logits or None) of a segmentation model's output: a tensor, or a dict with ``out``
    (and ``aux``)."""
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, Mapping) and isinstance(output.get("out"), torch.Tensor):
        aux = output.get("aux")
        if aux is not None and not isinstance(aux, torch.Tensor):
            raise CnnlabError(f"a segmentation model's 'aux' output must be logits (N, K, H, W), got {type(aux).__name__}")
        return output["out"], aux
    raise CnnlabError("a segmentation model must return per-pixel logits (N, K, H, W), or a dict {'out': logits, "
                      f"'aux': logits}} with an auxiliary head; got {type(output).__name__}"
                      + (f" with keys {sorted(output)}" if isinstance(output, Mapping) else ""))


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, C, H, W) float, masks (N, H, W) int64)`` of a segmentation loader, or a clear CnnlabError."""
    expected = ("segmentation batches are (images N x C x H x W float, masks N x H x W int64), as "
                "cnnlab.data.collate.SegmentationCollate stacks them; use a segmentation dataset (fashion_seg, "
                "vocseg:PATH, masks:PATH)")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise CnnlabError(f"{expected}; got a {type(batch).__name__}")
    images, masks = batch
    if not isinstance(images, torch.Tensor) or not isinstance(masks, torch.Tensor):
        raise CnnlabError(f"{expected}; got {type(images).__name__} and {type(masks).__name__}")
    if images.ndim != 4 or masks.ndim != 3 or len(images) != len(masks) or images.shape[2:] != masks.shape[1:]:
        raise CnnlabError(f"{expected}; got images {tuple(images.shape)} and masks {tuple(masks.shape)}")
    if masks.is_floating_point() or masks.dtype == torch.bool:
        raise CnnlabError(f"{expected}; the masks are {masks.dtype}, not integer class labels")
    return images, masks.long()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the pixels that are not ``ignore_index``; 0 (not NaN) when every pixel is."""
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp(min=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, eps: float = 1e-7) -> torch.Tensor:
    """Soft Dice loss over the batch, as segmentation_models_pytorch's ``DiceLoss("multiclass")``: per class
    ``1 - 2|P∩T| / (|P| + |T|)`` with P the softmax probabilities and T the one-hot target summed over the batch's
    counted pixels, classes absent from the batch's target contributing 0, averaged over all K classes."""
    k = logits.shape[1]
    probs = logits.float().softmax(1).flatten(2)  # (N, K, P)
    t = target.flatten(1)  # (N, P)
    valid = (t != ignore_index).unsqueeze(1)  # (N, 1, P)
    probs = probs * valid
    # one-hot by scatter (F.one_hot checks the label range with a host sync on GPUs)
    onehot = torch.zeros_like(probs).scatter_(1, torch.where(valid, t.unsqueeze(1), 0), 1.0) * valid
    intersection = (probs * onehot).sum((0, 2))
    cardinality = (probs + onehot).sum((0, 2))
    dice = 2 * intersection / cardinality.clamp(min=eps)
    present = onehot.sum((0, 2)) > 0
    return ((1 - dice) * present).sum() / k


class _SegmentationMeter(LossMeter):
    """The mean loss and a pixel confusion matrix of the epoch's batches (on the device; one sync at compute)."""

    def __init__(self, device: torch.device, num_classes: int | None, ignore_index: int) -> None:
        super().__init__(device)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.metrics: SegmentationMetrics | None = None

    def update(self, out: StepOutput) -> None:
        super().update(out)
        if self.metrics is None:
            self.metrics = SegmentationMetrics(self.num_classes or out.output.shape[1], self.ignore_index)
        self.metrics.update(out.output, out.target)

    def compute(self, reduce: bool = True) -> dict[str, Any]:
        values = super().compute()
        if self.metrics is None:
            return {**values, "miou": math.nan, "pixel_acc": math.nan}
        if reduce:  # the training shards of every rank (a no-op outside torchrun)
            self.metrics.all_reduce()
        found = self.metrics.compute()
        return {**values, "miou": found["miou"], "pixel_acc": found["pixel_acc"]}


class SegmentationTask(Task):
    """Per-pixel classifiers; cross-entropy with the ignore index; mIoU over the whole split; best by ``val_miou``.

    Losses (``--set loss=``): ``ce`` (default), ``dice`` (soft Dice, smp's multiclass definition) and
    ``ce+dice`` (their sum). A model with an auxiliary head (``{"out", "aux"}``) adds
    ``aux_weight x`` the same loss of its auxiliary logits (0.4, PSPNet's), in training and in the validation
    loss alike; the metrics read ``out`` only. The training metrics (``train_miou``, ``train_pixel_acc``) come
    from the training batches as they were trained on (augmented, the model in training mode).
    """

    name = "segmentation"
    metrics = EPOCH_METRICS
    losses = ("ce", "dice", "ce+dice")
    uses_labels = False  # mixup and cutmix mix whole-image labels
    model_takes_num_classes = True  # K counts the background, class 0
    default_monitor = "val_miou"
    aux_weight: float = AUX_LOSS_WEIGHT

    def __init__(self, loss: str = "auto") -> None:
        super().__init__(loss)
        self.num_classes: int | None = None
        self.ignore_index = IGNORE_INDEX

    @staticmethod
    def model_kwargs(num_classes: int, input_shape: Sequence[int]) -> dict[str, int]:
        """``create_model`` arguments for data with ``num_classes`` classes (background included)."""
        return {"num_classes": int(num_classes), "in_channels": int(input_shape[0])}

    def build_data(self, config, device):
        if config.data.mixup or config.data.cutmix:
            raise CnnlabError("data.mixup and data.cutmix mix the labels of whole images; segmentation targets are "
                              "masks: set them to 0")
        try:
            from cnnlab.data.segmentation_data import build_segmentation_data
        except ImportError as e:
            raise CnnlabError(f"segmentation data cannot be loaded ({e}); cnnlab.data.segmentation_data is "
                              "missing") from None
        return build_segmentation_data(config.data, device, seed=config.seed)

    def prepare(self, data) -> None:
        if len(data.classes) < 2:
            raise CnnlabError(f"segmentation data needs at least two classes (background 0 and one more), got "
                              f"{data.classes}")
        self.num_classes = data.num_classes
        self.ignore_index = int(getattr(data, "ignore_index", IGNORE_INDEX))

    # ---- loss ---------------------------------------------------------------------------------------
    def _criterion(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        k = self.num_classes or logits.shape[1]
        if logits.ndim != 4 or logits.shape[1] != k or logits.shape[2:] != masks.shape[1:]:
            raise CnnlabError(f"a segmentation model must return logits (N, {k}, H, W) at its input's size "
                              f"{tuple(masks.shape[1:])} for {k} classes, got {tuple(logits.shape)}")
        if self.loss_name == "ce":
            return cross_entropy(logits, masks, self.ignore_index)
        if self.loss_name == "dice":
            return dice_loss(logits, masks, self.ignore_index)
        return cross_entropy(logits, masks, self.ignore_index) + dice_loss(logits, masks, self.ignore_index)

    def loss(self, output: Any, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, main logits) of a model output for ``masks``: the main loss plus ``aux_weight`` x the auxiliary's."""
        logits, aux = split_output(output)
        check_labels(masks, self.num_classes or logits.shape[1], self.ignore_index)
        with torch.autocast(masks.device.type, enabled=False):  # float32 losses whatever the forward ran in
            loss = self._criterion(logits.float(), masks)
            if aux is not None:
                loss = loss + self.aux_weight * self._criterion(aux.float(), masks)
        return loss, logits

    def step(self, net, batch, config):
        images, masks = unpack_batch(batch)
        loss, logits = self.loss(net(images), masks)
        return StepOutput(loss, logits, masks, len(images))

    def meter(self, device):
        return _SegmentationMeter(device, self.num_classes, self.ignore_index)

    def expected_initial_loss(self, data) -> float | None:
        # uniform logits: ln K per pixel; `cnnlab check` takes the loss of uniform logits from every head through
        # self.loss, so an auxiliary head adds aux_weight x as much
        return math.log(data.num_classes) if self.loss_name == "ce" else None

    # ---- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, batches, data, *, amp=False, tta_flip=False):
        from cnnlab.engine.evaluate import autocast

        if self.num_classes is None:
            self.prepare(data)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        meter = _SegmentationMeter(device, self.num_classes, self.ignore_index)
        try:
            for images, masks in _chunks(batches):
                with autocast(device, amp):
                    output = model(images)
                    if tta_flip:  # the mean of the logits of the image and of its mirror image, mirrored back
                        output = _mean_outputs(output, model(images.flip(-1)))
                loss, logits = self.loss(output, masks)
                meter.update(StepOutput(loss, logits.float(), masks, len(images)))
        finally:
            model.train(was_training)
        values = meter.compute(reduce=False)  # every rank evaluated the whole split
        found = meter.metrics.compute() if meter.metrics is not None else {}
        confusion = meter.metrics.confusion if meter.metrics is not None else None
        metrics = {k: float(found.get(k, math.nan)) for k in ("miou", "pixel_acc", "mean_acc", "fwiou")}
        return TaskResult(loss=values["loss"], metrics=metrics, count=meter.seen,
                          details={**found, "confusion": confusion, "classes": list(data.classes)})

    def summary(self, test: TaskResult) -> dict[str, Any]:
        out: dict[str, Any] = {"test_loss": test.loss, **{f"test_{k}": v for k, v in test.metrics.items()},
                               "loss": self.loss_name, "ignore_index": self.ignore_index}
        if test.details.get("confusion") is not None:
            out["per_class"] = per_class_rows(test.details, test.details.get("classes") or [])
            out["confusion"] = test.details["confusion"].tolist()
        return out

    def headline(self, test: TaskResult) -> str:
        m = test.metrics
        return (f"test mIoU {m['miou']:.4f}, pixel acc {m['pixel_acc']:.4f}, mean acc {m['mean_acc']:.4f}, "
                f"fwIoU {m['fwiou']:.4f}")

    def plots(self, run_dir: Path, test: TaskResult, data, model: nn.Module) -> None:
        if test.details.get("confusion") is not None:
            plot_class_iou(run_dir / "class_iou.png", test.details, data.classes)
            plot_pixel_confusion(run_dir / "pixel_confusion.png", test.details["confusion"], data.classes)
        split = data.val if data.val is not None else data.test
        plot_segmentations(run_dir / "segmentations.png", model, split, data, "validation" if data.val is not None
                           else "test")

    def predict_lines(self, images, outputs, classes, top):
        logits, _ = split_output(outputs)
        lines = []
        for labels in logits.argmax(1):
            fractions = torch.bincount(labels.flatten().cpu(), minlength=logits.shape[1]).double() / labels.numel()
            order = fractions.argsort(descending=True)[:top].tolist()
            lines.append(", ".join(f"{_name(classes, c)} {share_text(fractions[c])}" for c in order if fractions[c] > 0))
        return lines


def share_text(fraction: float) -> str:
    """A share of pixels as printed: ``12.3%``; a share that rounds to 0.0% but is not 0, ``<0.1%``."""
    return f"{fraction:.1%}" if fraction >= 0.0005 else "<0.1%"


def _chunks(batches: Any, size: int = EVAL_CHUNK):
    """The loader's batches cut into forwards of at most ``size`` images."""
    for batch in batches:
        images, masks = unpack_batch(batch)
        for start in range(0, len(images), size):
            yield images[start:start + size], masks[start:start + size]


def _mean_outputs(a: Any, b: Any) -> Any:
    """The mean of an output and the output of the mirrored image, mirrored back (tensors or out/aux dicts)."""
    if isinstance(a, Mapping):
        return {k: (v + b[k].flip(-1)) / 2 for k, v in a.items()}
    return (a + b.flip(-1)) / 2


def _name(classes: Sequence[str], label: int) -> str:
    return str(classes[label]) if 0 <= label < len(classes) else str(label)


def per_class_rows(found: Mapping[str, Any], classes: Sequence[str]) -> list[dict[str, Any]]:
    """results.json's per-class table: class, IoU and accuracy (None: nothing to score), true and predicted pixels."""
    def value(v: float) -> float | None:
        return None if math.isnan(v) else float(v)

    return [{"class": _name(classes, c), "iou": value(found["iou"][c]), "acc": value(found["acc"][c]),
             "gt_pixels": int(found["gt_pixels"][c]), "pred_pixels": int(found["pred_pixels"][c])}
            for c in range(len(found["iou"]))]


# ---------------------------------------------------------------- drawing


def colour_mask(labels: torch.Tensor) -> torch.Tensor:
    """(H, W) labels -> uint8 (3, H, W) in the VOC palette (255, the ignore label, cream)."""
    lut = torch.tensor(PALETTE, dtype=torch.uint8)  # (256, 3)
    return lut[labels.cpu().long().clamp(0, 255)].permute(2, 0, 1).contiguous()


def overlay(image: torch.Tensor, labels: torch.Tensor, alpha: float = OVERLAY_ALPHA) -> torch.Tensor:
    """uint8 (3, H, W): the image with every non-background label painted over it in its palette colour, by
    ``torchvision.utils.draw_segmentation_masks``. ``image`` is uint8, or float in [0, 1]; 1 or 3 channels."""
    from torchvision.utils import draw_segmentation_masks

    canvas = image.detach().cpu()
    if canvas.is_floating_point():
        canvas = (canvas.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if canvas.shape[0] == 1:
        canvas = canvas.expand(3, -1, -1)
    labels = labels.cpu().long()
    present = [int(c) for c in labels.unique().tolist() if c != 0]
    if not present:
        return canvas.contiguous()
    masks = torch.stack([labels == c for c in present])
    return draw_segmentation_masks(canvas.contiguous(), masks, alpha=alpha,
                                   colors=[PALETTE[min(max(c, 0), 255)] for c in present])


def _display_images(x: torch.Tensor, preprocess: Any) -> torch.Tensor:
    """Normalised model inputs -> images in [0, 1] (the normalisation undone), on the CPU."""
    invert = getattr(preprocess, "invert", None)
    images = invert(x) if invert is not None else x
    return images.detach().float().clamp(0, 1).cpu()


@torch.no_grad()
def plot_segmentations(path: Path, model: nn.Module, batches: Any, data: Any, split: str,
                       count: int = DRAWN_IMAGES) -> Path | None:
    """Three rows for the first ``count`` images of ``batches``: the image, the true mask over it, the predicted one."""
    from cnnlab._plot import save_figure

    fig = segmentations_figure(model, batches, data, split, count)
    return None if fig is None else save_figure(fig, path)


@torch.no_grad()
def segmentations_figure(model: nn.Module, batches: Any, data: Any, split: str, count: int = DRAWN_IMAGES):
    """The figure of :func:`plot_segmentations` (None when ``batches`` is empty)."""
    from cnnlab._plot import pyplot

    images, masks = [], []
    for x, y in _chunks(batches, count):
        images.append(x[:count - sum(len(i) for i in images)])
        masks.append(y[:len(images[-1])])
        if sum(len(i) for i in images) >= count:
            break
    if not images:
        return None
    x, y = torch.cat(images), torch.cat(masks)
    was_training = model.training
    model.eval()
    try:
        predicted = split_output(model(x))[0].argmax(1).cpu()
    finally:
        model.train(was_training)
    shown, y = _display_images(x, data.preprocess), y.cpu()
    classes = list(data.classes)
    plt = pyplot()
    n = len(x)
    fig, axes = plt.subplots(3, n, figsize=(1.7 * n + 1.6, 5.6), squeeze=False)
    for i in range(n):
        valid = y[i] != getattr(data, "ignore_index", IGNORE_INDEX)
        acc = float((predicted[i] == y[i])[valid].double().mean()) if bool(valid.any()) else math.nan
        for row, image in enumerate((overlay(shown[i], torch.zeros_like(y[i])), overlay(shown[i], y[i]),
                                     overlay(shown[i], predicted[i]))):
            ax = axes[row][i]
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        axes[2][i].set_xlabel(f"pixel acc {acc:.0%}", fontsize=8)
    for row, label in enumerate(("image", "true", "predicted")):
        axes[row][0].set_ylabel(label)
    from matplotlib.patches import Patch

    seen = sorted(set(y.unique().tolist()) | set(predicted.unique().tolist()))
    handles = [Patch(color=[v / 255 for v in PALETTE[min(c, 255)]], label=_name(classes, c) if c < len(classes)
                     else "ignored") for c in seen if c != 0]
    if handles:
        fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    # wrap=True breaks the title into lines that fit the figure: one image column is narrower than the title
    fig.suptitle(f"{split} images: true and predicted masks (background not painted)", wrap=True)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / (1.7 * n + 1.6), 1))
    return fig


def plot_class_iou(path: Path, found: Mapping[str, Any], classes: Sequence[str]) -> Path:
    """Horizontal bars of each class's IoU (absent classes marked), with the mIoU as a dashed line."""
    from cnnlab._plot import pyplot, save_figure

    iou = found["iou"]
    k = len(iou)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.32 * k))
    values = [0.0 if math.isnan(v) else v for v in iou]
    ax.barh(range(k), values, color=[[c / 255 for c in PALETTE[i]] if i else (0.55, 0.55, 0.55) for i in range(k)])
    for i, v in enumerate(iou):
        ax.text(min(values[i], 0.86) + 0.01, i, "absent" if math.isnan(v) else f"{v:.3f}", va="center", fontsize=8)
    if not math.isnan(found["miou"]):
        ax.axvline(found["miou"], color="black", linestyle="--", linewidth=1, label=f"mIoU {found['miou']:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(range(k), [_name(classes, i) for i in range(k)])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU (test split, all pixels counted together)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_pixel_confusion(path: Path, confusion: torch.Tensor, classes: Sequence[str]) -> Path:
    """The pixel confusion matrix normalised by row (each true class's pixels: where they went), in percent."""
    from cnnlab._plot import pyplot, save_figure

    counts = torch.as_tensor(confusion).double()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    k = len(counts)
    names = [_name(classes, i) for i in range(k)]
    plt = pyplot()
    size = max(4.5, 0.55 * k)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j] > 0:
                    ax.text(j, i, f"{100 * rates[i, j]:.0f}" if rates[i, j] >= 0.005 else "<1", ha="center",
                            va="center", fontsize=7, color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test pixels, % of each true class")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, path)


def report_sections(run_dir: Path, results: dict[str, Any]) -> list:
    """report.html's part for a segmentation run: per-class IoU (table and bars), the pixel confusion matrix and
    the validation images with their true and predicted masks."""
    from cnnlab.engine.html_report import ReportSection

    if not results:
        return []  # still training: the tables and images come from the final model
    run_dir = Path(run_dir)
    sections = []
    rows = results.get("per_class") or []
    text = (f"Test split, every pixel of every image counted together (pixels labelled {results.get('ignore_index', 255)}"
            f" count nowhere). mIoU {results.get('test_miou', math.nan):.4f} is the mean over the classes that appear "
            "in the ground truth or the prediction; – marks a class in neither (IoU) or absent from the ground truth "
            "(acc). acc is the share of the "
            "class's true pixels predicted as that class.")
    sections.append(ReportSection("Per-class IoU", text, table=[dict(r) for r in rows] or None,
                                  images=[run_dir / "class_iou.png"]))
    sections.append(ReportSection(
        "Pixel confusion matrix", "Each row is a true class; the cells say where its pixels went, in percent. Mass "
                                  "in the background column means missed objects; in the background row, false alarms; "
                                  "off-diagonal cells between two objects, confused classes.",
        images=[run_dir / "pixel_confusion.png"]))
    sections.append(ReportSection(
        "Segmentations", "The first validation images (test images when the run had no validation split): the "
                         "image, the true mask painted over it and the reported model's prediction, in the VOC "
                         "colours (background unpainted).",
        images=[run_dir / "segmentations.png"]))
    return sections

"""The segmentation task through the shared engine: cross-entropy with the ignore index (and an auxiliary head),
Dice against smp's, dataset-level mIoU per epoch, best by val_miou, exact resume under a time budget, the run
folder's per-class IoU, confusion matrix and drawn masks in report.html. A tiny conv net and synthetic 32 x 32
grey images of squares and bars stand in for the real models and data."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.data.bundle import DataBundle
from cnnlab.data.preprocess import Normalize
from cnnlab.engine import train
from cnnlab.engine import time_budget as tb
from cnnlab.engine.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from cnnlab.engine.tasks import get_task
from cnnlab.engine.tasks.segmentation import PALETTE, SegmentationTask, colour_mask, dice_loss
from cnnlab.segmentation.metrics import SegmentationMetrics

MODEL = "tiny_seg_test"
CLASSES = ["background", "square", "bar"]
SIZE = 32
NORM = Normalize((0.3,), (0.3,))


class TinySeg(nn.Module):
    """conv (stride 1) -> conv (stride 2) -> bilinear up -> 1x1 classifier; ``aux_loss`` adds a 1x1 head on the
    first conv, both at the input size (the segmentation convention)."""

    def __init__(self, num_classes: int = 3, in_channels: int = 1, aux_loss: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(16 + 8, num_classes, 1)
        self.aux = nn.Conv2d(8, num_classes, 1) if aux_loss else None

    def forward(self, x: torch.Tensor):
        skip = self.stem(x)
        up = F.interpolate(self.down(skip), size=x.shape[-2:], mode="bilinear", align_corners=False)
        out = self.classifier(torch.cat([up, skip], 1))
        return {"out": out, "aux": self.aux(skip)} if self.aux is not None else out


def register_stand_in() -> None:
    from cnnlab.models import list_models
    from cnnlab.models.registry import Family, register_model

    if MODEL not in list_models():
        register_model(Family(MODEL, "test stand-in: a two-conv segmenter", 2015), task="segmentation",
                       default_input=(1, SIZE, SIZE), name=MODEL)(TinySeg)


register_stand_in()


def make_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 1, 32, 32) noisy images with a bright square (class 1) and a dark-grey bar (class 2), their
    masks, and a 1-pixel ignored (255) frame around each square (VOC-like borders)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(40, 90, (n, 1, SIZE, SIZE), generator=g, dtype=torch.uint8)
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.int64)
    for i in range(n):
        y, x = (int(v) for v in torch.randint(2, 18, (2,), generator=g))
        images[i, 0, y:y + 10, x:x + 10] = 230
        masks[i, y - 1:y + 11, x - 1:x + 11] = 255
        masks[i, y:y + 10, x:x + 10] = 1
        if i % 3:  # some images have no bar
            row = 26 if y < 12 else 1
            images[i, 0, row:row + 4, 4:28] = 150
            masks[i, row:row + 4, 4:28] = 2
    return images, masks


class Batches:
    """A segmentation loader stand-in: normalised float images and int64 masks; shuffled by (seed, epoch)."""

    def __init__(self, images, masks, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.images, self.masks = images, masks
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self):
        n = len(self.images)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
                 if self.shuffle else torch.arange(n))
        for start in range(0, n, self.batch_size):
            picked = order[start:start + self.batch_size]
            yield NORM(self.images[picked].float() / 255), self.masks[picked]


def make_bundle(n_train: int = 24, n_val: int = 8, n_test: int = 8) -> DataBundle:
    def batches(n, seed, train):
        return Batches(*make_pairs(n, seed), 8, train)

    return DataBundle(train=batches(n_train, 1, True), val=batches(n_val, 2, False) if n_val else None,
                      test=batches(n_test, 3, False), classes=list(CLASSES), input_shape=(1, SIZE, SIZE),
                      preprocess=NORM, preprocess_state={"kind": "standard", "mean": [0.3], "std": [0.3]},
                      test_images=make_pairs(n_test, 3)[0])


def seg_config(tmp_path, name: str = "seg", epochs: int = 2, **top) -> TrainConfig:
    top = {"plots": False, **top}
    return TrainConfig(model=ModelConfig(name=MODEL), data=DataConfig(name="synthetic_seg", batch_size=8, val_fraction=0.2),
                       optim=OptimConfig(lr=0.05, schedule="constant", optimizer="adam"), epochs=epochs,
                       out_dir=str(tmp_path), name=name, quiet=True, device="cpu", threads=1, **top)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One 3-epoch run with plots and report, shared by the checks of its folder."""
    out = tmp_path_factory.mktemp("seg_runs")
    return train(seg_config(out, "run", epochs=3, plots=True), data=make_bundle())


def _task(loss: str = "auto") -> SegmentationTask:
    task = get_task("segmentation", loss=loss)
    task.prepare(make_bundle())
    return task


# ---------------------------------------------------------------- loss, meter, evaluate


def test_the_loss_is_cross_entropy_without_ignored_pixels_plus_0_4_aux():
    x, masks = next(iter(make_bundle().train))
    assert (masks == 255).any()
    torch.manual_seed(0)
    model = TinySeg(aux_loss=True)
    out = _task().step(model, (x, masks), None)
    expected = model(x)
    main = F.cross_entropy(expected["out"], masks, ignore_index=255)
    aux = F.cross_entropy(expected["aux"], masks, ignore_index=255)
    assert out.loss.item() == pytest.approx((main + 0.4 * aux).item(), rel=1e-5)
    assert torch.equal(out.output, expected["out"]) and out.count == len(x)
    model.aux = None  # a plain tensor output: the main loss alone
    assert _task().step(model, (x, masks), None).loss.item() == pytest.approx(main.item(), rel=1e-5)
    none = _task().loss(torch.zeros(1, 3, 4, 4), torch.full((1, 4, 4), 255))[0]
    assert none.item() == 0  # every pixel ignored: 0, not NaN


def test_dice_equals_segmentation_models_pytorch():
    from segmentation_models_pytorch.losses import DiceLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 9, 7, generator=g)
    target = torch.randint(0, 3, (3, 9, 7), generator=g)  # class 3 absent from the target
    target[:, 0] = 255
    expected = DiceLoss("multiclass", from_logits=True, ignore_index=255)(logits, target)
    assert dice_loss(logits, target, 255).item() == pytest.approx(expected.item(), rel=1e-5)
    both = _task("ce+dice")
    task_logits = logits[:, :3]
    combined = both.loss(task_logits, target)[0]
    reference = F.cross_entropy(task_logits, target, ignore_index=255) + \
        DiceLoss("multiclass", from_logits=True, ignore_index=255)(task_logits, target)
    assert combined.item() == pytest.approx(reference.item(), rel=1e-5)
    assert get_task("segmentation", loss="dice").loss_name == "dice"
    with pytest.raises(CnnlabError, match="choose auto or ce, dice, ce\\+dice"):
        get_task("segmentation", loss="mse")


def test_evaluate_is_the_dataset_level_metrics_of_eval_mode_outputs_and_changes_nothing():
    torch.manual_seed(0)
    model, bundle = TinySeg(), make_bundle()
    for x, y in bundle.train:  # a few steps so the BatchNorm statistics are not the initial ones
        F.cross_entropy(model(x), y, ignore_index=255).backward()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    task = _task()
    result = task.evaluate(model, bundle.val, bundle)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    metrics = SegmentationMetrics(3)
    losses = []
    model.eval()
    with torch.no_grad():
        for x, y in bundle.val:
            out = model(x)
            metrics.update(out, y)
            losses.append(F.cross_entropy(out, y, ignore_index=255).item() * len(x))
    expected = metrics.compute()
    assert result.metrics == pytest.approx({k: expected[k] for k in ("miou", "pixel_acc", "mean_acc", "fwiou")})
    assert result.loss == pytest.approx(sum(losses) / 8, rel=1e-5) and result.count == 8
    assert torch.equal(result.details["confusion"], metrics.confusion)
    # test-time flipping: the mean of the logits of the image and of its mirror
    flipped = task.evaluate(model, bundle.val, bundle, tta_flip=True)
    metrics.reset()
    with torch.no_grad():
        for x, y in bundle.val:
            metrics.update((model(x) + model(x.flip(-1)).flip(-1)) / 2, y)
    assert flipped.metrics["miou"] == pytest.approx(metrics.compute()["miou"])


def test_bad_batches_and_outputs_are_clear_errors():
    task = _task()
    x, masks = next(iter(make_bundle().train))
    bad = masks.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(CnnlabError, match=r"labels \[7\], outside 0..2"):
        task.step(TinySeg(), (x, bad), None)
    with pytest.raises(CnnlabError, match="segmentation batches are"):
        task.step(TinySeg(), (x, torch.zeros(len(x), dtype=torch.long)), None)  # classification labels
    with pytest.raises(CnnlabError, match=r"logits \(N, 3, H, W\) at its input's size \(32, 32\)"):
        task.step(lambda t: torch.zeros(len(t), 3, 16, 16), (x, masks), None)
    with pytest.raises(CnnlabError, match="must return per-pixel logits"):
        task.step(lambda t: [t], (x, masks), None)
    config = seg_config("unused")
    config.data.mixup = 0.2
    with pytest.raises(CnnlabError, match="mixup"):
        task.build_data(config, torch.device("cpu"))


def test_the_palette_is_vocs():
    # the VOC devkit's colours: background, aeroplane, bicycle, bird, ..., person (15), and the 255 border
    assert PALETTE[:4] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    assert PALETTE[15] == (192, 128, 128) and PALETTE[255] == (224, 224, 192)
    assert colour_mask(torch.tensor([[0, 2], [255, 1]]))[:, 1, 0].tolist() == [224, 224, 192]


# ---------------------------------------------------------------- a run through the engine


def test_a_run_records_miou_per_epoch_and_is_judged_by_it(trained_run):
    result = trained_run
    assert result.config.monitor == "val_miou"
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    assert len(rows) == 3 and {"train_loss", "train_miou", "train_pixel_acc", "val_loss", "val_miou",
                               "val_pixel_acc"} <= set(rows[0])
    assert float(rows[-1]["val_miou"]) > float(rows[0]["val_miou"]) and float(rows[-1]["val_miou"]) > 0.5
    best = max(range(3), key=lambda i: float(rows[i]["val_miou"]))
    assert result.best_epoch == best + 1
    saved = json.loads((result.run_dir / "results.json").read_text())
    assert saved["task"] == "segmentation" and saved["reported_checkpoint"] == "best" and saved["loss"] == "ce"
    assert saved["test_miou"] == pytest.approx(result.test.metrics["miou"])
    assert set(saved["test_metrics"]) == {"loss", "miou", "pixel_acc", "mean_acc", "fwiou"}
    assert [r["class"] for r in saved["per_class"]] == CLASSES
    confusion = torch.tensor(saved["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == sum(int((m != 255).sum()) for _, m in make_bundle().test)
    ious = [r["iou"] for r in saved["per_class"]]
    assert sum(ious) / 3 == pytest.approx(saved["test_miou"])


def test_the_run_folder_shows_per_class_iou_the_confusion_matrix_and_masks(trained_run):
    run_dir = trained_run.run_dir
    for name in ("class_iou.png", "pixel_confusion.png", "segmentations.png"):
        assert (run_dir / name).stat().st_size > 2000, name
    page = (run_dir / "report.html").read_text()
    for title in ("Per-class IoU", "Pixel confusion matrix", "Segmentations"):
        assert title in page
    assert page.count("data:image/png;base64,") >= 4  # curves + the three task images
    assert "square" in page  # the per-class table


def test_the_reported_model_reproduces_the_test_metrics(trained_run):
    from cnnlab.engine.runs import load_run

    run = load_run(trained_run.run_dir)
    assert run.task == "segmentation" and run.tag == "best" and run.classes == CLASSES
    bundle = make_bundle()
    again = _task().evaluate(run.model, bundle.test, bundle)
    saved = json.loads((trained_run.run_dir / "results.json").read_text())
    assert again.metrics["miou"] == pytest.approx(saved["test_miou"], rel=1e-6)


def test_a_budgeted_run_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(tb.TimeBudget, "plan", lambda self, step, spe, limit, v, t: tb.Plan(0.01, v, t, 7, 3))
    monkeypatch.setattr(tb, "MIN_TIMED_S", 0.0)

    class Stop(Exception):
        pass

    def stop_after_one(row):
        if row["epoch"] == 1:
            raise Stop

    def config(name):
        c = seg_config(tmp_path, name, epochs=10)
        c.time_budget = 60
        c.model.options = {"aux_loss": True}
        return c

    straight = train(config("straight"), data=make_bundle())
    assert straight.planned_steps == 7 and len(straight.history) == 3  # 3 steps per epoch: the last has 1
    with pytest.raises(Stop):
        train(config("split"), data=make_bundle(), callbacks=[stop_after_one])
    monkeypatch.setattr(tb.TimeBudget, "plan", lambda *a: pytest.fail("a resumed run keeps its plan"))
    train(config("split"), data=make_bundle(), resume=True)
    for name in ("last.safetensors", "last.state.safetensors", "best.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bitwise on the CPU
    drop = ("time_s", "cpu_s", "images_per_s")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(open(tmp_path / n / "metrics.csv"))]
            for n in ("straight", "split")]
    assert rows[0] == rows[1]


def test_predict_lines_give_the_class_fractions():
    logits = torch.full((1, 3, 2, 2), -5.0)
    logits[0, 0] = 5
    logits[0, 2, 0, 0] = 10  # one pixel of four is a bar
    lines = SegmentationTask().predict_lines(None, {"out": logits, "aux": logits}, CLASSES, 3)
    assert lines == ["background 75.0%, bar 25.0%"]
    assert math.isclose(SegmentationTask().expected_initial_loss(make_bundle()), math.log(3))
    from cnnlab.engine.tasks.segmentation import share_text

    assert [share_text(v) for v in (0.25, 0.0004, 0.0005)] == ["25.0%", "<0.1%", "0.1%"]


def test_evaluation_forwards_at_most_16_images_whatever_the_loader_batch():
    sizes = []
    torch.manual_seed(0)
    model = TinySeg()

    def counting(x):
        sizes.append(len(x))
        return model(x)

    counting.parameters, counting.train, counting.eval = model.parameters, model.train, model.eval
    counting.training = True
    bundle = make_bundle()
    whole = Batches(*make_pairs(40, 4), 40, False)
    result = _task().evaluate(counting, whole, bundle)
    assert sizes == [16, 16, 8] and result.count == 40
    model.eval()
    expected = SegmentationMetrics(3)
    with torch.no_grad():
        for x, y in whole:
            expected.update(model(x), y)
    assert result.metrics["miou"] == pytest.approx(expected.compute()["miou"])


@pytest.mark.parametrize("count", [1, 2, 8])
def test_the_segmentations_title_fits_in_the_figure_above_the_images(count):
    from cnnlab._plot import pyplot
    from cnnlab.engine.tasks.segmentation import segmentations_figure

    torch.manual_seed(0)
    data = make_bundle()
    fig = segmentations_figure(TinySeg(), data.test, data, "validation", count)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title, page = fig.get_suptitle(), fig.bbox
    box = fig._suptitle.get_window_extent(renderer)
    pyplot().close(fig)
    assert title.startswith("validation images")
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, (box, page)
    assert box.y0 >= max(ax.get_tightbbox(renderer).y1 for ax in fig.axes)  # above the images, not over them

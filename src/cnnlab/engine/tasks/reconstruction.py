"""Reconstruction (autoencoders): the target is the input image; MSE or BCE loss; PSNR."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab._errors import CnnlabError
from cnnlab.engine.tasks._model import model_channels
from cnnlab.engine.tasks.base import LossMeter, StepOutput, Task, TaskResult


def psnr(reconstruction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: ``10 log10(range^2 / MSE)`` over (C, H, W).

    Per image, then averaged by the callers (an average over a whole set would weight a few bad
    images less than a reader expects); an exact reconstruction gives +inf, clamped at 100 dB.
    """
    mse = (reconstruction.float() - target.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-10))).clamp(max=100.0)


def image_targets(x: torch.Tensor, preprocess: Any) -> torch.Tensor:
    """The images in [0, 1] that a (normalised) batch came from: the reconstruction targets."""
    return x if preprocess is None else preprocess.invert(x).clamp_(0, 1)


class _PsnrMeter(LossMeter):
    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.psnr_sum = torch.zeros((), device=device)

    def update(self, out: StepOutput) -> None:
        super().update(out)
        self.psnr_sum += psnr(out.output.detach(), out.target).sum()

    def compute(self) -> dict[str, float]:
        return {**super().compute(), "psnr": self.psnr_sum.item() / max(self.seen, 1)}


class ReconstructionTask(Task):
    """Models map images to images of the same shape, in [0, 1] (e.g. a sigmoid output layer).

    ``mse``: mean squared error; ``bce``: binary cross-entropy per pixel (for images in [0, 1],
    as in the Keras autoencoder tutorials). The metric is PSNR in dB against the input image.
    """

    name = "reconstruction"
    metrics = ("psnr",)
    losses = ("mse", "bce")
    uses_labels = False
    model_takes_num_classes = False

    def build_data(self, config, device):
        from cnnlab.engine.data_setup import build_data

        if config.data.normalize not in ("standard", "none"):
            raise CnnlabError(f"data.normalize={config.data.normalize!r}: a reconstruction is compared with the "
                              "input image, so only 'standard' (undone for the target) or 'none' work")
        if config.data.mixup or config.data.cutmix:
            raise CnnlabError("data.mixup and data.cutmix mix class labels; the reconstruction task has none: "
                              "set them to 0")
        return build_data(config.data, device, seed=config.seed, channels_last=config.model.channels_last,
                          in_channels=model_channels(config))

    def prepare(self, data) -> None:
        self._preprocess = data.preprocess  # to undo the normalisation for the targets

    def _loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if recon.shape != target.shape:
            raise CnnlabError(f"a reconstruction model must return images of its input's shape "
                              f"{tuple(target.shape)}, got {tuple(recon.shape)}")
        recon = recon.float()
        with torch.autocast(recon.device.type, enabled=False):  # BCE is refused under autocast
            if self.loss_name == "bce":
                return F.binary_cross_entropy(recon.clamp(1e-6, 1 - 1e-6), target)
            return F.mse_loss(recon, target)

    def step(self, net, batch, config):
        x, _ = batch
        target = image_targets(x, getattr(self, "_preprocess", None))
        recon = net(x)
        return StepOutput(self._loss(recon, target), recon, target, len(x))

    def meter(self, device):
        return _PsnrMeter(device)

    @torch.no_grad()
    def evaluate(self, model, batches, data, *, amp=False, tta_flip=False):
        from cnnlab.engine.evaluate import autocast

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        meter = _PsnrMeter(device)
        try:
            for x, _ in batches:
                target = image_targets(x, data.preprocess)
                with autocast(device, amp):
                    recon = model(x).float()
                meter.update(StepOutput(self._loss(recon, target), recon, target, len(x)))
        finally:
            model.train(was_training)
        values = meter.compute()
        return TaskResult(loss=values["loss"], metrics={"psnr": values["psnr"]}, count=meter.seen)

    def expected_initial_loss(self, data) -> None:
        return None  # depends on the images and the output layer's initial bias

    def summary(self, test: TaskResult) -> dict[str, Any]:
        return {"test_loss": test.loss, "test_psnr": test.metrics["psnr"], "loss": self.loss_name}

    def predict_lines(self, images, outputs, classes, top):
        return [f"reconstructed at {v:.2f} dB PSNR" for v in psnr(outputs.float(), images).tolist()]

    def plots(self, run_dir: Path, test, data, model: nn.Module) -> None:
        plot_reconstructions(run_dir / "reconstructions.png", model, data)


@torch.no_grad()
def plot_reconstructions(path: Path, model: nn.Module, data: Any, count: int = 8) -> None:
    """Two rows: the first ``count`` test images and the model's reconstructions of them."""
    from cnnlab._plot import pyplot, save_figure

    x, _ = next(iter(data.test))
    x = x[:count]
    was_training = model.training
    model.eval()
    try:
        recon = model(x).float().clamp(0, 1).cpu()
    finally:
        model.train(was_training)
    target = image_targets(x, data.preprocess).cpu()
    plt = pyplot()
    fig, axes = plt.subplots(2, len(x), figsize=(1.3 * len(x), 2.9), squeeze=False)
    for i in range(len(x)):
        for row, images in enumerate((target, recon)):
            image = images[i].permute(1, 2, 0)
            ax = axes[row][i]
            ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[1][i].set_xlabel(f"{psnr(recon[i:i + 1], target[i:i + 1]).item():.1f} dB", fontsize=8)
    axes[0][0].set_ylabel("input")
    axes[1][0].set_ylabel("output")
    fig.suptitle("test images and their reconstructions (PSNR)")
    save_figure(fig, path)


def report_sections(run_dir: Path, results: dict[str, Any]) -> list:
    """report.html's part for a reconstruction run: the test PSNR and the inputs-vs-outputs grid."""
    from cnnlab.engine.html_report import ReportSection

    if not results:
        return []  # still training: the grid is drawn from the final model
    text = (f"Test images (top) and the model's reconstructions (bottom), with each image's PSNR. Mean test PSNR "
            f"{results.get('test_psnr', float('nan')):.2f} dB with the {results.get('loss', 'mse')} loss; a blurry "
            f"output with a PSNR that still rises means the code is the bottleneck (fewer latent channels compress more).")
    return [ReportSection("Reconstructions", text=text, images=[Path(run_dir) / "reconstructions.png"])]

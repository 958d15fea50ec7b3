"""An autoencoder's code against PCA at the same dimensionality.

PCA is the best *linear* code of a given size for the squared error (Eckart-Young), so an autoencoder
earns its non-linearity only if it reconstructs better than PCA with as many numbers, or gives codes
that separate the classes better. :func:`compare_with_pca` measures both on the same images:

- reconstruction MSE per pixel on the test images (in [0, 1] pixel units, the autoencoder's output
  against PCA's projection and back);
- k-nearest-neighbour accuracy (Euclidean, k = 5) and a linear probe's accuracy (logistic regression)
  of the codes, fitted on training codes and scored on test codes; the labels are never seen by either
  encoder, so this says how much class structure the unsupervised code kept.

scikit-learn does PCA, k-NN, the probe and the 2-D map (t-SNE): well kept, and the reference a reader
would compare with.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnlab._errors import CnnlabError


@dataclass
class LatentComparison:
    """The numbers of :func:`compare_with_pca`, one row per method (``autoencoder``, ``pca``).

    Args:
        dim: the code's length (PCA keeps as many components).
        rows: per method: ``mse`` (test, per pixel), ``knn_accuracy``, ``probe_accuracy``.
        train_images, test_images: how many images fitted PCA / the classifiers and scored them.
    """

    dim: int
    rows: dict[str, dict[str, float]]
    train_images: int
    test_images: int
    knn_k: int = 5
    test_codes: np.ndarray | None = field(default=None, repr=False)
    test_labels: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("test_codes"), out.pop("test_labels")
        return out

    def table(self) -> str:
        lines = [f"{'code':<12} {'dim':>5} {'test MSE':>10} {f'{self.knn_k}-NN acc':>10} {'probe acc':>10}"]
        for name, r in self.rows.items():
            lines.append(f"{name:<12} {self.dim:>5} {r['mse']:>10.5f} {r['knn_accuracy']:>10.4f} "
                         f"{r['probe_accuracy']:>10.4f}")
        return "\n".join(lines)


def _sklearn():
    try:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.neighbors import KNeighborsClassifier
    except ImportError:
        raise CnnlabError("comparing codes with PCA needs scikit-learn (pip install 'cnnlab[data]')") from None
    return PCA, LogisticRegression, KNeighborsClassifier


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            to_pixels: Callable[[torch.Tensor], torch.Tensor], limit: int | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images in [0, 1] flattened, the model's reconstructions flattened, flat codes, labels) of ``batches``.

    ``to_pixels`` maps a (normalised) batch back to images in [0, 1] (the reconstruction targets).
    """
    if not callable(getattr(model, "encode", None)) or not callable(getattr(model, "decode", None)):
        raise CnnlabError(f"{type(model).__name__} has no encode()/decode(): the code comparison needs an "
                          "autoencoder (cnnlab models --task reconstruction)")
    was_training = model.training
    model.eval()
    images, recons, codes, labels = [], [], [], []
    seen = 0
    try:
        for x, y in batches:
            if limit is not None and seen >= limit:
                break
            if limit is not None:
                x, y = x[:limit - seen], y[:limit - seen]
            z = model.encode(x)
            recons.append(model.decode(z).float().clamp(0, 1).flatten(1).cpu())
            codes.append(z.float().flatten(1).cpu())
            images.append(to_pixels(x).float().flatten(1).cpu())
            labels.append(y.cpu())
            seen += len(x)
    finally:
        model.train(was_training)
    if not images:
        raise CnnlabError("no images to compare codes on (an empty split)")
    return (torch.cat(images).numpy(), torch.cat(recons).numpy(), torch.cat(codes).numpy(),
            torch.cat(labels).numpy())


def compare_with_pca(model: nn.Module, train: Iterable, test: Iterable, to_pixels: Callable[[torch.Tensor], torch.Tensor],
                     *, train_limit: int | None = 10_000, test_limit: int | None = None, knn_k: int = 5,
                     seed: int = 0) -> LatentComparison:
    """The autoencoder's code against PCA with as many components, on the same train/test images.

    Args:
        model: an autoencoder with ``encode``/``decode`` (its code flattened is the representation).
        train, test: batches ``(x, y)`` as the engine's loaders yield them (``y`` the class labels).
        to_pixels: a normalised batch -> images in [0, 1] (``preprocess.invert``), PCA's inputs and targets.
        train_limit, test_limit: at most this many images (PCA, the probe and k-NN on all 60,000 take minutes).
        knn_k: neighbours of the k-NN classifier.
    """
    if knn_k < 1:
        raise CnnlabError(f"knn_k must be >= 1, got {knn_k}")
    PCA, LogisticRegression, KNeighborsClassifier = _sklearn()
    train_x, _, train_z, train_y = collect(model, train, to_pixels, train_limit)
    test_x, test_recon, test_z, test_y = collect(model, test, to_pixels, test_limit)
    dim = train_z.shape[1]
    if dim > min(train_x.shape):
        raise CnnlabError(f"the code has {dim} numbers but PCA can keep at most {min(train_x.shape)} components "
                          f"here ({train_x.shape[0]} images of {train_x.shape[1]} pixels); use a smaller code "
                          "(latent_dim) or more training images")
    pca = PCA(n_components=dim, random_state=seed).fit(train_x)
    test_p = pca.transform(test_x)
    pca_recon = np.clip(pca.inverse_transform(test_p), 0, 1)  # images are in [0, 1], as the autoencoder's output
    codes = {"autoencoder": (train_z, test_z), "pca": (pca.transform(train_x), test_p)}
    mse = {"autoencoder": float(np.mean((test_recon - test_x) ** 2)), "pca": float(np.mean((pca_recon - test_x) ** 2))}
    rows = {}
    for name, (tr, te) in codes.items():
        mean, std = tr.mean(0), tr.std(0) + 1e-8  # the probe on standardised codes (both codes on one footing)
        knn = KNeighborsClassifier(n_neighbors=knn_k).fit(tr, train_y)
        probe = LogisticRegression(max_iter=500).fit((tr - mean) / std, train_y)
        rows[name] = {"mse": mse[name], "knn_accuracy": float(knn.score(te, test_y)),
                      "probe_accuracy": float(probe.score((te - mean) / std, test_y))}
    return LatentComparison(dim=dim, rows=rows, train_images=len(train_x), test_images=len(test_x), knn_k=knn_k,
                            test_codes=test_z, test_labels=test_y)


def plot_code_map(path: str | Path, codes: np.ndarray, labels: np.ndarray, classes: Sequence[str], *,
                  points: int = 2000, method: str = "tsne", seed: int = 0) -> Path:
    """A 2-D map of ``codes`` coloured by class: t-SNE (``method="tsne"``) or the first two principal components."""
    from cnnlab._plot import pyplot, save_figure

    if method not in ("tsne", "pca"):
        raise CnnlabError(f"method must be 'tsne' or 'pca', got {method!r}")
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(codes))[:points]
    z, y = codes[pick], labels[pick]
    if method == "tsne":
        from sklearn.manifold import TSNE
        xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, max(5, len(z) // 4))).fit_transform(z)
    else:
        from sklearn.decomposition import PCA
        xy = PCA(n_components=2, random_state=seed).fit_transform(z)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c in np.unique(y):
        m = y == c
        ax.scatter(xy[m, 0], xy[m, 1], s=4, color=cmap(int(c) % cmap.N),
                   label=classes[int(c)] if int(c) < len(classes) else str(c))
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"test codes ({codes.shape[1]} numbers each), {'t-SNE' if method == 'tsne' else 'PCA'} map by class")
    ax.legend(markerscale=3, fontsize=7, loc="best")
    return save_figure(fig, Path(path))

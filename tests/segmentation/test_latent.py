"""Flat and denoising autoencoders; the code-vs-PCA comparison against direct computations; `cnnlab latent`."""
import json

import numpy as np
import pytest
import torch

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.analysis.latent import compare_with_pca, plot_code_map
from cnnlab.cli.main import main
from cnnlab.engine import train

from ..engine._tiny import register_tiny
from ..engine.test_tasks import recon_config


def test_a_flat_code_has_latent_dim_numbers_and_keeps_the_spatial_layouts_keys():
    flat = cnnlab.create_model("conv_autoencoder", latent_dim=32).eval()
    x = torch.rand(3, 1, 28, 28)
    assert flat.encode(x).shape == (3, 32) and flat(x).shape == x.shape
    # 16@7x7 -> 32 and back: two linear layers more than the spatial model, nothing else changes
    spatial = cnnlab.create_model("conv_autoencoder")
    extra = {k: v.shape for k, v in flat.state_dict().items() if k not in spatial.state_dict()}
    assert extra == {"to_code.1.weight": (32, 784), "to_code.1.bias": (32,), "from_code.0.weight": (784, 32),
                     "from_code.0.bias": (784,)}
    with pytest.raises(CnnlabError, match=r"flat code \(latent_dim=32\) for 28x28 images"):
        flat(torch.rand(1, 1, 32, 32))
    with pytest.raises(CnnlabError, match="latent_dim must be a positive int"):
        cnnlab.create_model("conv_autoencoder", latent_dim=0)
    with pytest.raises(CnnlabError, match="input_size"):
        cnnlab.create_model("conv_autoencoder", latent_dim=8, input_size=30)


def test_the_denoising_autoencoder_corrupts_its_input_only_in_training():
    model = cnnlab.create_model("denoising_autoencoder", noise_std=0.5)
    assert cnnlab.model_info("denoising_autoencoder").task == "reconstruction"
    x = torch.rand(4, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))  # eval: no noise, deterministic
    calls = []
    model.encoder.register_forward_pre_hook(lambda m, args: calls.append(args[0].clone()))
    model.train()
    torch.manual_seed(0)
    model(x)
    noise = calls[-1] - x
    assert 0.45 < noise.std().item() < 0.55 and abs(noise.mean().item()) < 0.05
    model.eval()
    model(x)
    assert torch.equal(calls[-1], x)
    with pytest.raises(CnnlabError, match="noise_std must be >= 0"):
        cnnlab.create_model("denoising_autoencoder", noise_std=-1)


class _Linear(torch.nn.Module):
    """A linear 'autoencoder' with a fixed orthonormal basis: its reconstruction error is computable by hand."""

    def __init__(self, basis):
        super().__init__()
        self.basis = basis  # (pixels, dim), orthonormal columns

    def encode(self, x):
        return x.flatten(1) @ self.basis

    def decode(self, z):
        return (z @ self.basis.T).clamp(0, 1).view(-1, 1, 4, 4)


def _batches(x, y, size=20):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def test_compare_with_pca_equals_direct_computations():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 3
    centres = torch.rand(3, 16, generator=g)
    images = (centres[labels] + 0.05 * torch.randn(120, 16, generator=g)).clamp(0, 1).view(-1, 1, 4, 4)
    basis, _ = torch.linalg.qr(torch.randn(16, 3, generator=g))
    model = _Linear(basis)
    result = compare_with_pca(model, _batches(images[:80], labels[:80]), _batches(images[80:], labels[80:]),
                              lambda x: x, knn_k=3)
    assert result.dim == 3 and result.train_images == 80 and result.test_images == 40
    x_tr, x_te = images[:80].flatten(1).numpy(), images[80:].flatten(1).numpy()
    # PCA by hand: centre, top-3 right singular vectors, project, back, clip to [0, 1]
    mean = x_tr.mean(0)
    v = np.linalg.svd(x_tr - mean, full_matrices=False)[2][:3].T
    pca_recon = np.clip((x_te - mean) @ v @ v.T + mean, 0, 1)
    assert result.rows["pca"]["mse"] == pytest.approx(float(np.mean((pca_recon - x_te) ** 2)), rel=1e-4)
    ae_recon = np.clip(x_te @ basis.numpy() @ basis.numpy().T, 0, 1)
    assert result.rows["autoencoder"]["mse"] == pytest.approx(float(np.mean((ae_recon - x_te) ** 2)), rel=1e-4)
    # PCA is the best linear code of its size: a random basis (without the mean) reconstructs worse
    assert result.rows["pca"]["mse"] < result.rows["autoencoder"]["mse"]
    # three well-separated clusters: both codes classify them
    assert result.rows["pca"]["knn_accuracy"] == 1.0 and result.rows["pca"]["probe_accuracy"] == 1.0
    assert "autoencoder" in result.table() and json.dumps(result.to_dict())
    with pytest.raises(CnnlabError, match="at most 16 components"):
        compare_with_pca(_Linear(torch.eye(16).repeat(1, 2)), _batches(images[:80], labels[:80]),
                         _batches(images[80:], labels[80:]), lambda x: x)
    with pytest.raises(CnnlabError, match="no encode"):
        compare_with_pca(torch.nn.Identity(), [], [], lambda x: x)


def test_the_code_map_is_drawn(tmp_path):
    codes = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    path = plot_code_map(tmp_path / "map.png", codes, np.arange(60) % 3, ["a", "b", "c"], method="pca")
    assert path.stat().st_size > 5000
    with pytest.raises(CnnlabError, match="'tsne' or 'pca'"):
        plot_code_map(tmp_path / "x.png", codes, np.arange(60) % 3, ["a", "b", "c"], method="umap")


def test_cli_latent_on_a_run(tmp_path, monkeypatch, capsys):
    register_tiny(monkeypatch)
    config = recon_config(tmp_path, epochs=1)
    config.model.options = {"latent_dim": 4, "input_size": 12}
    run = train(config).run_dir
    before = sorted(p.name for p in run.iterdir())
    assert main(["latent", str(run), "--knn", "3", "--map", "pca"]) == 0
    out = capsys.readouterr().out
    assert "autoencoder" in out and "pca" in out and "3-NN acc" in out
    saved = json.loads((run / "latent" / "latent.json").read_text())
    assert saved["dim"] == 4 and saved["train_images"] == 96 and saved["test_images"] == 30
    assert set(saved["rows"]) == {"autoencoder", "pca"} and (run / "latent" / "latent_map.png").is_file()
    assert sorted(p.name for p in run.iterdir() if p.name != "latent") == before  # the run's files untouched
    assert main(["latent", str(run), "--train-limit", "1"]) != 0
    assert "--train-limit must be >= 2 images, got 1" in capsys.readouterr().err

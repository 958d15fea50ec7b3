"""Conv and linear MACs of ``summary`` against PyTorch's own counter, ``torch.utils.flop_counter.FlopCounterMode``.

A second oracle beside fvcore (tests/analysis/test_registry_counts.py): fvcore is archived and counts
through a JIT trace; FlopCounterMode counts at the dispatcher, from the shapes of each aten call.

Conventions: FlopCounterMode counts 2 FLOPs per multiply-add for ``aten.convolution`` and the
matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``), and nothing for bias adds, norms, pooling or
activations; cnnlab counts one MAC per multiply-add of convolutions and fully connected layers,
biases excluded. So ``2 * cnnlab's conv MACs == FlopCounterMode's convolution FLOPs`` exactly
(integers), and likewise for linear + matmul against the matrix products.

Both sides run on the meta device (shapes only, no arithmetic), so the default input costs no more
than a small one: the counts are those of the size the model is documented at. One variant per family
(the shortest name: the smallest depth or width) keeps this to a few seconds; fvcore covers every variant.
"""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cnnlab
from cnnlab.analysis import summary

MATMUL_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.matmul"}
CONV_OPS = {"aten.convolution", "aten._convolution", "aten.convolution_backward"}


def _one_per_family() -> list[str]:
    families: dict[str, list[str]] = defaultdict(list)
    for name in cnnlab.list_models(task="classification"):
        families[cnnlab.model_info(name).family.name].append(name)
    return sorted(min(names, key=lambda n: (len(n), n)) for names in families.values())


FAMILY_REPRESENTATIVES = _one_per_family()


def _flop_counter(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


def test_the_sample_spans_the_registry() -> None:
    assert len(FAMILY_REPRESENTATIVES) == len({cnnlab.model_info(n).family.name
                                               for n in cnnlab.list_models(task="classification")}) >= 15


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
def test_macs_agree_with_flop_counter_mode(name: str) -> None:
    size = tuple(cnnlab.model_info(name).default_input)
    with torch.device("meta"):
        model = cnnlab.create_model(name).eval()
        x = torch.zeros(1, *size)
    ours = summary(model, size, device="meta", training_memory=False).totals.macs_by_kind
    theirs = _flop_counter(model, x)
    assert set(theirs) <= CONV_OPS | MATMUL_OPS, f"{name}: FlopCounterMode counted ops this test does not map: {theirs}"
    conv = sum(n for op, n in theirs.items() if op in CONV_OPS)
    matmul = sum(n for op, n in theirs.items() if op in MATMUL_OPS)
    assert conv > 0
    assert 2 * ours.get("conv", 0) == conv, (size, ours, theirs)
    assert 2 * (ours.get("linear", 0) + ours.get("matmul", 0)) == matmul, (size, ours, theirs)


def test_flop_counter_mode_counts_what_this_test_assumes() -> None:
    """The conventions above, on layers whose multiply-adds are known by hand."""
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, groups=1, bias=True)
    grouped = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
    linear = torch.nn.Linear(8 * 4 * 4, 5)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(8), torch.nn.ReLU(), grouped, torch.nn.Flatten(), linear)
    counts = _flop_counter(model.eval(), torch.zeros(1, 3, 4, 4))
    conv_macs = 8 * 3 * 9 * 16 + 8 * (8 // 4) * 9 * 16  # out channels x in channels per group x kernel x positions
    assert counts == {"aten.convolution": 2 * conv_macs, "aten.addmm": 2 * 128 * 5}  # no bias, BN or ReLU
    assert summary(model, (3, 4, 4), training_memory=False).totals.macs_by_kind.get("conv") == conv_macs

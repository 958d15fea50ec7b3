"""Weight sharing (cnnlab.compress.sharing): k-means, codebook gradients, pruned zeros, Huffman, storage."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune
from sklearn.cluster import KMeans
from torch import nn

import cnnlab
from cnnlab._errors import CnnlabError
from cnnlab.compress.sharing import (SharingConfig, compression_report, huffman_bits, huffman_code_lengths,
                                     huffman_decode, huffman_encode, kmeans_1d, linear_init, share_weights,
                                     sparse_entries, unshare)
from tests.engine._tiny import register_tiny, tiny_config


def test_linear_init_and_kmeans_on_a_hand_case():
    values = torch.tensor([0.0, 0.1, 0.2, 0.9, 1.0, 3.0])
    assert linear_init(values, 4).tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0])
    # round 1 from [0, 1, 2, 3]: {0, .1, .2} {.9, 1} {} {3} -> means .1, .95, 2 (empty: kept), 3; round 2: same
    centroids, assignment = kmeans_1d(values, 4)
    assert centroids.tolist() == pytest.approx([0.1, 0.95, 2.0, 3.0])
    assert assignment.tolist() == [0, 0, 0, 1, 1, 3]


def test_kmeans_matches_scikit_learn_from_the_same_init():
    torch.manual_seed(0)
    values = torch.randn(2000)
    centroids, assignment = kmeans_1d(values, 16, max_iter=300)
    ref = KMeans(16, init=linear_init(values, 16).double().numpy()[:, None], n_init=1, max_iter=300, tol=0,
                 algorithm="lloyd").fit(values.double().numpy()[:, None])
    np.testing.assert_allclose(centroids.numpy(), ref.cluster_centers_[:, 0], rtol=1e-4, atol=1e-5)
    assert (assignment.numpy() == ref.labels_).mean() > 0.999  # ties at a midpoint may differ in fp32


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_weight_is_codebook_of_indices_and_close_to_the_original():
    model = _net()
    shared = share_weights(model, bits=3)
    for name in ("0", "3"):
        layer, original = shared.get_submodule(name), model.get_submodule(name)
        codebook = layer.parametrizations.weight.original
        indices = layer.parametrizations.weight[0].indices
        assert indices.dtype == torch.uint8 and codebook.shape == (8,) and indices.shape == original.weight.shape
        assert torch.equal(layer.weight, codebook[indices.long()])
        nearest = (original.weight.detach()[..., None] - codebook.detach()).abs().argmin(-1)  # k-means' fixed point
        assert torch.equal(nearest, indices.long())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())  # the original is untouched
    plain = unshare(share_weights(model, bits=3))
    assert isinstance(plain[0].weight, nn.Parameter) and plain[0].weight.unique().numel() <= 8


def test_centroid_gradient_is_the_sum_of_member_gradients():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1.0, -0.2, 1.0], [1.0, -1.0, 0.2]]))
    shared = share_weights(nn.Sequential(layer), bits=2)[0]
    # linear init -1, -1/3, 1/3, 1 (midpoints -2/3, 0, 2/3): clusters {-1, -1} {-0.2} {0.2} {1, 1}
    codebook = shared.parametrizations.weight.original
    assert codebook.tolist() == pytest.approx([-1.0, -0.2, 0.2, 1.0])
    x = torch.tensor([[1.0, 2.0, 3.0]])
    shared(x).sum().backward()  # dL/dW[o, i] = x[i] for both outputs o
    # by hand: -1 at (0, 0), (1, 1): 1 + 2; -0.2 at (0, 1): 2; 0.2 at (1, 2): 3; 1 at (0, 2), (1, 0): 3 + 1
    assert codebook.grad.tolist() == [3.0, 2.0, 3.0, 4.0]


def test_pruned_zeros_stay_zero_and_are_not_clustered():
    model = _net()
    for layer in (model[0], model[3]):
        prune.l1_unstructured(layer, "weight", amount=0.6)
        prune.remove(layer, "weight")
    zeros = model[3].weight == 0
    shared = share_weights(model, bits=2)
    layer = shared[3]
    assert torch.equal(layer.weight == 0, zeros)
    nonzero = model[3].weight[~zeros]
    codebook = layer.parametrizations.weight.original
    torch.testing.assert_close(codebook.detach(), kmeans_1d(nonzero, 4)[0])  # clustered from the nonzeros only
    optimizer = torch.optim.SGD(shared.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        shared(torch.randn(5, 1, 6, 6)).square().sum().backward()
        optimizer.step()
    assert torch.equal(layer.weight == 0, zeros)  # fine-tuning moves the centroids, never the pruned weights


def test_huffman_optimal_lengths_on_hand_distributions():
    # dyadic probabilities 1/2, 1/4, 1/8, 1/8: lengths 1, 2, 3, 3 (= -log2 p)
    assert huffman_code_lengths({"a": 4, "b": 2, "c": 1, "d": 1}) == {"a": 1, "b": 2, "c": 3, "d": 3}
    # the textbook case (CLRS 16.3): a45 b13 c12 d16 e9 f5 -> 1 3 3 3 4 4, 224 bits per 100 symbols
    lengths = huffman_code_lengths({"a": 45, "b": 13, "c": 12, "d": 16, "e": 9, "f": 5})
    assert lengths == {"a": 1, "b": 3, "c": 3, "d": 3, "e": 4, "f": 4}
    assert huffman_code_lengths({7: 10}) == {7: 1}
    symbols = [0] * 45 + [1] * 13 + [2] * 12 + [3] * 16 + [4] * 9 + [5] * 5
    assert huffman_bits(torch.tensor(symbols)) == 224
    assert sum(2 ** -n for n in lengths.values()) == 1.0  # Kraft equality: a full prefix code


def test_huffman_round_trip():
    torch.manual_seed(0)
    symbols = torch.randint(0, 6, (300,)).tolist() + [9]
    bits, codes = huffman_encode(symbols)
    assert huffman_decode(bits, codes) == symbols
    assert len(bits) == huffman_bits(symbols)
    assert not any(a != b and b.startswith(a) for a in codes.values() for b in codes.values())  # prefix-free


def test_sparse_relative_indices_with_fillers():
    # nonzeros at 1, 2 and 12; 3-bit relative indices (max 7): gaps 2, 1, 10 -> 10 = filler 7 + 3
    mask = torch.zeros(14, dtype=torch.bool)
    mask[[1, 2, 12]] = True
    gaps, fillers = sparse_entries(mask, 3)
    assert gaps.tolist() == [2, 1, 7, 3] and fillers == 1


def test_storage_arithmetic_dense_and_pruned():
    model = _net()
    report = compression_report(share_weights(model, config=SharingConfig(conv_bits=3, linear_bits=2)))
    conv, fc = report.layers
    assert (conv.weights, conv.bits, conv.original) == (36, 3, 36 * 32)
    assert conv.pruned == conv.original  # no zeros: stored dense
    assert conv.shared == 32 * 8 + 3 * 36 and fc.shared == 32 * 4 + 2 * 192
    idx = share_weights(model, bits=2)[3].parametrizations.weight[0].indices
    assert fc.huffman == 32 * 4 + huffman_bits(idx) + 8 * idx.unique().numel()
    assert report.other_bits == 32 * (4 + 3)  # the biases
    assert report.ratio == pytest.approx((36 + 192) * 32 / (conv.huffman + fc.huffman))

    layer = nn.Linear(10, 1, bias=False)  # nonzeros at 0, 1 and 9 of 10; fc: 5-bit relative indices
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.5, 0, 0, 0, 0, 0, 0, 0, 1.0]]))
    s = compression_report(share_weights(nn.Sequential(layer), bits=1)).layers[0]
    assert (s.nonzero, s.original) == (3, 320)
    assert s.pruned == 3 * (32 + 5) and s.shared == 32 * 2 + 3 * (1 + 5)
    # codes: -0.5 -> 0, 0.5 and 1.0 -> 1 (centroids -0.5, 0.75): lengths 1, 1; gaps 1, 1, 8: lengths 1, 1
    assert s.huffman == 32 * 2 + 3 + 3 + 8 * (2 + 2)


def test_bad_input_is_refused():
    model = _net()
    for bits in (0, 9, 2.5):
        with pytest.raises(CnnlabError, match="bits must be an integer in 1..8"):
            share_weights(model, bits=bits)
    with pytest.raises(CnnlabError, match="conv_bits must be an integer in 1..8"):
        SharingConfig(conv_bits=12)
    with pytest.raises(CnnlabError, match="'4' is not an unshared conv/linear layer"):
        share_weights(model, layers=["4"])
    with pytest.raises(CnnlabError, match="list of layer names"):
        share_weights(model, layers="0")
    with pytest.raises(CnnlabError, match="no shared layer"):
        compression_report(model)


def test_prune_share_and_fine_tune_the_codebook_with_the_engine(tmp_path, monkeypatch):
    register_tiny(monkeypatch)
    torch.manual_seed(0)
    config = tiny_config(tmp_path, name="full", epochs=3)
    model = cnnlab.engine.train(config, model=cnnlab.create_model("fmnist_net", num_classes=3)).model
    model = model.to(memory_format=torch.contiguous_format)  # torch's pruning views the weights flat
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(module, "weight", amount=0.5)
            prune.remove(module, "weight")
    shared = share_weights(model)
    zeros = {n: m.weight == 0 for n, m in shared.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    config = tiny_config(tmp_path, name="tune", epochs=1)
    config.optim.lr = 0.01  # fine-tuning: a tenth of the training rate
    result = cnnlab.engine.train(config, model=shared)
    assert result.test.accuracy >= 0.8
    report = compression_report(result.model)
    assert len(report.layers) == 5 and report.ratio > 8
    for name, was_zero in zeros.items():
        assert torch.equal(result.model.get_submodule(name).weight == 0, was_zero)
    assert math.isfinite(report.model_ratio)

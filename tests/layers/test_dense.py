"""DenseNet blocks: channel arithmetic, concatenation, transitions, checkpointing."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from cnnlab.layers.dense import DenseBlock, DenseLayer, Transition
from tests.oracle import randomize_norm_stats


def test_dense_block_concatenates_input_and_new_maps():
    torch.manual_seed(0)
    block = randomize_norm_stats(DenseBlock(num_layers=3, in_channels=16, growth_rate=8)).eval()
    x = torch.randn(2, 16, 9, 9)
    out = block(x)
    # the paper's channel arithmetic: k0 + l * k maps after l layers
    assert out.shape == (2, 16 + 3 * 8, 9, 9) and block.out_channels == 40
    assert [layer.conv1.norm.num_features for layer in block.layers] == [16, 24, 32]
    assert torch.equal(out[:, :16], x)  # the input itself is part of the output
    # layer 2's maps are what layer 2 computes from the concatenation of everything before it
    with torch.no_grad():
        l0 = block.layers[0](x)
        l1 = block.layers[1]([x, l0])
    torch.testing.assert_close(out[:, 16:24], l0)
    torch.testing.assert_close(out[:, 24:32], l1)


def test_dense_layer_is_bn_relu_conv_bottleneck():
    torch.manual_seed(0)
    layer = randomize_norm_stats(DenseLayer(12, growth_rate=6, bn_size=4)).eval()
    assert layer.conv1.conv.out_channels == 24 and layer.conv1.conv.kernel_size == (1, 1)
    assert layer.conv2.conv.out_channels == 6 and layer.conv2.conv.kernel_size == (3, 3)
    x = torch.randn(1, 12, 7, 7)

    def bn_relu(t, bn):
        return F.relu(F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))

    with torch.no_grad():
        h = F.conv2d(bn_relu(x, layer.conv1.norm), layer.conv1.conv.weight)
        expected = F.conv2d(bn_relu(h, layer.conv2.norm), layer.conv2.conv.weight, padding=1)
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer([x[:, :5], x[:, 5:]]), expected)  # a list is concatenated first


def test_no_bottleneck_option():
    layer = DenseLayer(12, growth_rate=6, bn_size=0)
    assert isinstance(layer.conv1, torch.nn.Identity) and layer.conv2.conv.in_channels == 12
    assert layer(torch.randn(1, 12, 5, 5)).shape == (1, 6, 5, 5)


def test_transition_compresses_and_pools():
    torch.manual_seed(0)
    t = randomize_norm_stats(Transition(32, 16)).eval()
    x = torch.randn(2, 32, 8, 8)
    bn = t.norm
    with torch.no_grad():
        expected = F.avg_pool2d(
            F.conv2d(F.relu(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)), t.conv.weight), 2
        )
        torch.testing.assert_close(t(x), expected)
    assert expected.shape == (2, 16, 4, 4)


def test_memory_efficient_gives_same_output_and_gradients():
    torch.manual_seed(0)
    plain = DenseBlock(3, 8, growth_rate=4).train()
    efficient = copy.deepcopy(plain)
    for layer in efficient.layers:
        layer.memory_efficient = True
    x1 = torch.randn(2, 8, 6, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out1, out2 = plain(x1), efficient(x2)
    torch.testing.assert_close(out1, out2)
    (out1 ** 2).sum().backward()
    (out2 ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for (name, p1), p2 in zip(plain.named_parameters(), efficient.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)


@pytest.mark.parametrize("training", [False, True])
def test_dropout_only_while_training(training):
    torch.manual_seed(0)
    layer = DenseLayer(8, growth_rate=16, drop_rate=0.5).train(training)
    reference = copy.deepcopy(layer)
    reference.drop_rate = 0.0
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        same = torch.equal(layer(x), reference(x))
    assert same is (not training)

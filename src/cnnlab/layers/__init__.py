"""Blocks every model shares. Family-specific blocks live in this package's other modules."""
from cnnlab.layers.activations import ACTIVATIONS, Maxout, get_act_layer
from cnnlab.layers.aspp import ASPP, ImagePooling, SeparableConvNormAct, atrous_rates
from cnnlab.layers.attention import SqueezeExcite
from cnnlab.layers.conv import (
    ConvNormAct,
    SeparableConv2d,
    channel_shuffle,
    conv_output_size,
    conv_transpose_output_size,
    make_act,
    make_divisible,
    same_padding,
)
from cnnlab.layers.dense import DenseBlock, DenseLayer, NormActConv, Transition
from cnnlab.layers.drop import DropConnectLinear, DropPath, drop_path
from cnnlab.layers.fire import Fire
from cnnlab.layers.inception import InceptionModule
from cnnlab.layers.init import INIT_SCHEMES, init_weights, zero_init_last_norm
from cnnlab.layers.mbconv import DepthwiseSeparableBlock, MBConv
from cnnlab.layers.norm import LayerNorm2d, get_norm_layer, local_response_norm
from cnnlab.layers.pyramid_pooling import PyramidPooling, PyramidPoolingBranch
from cnnlab.layers.residual import BasicBlock, Bottleneck, NormAct, PreActBasicBlock, PreActBottleneck
from cnnlab.layers.shuffle import ChannelShuffle, ShuffleUnitV1, ShuffleUnitV2
from cnnlab.layers.spp import SpatialPyramidPooling, SPPRoIPool, spp_output_size, spp_roi_pool
from cnnlab.layers.upsample import UpsampleConv

__all__ = [
    "ASPP", "ImagePooling", "SeparableConvNormAct", "atrous_rates", "PyramidPooling", "PyramidPoolingBranch",
    "UpsampleConv",
    "SPPRoIPool", "SpatialPyramidPooling", "spp_output_size", "spp_roi_pool",
    "DepthwiseSeparableBlock", "MBConv",
    "ChannelShuffle", "DenseBlock", "DenseLayer", "NormActConv", "ShuffleUnitV1", "ShuffleUnitV2", "Transition",
    "ACTIVATIONS", "BasicBlock", "Bottleneck", "NormAct", "PreActBasicBlock", "PreActBottleneck", "ConvNormAct", "Fire", "InceptionModule", "DropConnectLinear", "DropPath", "INIT_SCHEMES", "LayerNorm2d", "Maxout",
    "SeparableConv2d", "SqueezeExcite", "channel_shuffle", "conv_output_size", "conv_transpose_output_size",
    "drop_path", "get_act_layer", "get_norm_layer", "init_weights", "local_response_norm", "make_act",
    "make_divisible", "same_padding", "zero_init_last_norm",
]

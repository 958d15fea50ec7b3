"""Compression for inference: BatchNorm folding (more techniques join as they land). Works on any nn.Module."""
from cnnlab.compress.fold import FoldReport, find_conv_bn_pairs, fold_bn, probe_input

__all__ = ["FoldReport", "find_conv_bn_pairs", "fold_bn", "probe_input"]

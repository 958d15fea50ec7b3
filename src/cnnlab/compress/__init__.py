"""Compression: BatchNorm folding, binarisation (BWN, XNOR-Net), weight sharing (Deep Compression), pruning,
knowledge distillation, int8 post-training quantisation (ONNX Runtime, torchao PT2E). Works on any nn.Module."""
from cnnlab.compress.binary import (BinaryConfig, BinaryConv2d, BinaryLinear, BinaryStorage, binarize,
                                    binary_storage_bytes, sign_ste)
from cnnlab.compress.distill import Teacher, distillation_loss, soft_target_loss
from cnnlab.compress.fold import FoldReport, find_conv_bn_pairs, fold_bn, probe_input
from cnnlab.compress.prune import PruneConfig, PruneResult, parse_amounts, rebuild_pruned
from cnnlab.compress.prune_structured import (ChannelPruner, StructuredReport, apply_structure, prune_structured,
                                              structure_of)
from cnnlab.compress.quantize import QuantResult, calibration_batches, quantize_onnx, quantize_pt2e, save_pt2e
from cnnlab.compress.prune_unstructured import SparsityReport, make_permanent, prune_unstructured, sparsity_report
from cnnlab.compress.sharing import (CompressionReport, LayerStorage, SharingConfig, compression_report,
                                     huffman_code_lengths, kmeans_1d, share_weights, unshare)

__all__ = ["FoldReport", "find_conv_bn_pairs", "fold_bn", "probe_input",
           "BinaryConfig", "BinaryConv2d", "BinaryLinear", "BinaryStorage", "binarize", "binary_storage_bytes",
           "sign_ste", "CompressionReport", "LayerStorage", "SharingConfig", "compression_report",
           "huffman_code_lengths", "kmeans_1d", "share_weights", "unshare",
           "PruneConfig", "PruneResult", "parse_amounts", "rebuild_pruned", "ChannelPruner", "StructuredReport",
           "apply_structure", "prune_structured", "structure_of", "SparsityReport", "make_permanent",
           "prune_unstructured", "sparsity_report", "Teacher", "distillation_loss", "soft_target_loss",
           "QuantResult", "calibration_batches", "quantize_onnx", "quantize_pt2e", "save_pt2e"]

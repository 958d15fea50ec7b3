"""Seeing inside a network: per-layer summary (parameters, MACs, activations, receptive field),
model comparison and gradient flow. Works on any ``nn.Module``; names go through the registry."""
from cnnlab.analysis._result import Row, Summary, Totals
from cnnlab.analysis.compare import Comparison, compare
from cnnlab.analysis.gradflow import GradientFlow, gradient_flow
from cnnlab.analysis.receptive_field import ReceptiveField, empirical_receptive_field, receptive_fields
from cnnlab.analysis.summary import summary

__all__ = ["Comparison", "GradientFlow", "ReceptiveField", "Row", "Summary", "Totals", "compare",
           "empirical_receptive_field", "gradient_flow", "receptive_fields", "summary"]

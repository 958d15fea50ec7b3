"""Seeing inside a network: per-layer summary (parameters, MACs, activations, receptive field),
model comparison, gradient flow and the plain-vs-residual depth study. Works on any ``nn.Module``; names go through the registry."""
from cnnlab.analysis._result import Row, Summary, Totals
from cnnlab.analysis.compare import Comparison, compare
from cnnlab.analysis.depth import DepthRecipe, DepthStudy, depth_study
from cnnlab.analysis.gradflow import GradientFlow, gradient_flow
from cnnlab.analysis.receptive_field import ReceptiveField, empirical_receptive_field, receptive_fields
from cnnlab.analysis.summary import summary

__all__ = ["Comparison", "DepthRecipe", "DepthStudy", "GradientFlow", "ReceptiveField", "Row", "Summary", "Totals",
           "compare", "depth_study", "empirical_receptive_field", "gradient_flow", "receptive_fields", "summary"]

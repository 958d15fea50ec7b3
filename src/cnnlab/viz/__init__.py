"""Seeing what a network looks at: line filters and learned filters, feature maps, Grad-CAM and saliency."""
from cnnlab.viz.cam import Explanation, explain, gradcam, plot_explanation, resolve_layer, resolve_target, saliency
from cnnlab.viz.feature_maps import StageMaps, plot_feature_maps, stage_feature_maps
from cnnlab.viz.filters import (
    apply_filters,
    first_layer_filters,
    line_filters,
    plot_filter_responses,
    plot_first_layer_filters,
)

__all__ = [
    "Explanation", "StageMaps", "apply_filters", "explain", "first_layer_filters", "gradcam", "line_filters",
    "plot_explanation", "plot_feature_maps", "plot_filter_responses", "plot_first_layer_filters", "resolve_layer",
    "resolve_target", "saliency", "stage_feature_maps",
]

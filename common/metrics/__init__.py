"""Evaluation metrics of a registration: overlap, folding, landmark error and multimodal similarity."""

from __future__ import annotations

from .jacobian import ndv_percent, nonpositive_jacobian_percent
from .landmarks import tre
from .mutual_information import foreground, normalized_mutual_information, patchwise_mi_map
from .overlap import dice_per_label, hd95_per_label, mean_dict
from .percentiles import percentiles

__all__ = [
    "dice_per_label",
    "foreground",
    "hd95_per_label",
    "mean_dict",
    "ndv_percent",
    "nonpositive_jacobian_percent",
    "normalized_mutual_information",
    "patchwise_mi_map",
    "percentiles",
    "tre",
]

"""Evaluation metrics of a registration: overlap, folding, landmark error and local multimodal similarity."""

from __future__ import annotations

from .jacobian import ndv_percent, nonpositive_jacobian_percent
from .landmarks import tre
from .mutual_information import patchwise_mi_map
from .overlap import dice_per_label, hd95_per_label, mean_dict

__all__ = [
    "dice_per_label",
    "hd95_per_label",
    "mean_dict",
    "ndv_percent",
    "nonpositive_jacobian_percent",
    "patchwise_mi_map",
    "tre",
]

"""The batch reduction shared by the collection's similarity losses."""

from __future__ import annotations

import torch
from monai.utils import LossReduction


def reduce_negated(similarity: torch.Tensor, reduction: str) -> torch.Tensor:
    """``-similarity`` reduced as MONAI losses do: ``"mean"``, ``"sum"``, or ``"none"`` (unreduced)."""
    if reduction == LossReduction.MEAN.value:
        return -similarity.mean()
    if reduction == LossReduction.SUM.value:
        return -similarity.sum()
    return -similarity

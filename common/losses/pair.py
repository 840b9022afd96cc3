"""The loss of a displacement predicted for an image pair: image similarities, regularisers, an optional teacher to
distil from and, where the pair's label maps are known (synthetic training pairs), their overlap."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.layers import GaussianFilter

from common.spatial.fields import warp

from .correlation import GlobalNormalizedCrossCorrelationLoss
from .mutual_information import MultiAxisMutualInformationLoss
from .regularizers import DisplacementDivergenceLoss, DisplacementSmoothnessLoss

__all__ = ["PairRegistrationLoss", "joint_one_hot"]


def joint_one_hot(*label_maps: torch.Tensor) -> list[torch.Tensor]:
    """One-hot encodings ``[B, L, X, Y, Z]`` of label maps ``[B, 1, X, Y, Z]`` (any label values) over the ``L`` values
    present in any of them, in one channel order, background (the smallest value) first; on the maps' device."""
    values = torch.unique(torch.cat([m.flatten() for m in label_maps]))
    encoded = []
    for m in label_maps:
        index = torch.searchsorted(values, m[:, 0].contiguous())
        encoded.append(torch.movedim(F.one_hot(index, len(values)), -1, 1).float())
    return encoded


class PairRegistrationLoss(nn.Module):
    """``w_mi MI(f, m∘u) + w_ncc NCC(f, m∘u) + w_s |∇u|² + w_div (∇·u)² + w_kd MI(m∘u_T, m∘u) + w_lab Dice(l_f, l_m∘u)
    + w_field |u - u*|``.

    The objectives of TTO-KD in one module: the teacher's training (MI and smoothness; on synthetic pairs also the
    overlap of their label maps, as SynthMorph trains, or the end-point error against the known field ``u*``), the
    student's distillation (``distillation_weight`` > 0 with the teacher's displacement ``u_T``) and test-time
    optimisation (MI, NCC, smoothness, divergence). MI is :class:`MultiAxisMutualInformationLoss`, NCC is global, the
    label term is one minus the soft Dice of the one-hot moving labels warped (trilinearly) by ``u`` and the fixed
    labels, over the foreground labels of either map. Terms weighted 0 are not computed. The last values of the terms
    are kept in :attr:`terms` for logging.

    Args:
        mi_weight, ncc_weight: weights of the two similarities of fixed and warped moving.
        smoothness_weight: weight of the mean squared forward differences of ``u`` (voxels).
        divergence_weight: weight of the mean squared divergence of ``u``.
        distillation_weight: weight of the MI between the moving image warped by the teacher and by ``u``.
        label_weight: weight of the label maps' soft Dice loss (needs both label maps).
        field_weight: weight of the mean end-point error (voxels) against a known displacement (needs ``target_ddf``).
        num_bins: histogram bins of the MI terms.
        image_sigma: Gaussian smoothing (voxels) of both images before warping and comparing; 0 disables it. Without
            it, interpolation blurs noise away and MI rewards sub-voxel shifts that align nothing.
    """

    def __init__(
        self,
        mi_weight: float = 1.0,
        ncc_weight: float = 0.0,
        smoothness_weight: float = 1.0,
        divergence_weight: float = 0.0,
        distillation_weight: float = 0.0,
        label_weight: float = 0.0,
        field_weight: float = 0.0,
        num_bins: int = 8,
        image_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        self.weights = {
            "mi": mi_weight,
            "ncc": ncc_weight,
            "smoothness": smoothness_weight,
            "divergence": divergence_weight,
            "distillation": distillation_weight,
            "label": label_weight,
            "field": field_weight,
        }
        if not any(self.weights.values()):
            raise ValueError("at least one weight of the pair loss must be non-zero.")
        self.mi = MultiAxisMutualInformationLoss(num_bins=num_bins)
        self.ncc = GlobalNormalizedCrossCorrelationLoss()
        self.smoothness = DisplacementSmoothnessLoss()
        self.divergence = DisplacementDivergenceLoss()
        self.label_dice = DiceLoss(include_background=False)
        self.smooth_images = GaussianFilter(3, image_sigma) if image_sigma > 0 else None
        self.terms: dict[str, float] = {}

    def forward(
        self,
        ddf: torch.Tensor,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        teacher_ddf: torch.Tensor | None = None,
        fixed_label: torch.Tensor | None = None,
        moving_label: torch.Tensor | None = None,
        target_ddf: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``ddf`` ``[B, 3, X, Y, Z]`` (voxels, pull-back) for ``fixed``, ``moving`` ``[B, 1, X, Y, Z]`` in
        ``[0, 1]``; ``teacher_ddf`` like ``ddf``, needed when the distillation weight is not 0; the label maps
        ``[B, 1, X, Y, Z]`` (any integer values, 0 background), needed when the label weight is not 0; ``target_ddf``
        like ``ddf``, the known displacement, needed when the field weight is not 0."""
        if self.weights["distillation"] and teacher_ddf is None:
            raise ValueError("a distillation weight needs the teacher's displacement (teacher_ddf).")
        if self.weights["label"] and (fixed_label is None or moving_label is None):
            raise ValueError("a label weight needs both label maps (fixed_label, moving_label).")
        if self.weights["field"] and target_ddf is None:
            raise ValueError("a field weight needs the known displacement (target_ddf).")
        if self.smooth_images is not None:
            fixed, moving = self.smooth_images(fixed), self.smooth_images(moving)
        warped = warp(moving, ddf)
        terms: dict[str, torch.Tensor] = {}
        if self.weights["mi"]:
            terms["mi"] = self.mi(warped, fixed)
        if self.weights["ncc"]:
            terms["ncc"] = self.ncc(warped, fixed)
        if self.weights["smoothness"]:
            terms["smoothness"] = self.smoothness(ddf)
        if self.weights["divergence"]:
            terms["divergence"] = self.divergence(ddf)
        if self.weights["distillation"]:
            terms["distillation"] = self.mi(warped, warp(moving, teacher_ddf.detach()))
        if self.weights["label"]:
            fixed_onehot, moving_onehot = joint_one_hot(fixed_label, moving_label)
            terms["label"] = self.label_dice(warp(moving_onehot, ddf), fixed_onehot)
        if self.weights["field"]:
            # the small constant keeps the gradient of the norm finite where the error is exactly 0
            terms["field"] = ((ddf - target_ddf.detach()).pow(2).sum(1) + 1e-6).sqrt().mean()
        self.terms = {name: float(value.detach()) for name, value in terms.items()}
        return torch.stack([self.weights[name] * value for name, value in terms.items()]).sum()

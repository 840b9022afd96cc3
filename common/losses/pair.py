"""The unsupervised loss of a displacement predicted for an image pair, with an optional teacher to distil from."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.layers import GaussianFilter

from common.spatial.fields import warp

from .correlation import GlobalNormalizedCrossCorrelationLoss
from .mutual_information import MultiAxisMutualInformationLoss
from .regularizers import DisplacementDivergenceLoss, DisplacementSmoothnessLoss

__all__ = ["PairRegistrationLoss"]


class PairRegistrationLoss(nn.Module):
    """``w_mi MI(f, m∘u) + w_ncc NCC(f, m∘u) + w_s |∇u|² + w_div (∇·u)² + w_kd MI(m∘u_T, m∘u)``.

    The objectives of TTO-KD in one module: the teacher's training (MI and smoothness), the student's distillation
    (``distillation_weight`` > 0 with the teacher's displacement ``u_T``) and test-time optimisation (MI, NCC,
    smoothness, divergence). MI is :class:`MultiAxisMutualInformationLoss`, NCC is global. Terms weighted 0 are not
    computed. The last values of the terms are kept in :attr:`terms` for logging.

    Args:
        mi_weight, ncc_weight: weights of the two similarities of fixed and warped moving.
        smoothness_weight: weight of the mean squared forward differences of ``u`` (voxels).
        divergence_weight: weight of the mean squared divergence of ``u``.
        distillation_weight: weight of the MI between the moving image warped by the teacher and by ``u``.
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
        num_bins: int = 8,
        image_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        if not any((mi_weight, ncc_weight, smoothness_weight, divergence_weight, distillation_weight)):
            raise ValueError("at least one weight of the pair loss must be non-zero.")
        self.weights = {
            "mi": mi_weight,
            "ncc": ncc_weight,
            "smoothness": smoothness_weight,
            "divergence": divergence_weight,
            "distillation": distillation_weight,
        }
        self.mi = MultiAxisMutualInformationLoss(num_bins=num_bins)
        self.ncc = GlobalNormalizedCrossCorrelationLoss()
        self.smoothness = DisplacementSmoothnessLoss()
        self.divergence = DisplacementDivergenceLoss()
        self.smooth_images = GaussianFilter(3, image_sigma) if image_sigma > 0 else None
        self.terms: dict[str, float] = {}

    def forward(
        self, ddf: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, teacher_ddf: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss of ``ddf`` ``[B, 3, X, Y, Z]`` (voxels, pull-back) for ``fixed``, ``moving`` ``[B, 1, X, Y, Z]`` in
        ``[0, 1]``; ``teacher_ddf`` like ``ddf``, needed when the distillation weight is not 0."""
        if self.weights["distillation"] and teacher_ddf is None:
            raise ValueError("a distillation weight needs the teacher's displacement (teacher_ddf).")
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
        self.terms = {name: float(value.detach()) for name, value in terms.items()}
        return torch.stack([self.weights[name] * value for name, value in terms.items()]).sum()

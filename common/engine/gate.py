"""The contrast gate (whether two images are far enough apart in contrast to need a style transfer first) and the
gated style transfer of a pair."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers import GaussianFilter

from common.spatial import scaled_shape

from .registration import downsample_image

__all__ = ["ContrastGate", "GatedStyleTransfer", "local_correlation"]


def local_correlation(fixed: torch.Tensor, moving: torch.Tensor, sigma: float = 1.0, eps: float = 1e-4) -> float:
    """Mean signed local correlation of two images ``[1, 1, X, Y, Z]`` (Gaussian window of ``sigma`` voxels), over the
    voxels where both vary: near 1 for one contrast, lower or negative where the contrasts differ (a T2 against a T1
    inverts grey and white matter). Unlike the squared LNCC of registration losses, the sign is kept."""
    smooth = GaussianFilter(3, sigma).to(fixed.device)
    mean_f, mean_m = smooth(fixed), smooth(moving)
    cov = smooth(fixed * moving) - mean_f * mean_m
    var_f, var_m = smooth(fixed * fixed) - mean_f**2, smooth(moving * moving) - mean_m**2
    varying = (var_f > eps) & (var_m > eps)
    if not bool(varying.any()):
        return 0.0
    cc = cov / torch.sqrt(var_f.clamp(min=eps) * var_m.clamp(min=eps))
    return float(cc[varying].mean())


class ContrastGate:
    """Decide whether a pair needs a style transfer: the signed local correlation of the two images (intensities in
    ``[0, 1]``) on a coarse grid, against a threshold.

    Measured on inter-subject renderings of the held-out label maps at 4 mm (sigma 1 voxel): T1-like against T1-like
    0.61-0.72 (one subject: 0.997), FLAIR-like 0.52-0.59, PD-like 0.17-0.32, T2-like 0.02-0.25.

    Args:
        mode: ``"auto"`` (transfer below ``threshold``), ``"always"`` or ``"never"``.
        threshold: the correlation below which the pair is transferred.
        spacing_mm: the coarse grid's voxel size (mm).
        sigma: the Gaussian window (voxels of the coarse grid).
    """

    def __init__(self, mode: str = "auto", threshold: float = 0.6, spacing_mm: float = 4.0, sigma: float = 1.0) -> None:
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"the contrast gate is auto, always or never, got {mode!r}.")
        if spacing_mm <= 0 or sigma <= 0:
            raise ValueError(f"spacing_mm and sigma must be positive, got {spacing_mm} and {sigma}.")
        self.mode, self.threshold, self.spacing_mm, self.sigma = mode, threshold, spacing_mm, sigma

    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float]) -> tuple[bool, float]:
        """``(transfer, correlation)`` for images ``[1, 1, X, Y, Z]`` on one grid of voxel size ``spacing`` (mm)."""
        shape = scaled_shape(fixed.shape[2:], spacing, max(self.spacing_mm, min(spacing)))
        with torch.no_grad():
            correlation = local_correlation(downsample_image(fixed, shape), downsample_image(moving, shape), self.sigma)
        if self.mode != "auto":
            return self.mode == "always", correlation
        return correlation < self.threshold, correlation


class GatedStyleTransfer(nn.Module):
    """A pair transform: when ``gate`` finds a contrast gap, the images named by ``transfer`` go through the frozen
    ``synthesizer`` (an image in ``[0, 1]`` -> a T1-like image), so that a mono-modal backbone, the refiners and their
    similarity all see a like-contrast pair.

    Args:
        synthesizer: image ``[1, 1, X, Y, Z]`` -> T1-like image (e.g. :class:`~common.networks.BrainIDSynthesizer`);
            frozen here. None: the pair is never transferred.
        gate: a :class:`ContrastGate`; None: transfer whenever there is a synthesizer.
        transfer: which images go through the synthesizer: ``"both"``, ``"fixed"`` or ``"moving"``.
    """

    def __init__(self, synthesizer: nn.Module | None, gate: ContrastGate | None = None, transfer: str = "both") -> None:
        super().__init__()
        if transfer not in ("both", "fixed", "moving"):
            raise ValueError(f"transfer must be both, fixed or moving, got {transfer!r}.")
        self.synthesizer = synthesizer.requires_grad_(False).eval() if synthesizer is not None else None
        self.gate, self.transfer = gate, transfer

    def train(self, mode: bool = True) -> GatedStyleTransfer:
        super().train(mode)
        if self.synthesizer is not None:
            self.synthesizer.eval()  # frozen: keeps its inference behaviour
        return self

    def forward(
        self, fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float | bool]]:
        """``(fixed, moving, decisions)`` for images ``[1, 1, X, Y, Z]`` in ``[0, 1]`` on one grid of voxel size
        ``spacing`` (mm); ``decisions`` holds ``style_transfer`` and the gate's ``contrast_correlation``."""
        decisions: dict[str, float | bool] = {}
        transfer = self.synthesizer is not None
        if transfer and self.gate is not None:
            transfer, decisions["contrast_correlation"] = self.gate(fixed, moving, spacing)
        decisions["style_transfer"] = transfer
        if transfer:
            with torch.no_grad():
                if self.transfer in ("both", "fixed"):
                    fixed = self.synthesizer(fixed).clamp(0, 1)
                if self.transfer in ("both", "moving"):
                    moving = self.synthesizer(moving).clamp(0, 1)
        return fixed, moving, decisions

"""The contrast gate (whether two images are far enough apart in contrast to need a style transfer first), the
gated style transfer of a pair, and the anatomy gate (whether two images show one subject's anatomy)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers import GaussianFilter

from common.metrics import foreground, normalized_mutual_information
from common.spatial import scaled_shape

from .precision import autocast_bfloat16, check_amp
from .registration import downsample_image

__all__ = ["AnatomyGate", "ContrastGate", "GatedStyleTransfer", "local_correlation"]


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

    Measured at 4 mm (sigma 1 voxel) on inter-subject renderings of the held-out label maps: T1-like against T1-like
    0.61-0.72 (one subject: 0.997), FLAIR-like 0.50-0.65, PD-like 0.17-0.32, T2-like 0.02-0.25; a real T1 pair of two
    subjects 0.72. The default 0.7 transfers a FLAIR-like pair at 0.65, which a T1-trained backbone misaligns
    (-0.1 Dice when left as it is), and leaves the real T1 pair, which a transfer would cost 0.02.

    Args:
        mode: ``"auto"`` (transfer below ``threshold``), ``"always"`` or ``"never"``.
        threshold: the correlation below which the pair is transferred.
        spacing_mm: the coarse grid's voxel size (mm).
        sigma: the Gaussian window (voxels of the coarse grid).
    """

    def __init__(self, mode: str = "auto", threshold: float = 0.7, spacing_mm: float = 4.0, sigma: float = 1.0) -> None:
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


class AnatomyGate:
    """Decide whether two images, as aligned when they arrive, show one anatomy (one subject's scans at two times or
    in two contrasts) rather than two subjects': their normalised mutual information inside the fixed image's
    foreground, against a threshold. Scans of one anatomy share every fold, so their intensities predict each other
    far better than two brains' do, whatever the contrasts.

    Measured (32 bins, voxels above 0.1 of the fixed image's 99th percentile): one anatomy 0.18-0.30 (the SPM12 T1
    template against its T2 and PD templates as they are, or moved by up to 5 mm and acquired with 6 mm slices, bias and
    noise), two subjects 0.04-0.13 (rendered inter-subject T1/T2/FLAIR/PD pairs 0.04-0.09, real T1 pairs of two
    subjects 0.08-0.12, one subject against population templates 0.07-0.13); two population averages in one space
    0.13-0.19, either side.

    Args:
        mode: ``"auto"`` (one anatomy at or above ``threshold``), ``"always"`` or ``"never"``.
        threshold: the NMI from which a pair counts as one anatomy.
        bins: intensity levels of the joint histogram.
        foreground: fraction of the fixed image's 99th percentile above which a voxel is compared.
    """

    def __init__(self, mode: str = "auto", threshold: float = 0.16, bins: int = 32, foreground: float = 0.1) -> None:
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"the anatomy gate is auto, always or never, got {mode!r}.")
        if not 0 < threshold < 1 or bins < 2 or not 0 <= foreground < 1:
            raise ValueError(
                f"need 0 < threshold < 1, bins >= 2 and 0 <= foreground < 1, got {threshold}, {bins}, {foreground}."
            )
        self.mode, self.threshold, self.bins, self.foreground = mode, threshold, bins, foreground

    def __call__(
        self, fixed: torch.Tensor, moving: torch.Tensor, fixed_mask: torch.Tensor | None = None
    ) -> tuple[bool, float]:
        """``(one_anatomy, nmi)`` for images ``[1, 1, X, Y, Z]`` on one grid, compared inside ``fixed_mask`` (same
        shape, 1 inside) when given."""
        with torch.no_grad():
            inside = foreground(fixed[0, 0], self.foreground) if fixed_mask is None else fixed_mask[0, 0] > 0
            nmi = normalized_mutual_information(fixed[0, 0], moving[0, 0], bins=self.bins, mask=inside)
        if self.mode != "auto":
            return self.mode == "always", nmi
        return nmi >= self.threshold, nmi


class GatedStyleTransfer(nn.Module):
    """A pair transform: when ``gate`` finds a contrast gap, the images named by ``transfer`` go through the frozen
    ``synthesizer`` (an image in ``[0, 1]`` -> a T1-like image), so that a mono-modal backbone, the refiners and their
    similarity all see a like-contrast pair.

    Args:
        synthesizer: image ``[1, 1, X, Y, Z]`` -> T1-like image (e.g. :class:`~common.networks.BrainIDSynthesizer`);
            frozen here. None: the pair is never transferred.
        gate: a :class:`ContrastGate`; None: transfer whenever there is a synthesizer.
        transfer: which images go through the synthesizer: ``"both"``, ``"fixed"``, ``"moving"``, or ``"auto"``:
            both are transferred, and the one the gate finds closer in contrast to its own transfer keeps its original
            intensities when that correlation passes the gate's threshold (it is T1-like already, and the
            synthesizer would only blur it); otherwise both are replaced.
        amp: run the synthesizer in bfloat16 (True, False or ``"auto"``: :func:`~common.engine.autocast_bfloat16`);
            its output returns in float32.
    """

    def __init__(
        self,
        synthesizer: nn.Module | None,
        gate: ContrastGate | None = None,
        transfer: str = "both",
        amp: bool | str = False,
    ) -> None:
        super().__init__()
        if transfer not in ("both", "fixed", "moving", "auto"):
            raise ValueError(f"transfer must be both, fixed, moving or auto, got {transfer!r}.")
        if transfer == "auto" and gate is None:
            raise ValueError("transfer='auto' needs a gate: its threshold decides which image is T1-like already.")
        self.synthesizer = synthesizer.requires_grad_(False).eval() if synthesizer is not None else None
        self.gate, self.transfer, self.amp = gate, transfer, check_amp(amp)

    def train(self, mode: bool = True) -> GatedStyleTransfer:
        super().train(mode)
        if self.synthesizer is not None:
            self.synthesizer.eval()  # frozen: keeps its inference behaviour
        return self

    def forward(
        self, fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float | bool | str]]:
        """``(fixed, moving, decisions)`` for images ``[1, 1, X, Y, Z]`` in ``[0, 1]`` on one grid of voxel size
        ``spacing`` (mm); ``decisions`` holds ``style_transfer``, the gate's ``contrast_correlation`` and, when the
        pair was transferred, which images were (``transferred``; with ``"auto"`` also each image's correlation with
        its own transfer, ``fixed_t1_correlation`` and ``moving_t1_correlation``)."""
        decisions: dict[str, float | bool | str] = {}
        transfer = self.synthesizer is not None
        if transfer and self.gate is not None:
            transfer, decisions["contrast_correlation"] = self.gate(fixed, moving, spacing)
        decisions["style_transfer"] = transfer
        if not transfer:
            return fixed, moving, decisions
        images = {"fixed": fixed, "moving": moving}
        names = ("fixed", "moving") if self.transfer in ("both", "auto") else (self.transfer,)
        with torch.no_grad(), autocast_bfloat16(fixed.device, self.amp):
            transferred = {name: self.synthesizer(images[name]).float().clamp(0, 1) for name in names}
        if self.transfer == "auto":
            likeness = {name: self._likeness(images[name], transferred[name], spacing) for name in names}
            decisions.update({f"{name}_t1_correlation": value for name, value in likeness.items()})
            kept = max(likeness, key=likeness.get)
            if likeness[kept] >= self.gate.threshold:
                del transferred[kept]
        decisions["transferred"] = "both" if len(transferred) == 2 else next(iter(transferred))
        images.update(transferred)
        return images["fixed"], images["moving"], decisions

    def _likeness(self, image: torch.Tensor, transferred: torch.Tensor, spacing: Sequence[float]) -> float:
        """The gate's correlation of an image with its own transfer: high when the image is T1-like already."""
        return self.gate(image, transferred, spacing)[1]

"""A frozen registration backbone adapted to a pair: a contrast gate and style transfer before it, refiners after it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .refiners import ProgressiveRefiner

__all__ = ["FrozenBackboneAdapter"]


class FrozenBackboneAdapter(nn.Module):
    """``[B, 2, X, Y, Z]`` (moving, fixed; intensities in ``[0, 1]``) -> the fields of each refinement stage, coarse to
    fine, ``[B, 3, X, Y, Z]`` each (voxels, pull-back; the last is the result).

    When ``gate`` finds a contrast gap, the images named by ``transfer`` go through ``synthesizer`` (a T1-like image
    out); the frozen ``backbone`` ``(fixed, moving) -> ddf`` registers the pair, and ``refiner`` refines its field on
    the original images. Only the refiner has trainable parameters; the gated, transferred pair and the backbone's
    field are computed once per input tensor (the per-pair optimisation calls this module on the same pair each step).

    Args:
        backbone: a mono-modal registration network, frozen here (e.g. :class:`~common.networks.VFA`).
        refiner: the per-pair trainable part (:class:`~common.networks.ProgressiveRefiner`).
        synthesizer: image -> T1-like image (e.g. :class:`~common.networks.BrainIDSynthesizer`), frozen; None: no
            style transfer.
        gate: ``gate(fixed, moving, spacing) -> (transfer, measure)`` (e.g. :class:`~common.engine.ContrastGate`); None:
            transfer whenever a synthesizer is given.
        transfer: which images go through the synthesizer: ``"both"``, ``"fixed"`` or ``"moving"``.
        spacing_mm: the voxel size of the grid the pairs come on (the per-pair optimisation's working grid), for the
            gate.
    """

    def __init__(
        self,
        backbone: nn.Module,
        refiner: ProgressiveRefiner,
        synthesizer: nn.Module | None = None,
        gate: Callable[..., tuple[bool, float]] | None = None,
        transfer: str = "both",
        spacing_mm: float = 1.0,
    ) -> None:
        super().__init__()
        if transfer not in ("both", "fixed", "moving"):
            raise ValueError(f"transfer must be both, fixed or moving, got {transfer!r}.")
        self.backbone, self.refiner, self.synthesizer = backbone, refiner, synthesizer
        for frozen in (backbone, synthesizer):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        self.gate, self.transfer, self.spacing_mm = gate, transfer, float(spacing_mm)
        self.transferred: bool | None = None
        self._initial: tuple[torch.Tensor, torch.Tensor] | None = None

    def initial_field(self, pair: torch.Tensor) -> torch.Tensor:
        """The backbone's field for ``pair`` (after the gated transfer), computed once per pair tensor."""
        if self._initial is not None and self._initial[0] is pair:
            return self._initial[1]
        moving, fixed = pair[:, :1], pair[:, 1:]
        with torch.no_grad():
            transfer = self.synthesizer is not None and (
                self.gate is None or self.gate(fixed, moving, (self.spacing_mm,) * 3)[0]
            )
            if transfer:
                if self.transfer in ("both", "fixed"):
                    fixed = self.synthesizer(fixed).clamp(0, 1)
                if self.transfer in ("both", "moving"):
                    moving = self.synthesizer(moving).clamp(0, 1)
            field = self.backbone(fixed, moving)
        self.transferred, self._initial = transfer, (pair, field)
        return field

    def forward(self, pair: torch.Tensor) -> list[torch.Tensor]:
        return self.refiner(pair[:, 1:], pair[:, :1], self.initial_field(pair))

    def train(self, mode: bool = True) -> FrozenBackboneAdapter:
        super().train(mode)
        for frozen in (self.backbone, self.synthesizer):
            if frozen is not None:
                frozen.eval()  # frozen parts keep their inference behaviour (normalisation statistics)
        return self

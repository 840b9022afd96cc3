"""A frozen registration backbone adapted to a pair by refiners optimised on it."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from .refiners import ProgressiveRefiner

__all__ = ["FrozenBackboneAdapter"]


class FrozenBackboneAdapter(nn.Module):
    """``[B, 2, X, Y, Z]`` (moving, fixed) -> the fields of each refinement stage, coarse to fine, ``[B, 3, X, Y, Z]``
    each (voxels, pull-back; the last is the result).

    The frozen ``backbone`` ``(fixed, moving) -> ddf`` registers the pair once per input tensor (the per-pair
    optimisation calls this module on the same pair at every step), and ``refiner`` refines its field: only the
    refiner has trainable parameters. Without a backbone the refiners start from the identity (scans of one subject,
    whose small differences a backbone trained on pairs of different subjects would exaggerate). A style transfer,
    when the contrasts differ, happens before, on the pair itself (:class:`~common.engine.GatedStyleTransfer`), so
    that the refiners' similarity sees the transferred pair too.

    The refiners start from the backbone's field or from the identity (``start``; ``starts`` lists those this adapter
    has, so that an optimiser can try both: :class:`~common.engine.MultiStartModel`).

    Args:
        backbone: a mono-modal registration network, frozen here (e.g. :class:`~common.networks.VFA`); None: the
            identity.
        refiner: the per-pair trainable part (:class:`~common.networks.ProgressiveRefiner`).
        start: ``"backbone"`` or ``"identity"`` (the only one without a backbone).
        start_stages: the number of refiner stages run from a start (by name; the others run all), coarsest first:
            e.g. ``{"identity": 2}`` leaves out the full-resolution stage for scans of one anatomy, whose residual
            differences the coarser stages align at a fraction of its cost.
    """

    def __init__(
        self,
        backbone: nn.Module | None,
        refiner: ProgressiveRefiner,
        start: str = "backbone",
        start_stages: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = None if backbone is None else backbone.requires_grad_(False).eval()
        self.refiner = refiner
        self.starts = ("identity",) if backbone is None else ("backbone", "identity")
        self.start = "identity" if backbone is None else start
        self.start_stages = {name: int(n) for name, n in (start_stages or {}).items()}
        unknown = set(self.start_stages) - {"backbone", "identity"}
        if unknown or not all(1 <= n <= len(refiner.scales) for n in self.start_stages.values()):
            raise ValueError(
                f"start_stages maps backbone or identity to 1..{len(refiner.scales)} refiner stages, got {start_stages}."
            )
        self._initial: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def start(self) -> str:
        return self._start

    @start.setter
    def start(self, value: str) -> None:
        if value not in self.starts:
            raise ValueError(f"start must be one of {self.starts}, got {value!r}.")
        self._start = value

    def initial_field(self, pair: torch.Tensor) -> torch.Tensor | None:
        """The field the refiners start from: the backbone's for ``pair`` (computed once per pair tensor), or None
        for the identity."""
        if self.start == "identity":
            return None
        if self._initial is None or self._initial[0] is not pair:
            with torch.no_grad():
                self._initial = (pair, self.backbone(pair[:, 1:], pair[:, :1]))
        return self._initial[1]

    def forward(self, pair: torch.Tensor) -> list[torch.Tensor]:
        return self.refiner(pair[:, 1:], pair[:, :1], self.initial_field(pair), self.start_stages.get(self.start))

    def train(self, mode: bool = True) -> FrozenBackboneAdapter:
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()  # frozen: keeps its inference behaviour (normalisation statistics)
        return self

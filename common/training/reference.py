"""Training targets computed by a registration method: the fields a network learns to predict."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor

from common.engine.protocols import PairRegistration

__all__ = ["ReferenceDisplacementd"]


class ReferenceDisplacementd(MapTransform):
    """Register ``moving_key`` onto ``fixed_key`` with ``registration`` and store its displacement under ``ddf_key``.

    Deterministic, so a :class:`monai.data.PersistentDataset` computes each pair's field once and keeps it on disk:
    an instance optimisation that aligns well but slowly becomes the regression target of a network
    (``EndPointErrorLoss``), as a dense, direct signal where an image similarity alone teaches little.

    Args:
        registration: called as ``registration(fixed [1, 1, X, Y, Z], moving [1, 1, X, Y, Z], spacing)``, returning a
            result whose ``ddf`` ``[1, 3, X, Y, Z]`` is a pull-back displacement in voxels.
        fixed_key, moving_key: the two images ``[1, X, Y, Z]`` on one grid.
        spacing: voxel size of that grid (mm).
        ddf_key: where to store the displacement ``[3, X, Y, Z]`` (voxels), on the images' device.
    """

    def __init__(
        self,
        registration: PairRegistration,
        fixed_key: str = "fixed",
        moving_key: str = "moving",
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        ddf_key: str = "target_ddf",
    ) -> None:
        super().__init__([fixed_key, moving_key])
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive voxel sizes (mm), got {spacing}.")
        self.registration, self.spacing, self.ddf_key = registration, tuple(float(s) for s in spacing), ddf_key
        self.fixed_key, self.moving_key = fixed_key, moving_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        fixed, moving = (convert_to_tensor(d[k], track_meta=False) for k in (self.fixed_key, self.moving_key))
        if fixed.shape != moving.shape:
            raise ValueError(
                f"{self.fixed_key} {tuple(fixed.shape)} and {self.moving_key} {tuple(moving.shape)} differ."
            )
        result = self.registration(fixed[None].float(), moving[None].float(), self.spacing)
        d[self.ddf_key] = result.ddf[0].detach().to(fixed.device)
        return d

"""Random smooth diffeomorphic deformations of images and label maps (synthetic registration pairs)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_tensor, ensure_tuple_rep

from common.spatial.fields import resize_ddf, scaling_and_squaring, warp

__all__ = ["ComposeDisplacementd", "RandDiffeomorphicWarpd", "random_velocity"]


def random_velocity(
    shape: Sequence[int], noise: torch.Tensor, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A smooth stationary velocity field ``[1, 3, *shape]`` (voxels) from control-point ``noise`` ``[3, *grid]``,
    upsampled trilinearly with the two grids matched corner to corner."""
    control = noise.to(device=device, dtype=dtype)[None]
    return F.interpolate(control, size=tuple(shape), mode="trilinear", align_corners=True)


class RandDiffeomorphicWarpd(RandomizableTransform, MapTransform):
    """With probability ``prob``, warp all ``keys`` by one random smooth diffeomorphism.

    The velocity field has independent Gaussian components (std ``velocity_std`` voxels) at control points every
    ``control_spacing`` voxels, interpolated trilinearly; it is integrated by scaling and squaring on a grid
    ``integration_downsample`` times coarser than the image (the field is smooth, and this is most of the cost), and
    the displacement resampled onto the image grid. Every key is warped by the same pull-back displacement
    ``u``: ``out(x) = in(x + u(x))``. Tensors stay on their device; label maps keep their dtype.

    Args:
        keys: channel-first arrays ``[C, X, Y, Z]`` on one grid.
        mode: interpolation per key: ``"bilinear"`` for images, ``"nearest"`` for label maps.
        prob: probability of deforming; otherwise the data pass unchanged (and ``ddf_key`` gets zeros).
        velocity_std: standard deviation of the velocity at the control points, in voxels.
        control_spacing: voxels between control points.
        num_steps: squarings (the velocity is scaled by ``2**-num_steps``).
        integration_downsample: integer factor between the image grid and the integration grid.
        ddf_key: key under which to store the displacement ``[3, X, Y, Z]`` (voxels), or None.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: str | Sequence[str] = "bilinear",
        prob: float = 1.0,
        velocity_std: float = 2.0,
        control_spacing: float = 16.0,
        num_steps: int = 7,
        integration_downsample: int = 2,
        ddf_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.velocity_std, self.control_spacing = velocity_std, control_spacing
        self.num_steps, self.integration_downsample, self.ddf_key = num_steps, integration_downsample, ddf_key
        self.noise: torch.Tensor | None = None

    def randomize(self, shape: Sequence[int]) -> None:  # type: ignore[override]
        super().randomize(None)
        if self._do_transform:
            grid = [max(2, round(s / self.control_spacing) + 1) for s in shape]
            # drawn on the CPU from the transform's own generator: the same seed gives the same field on any device
            self.noise = torch.as_tensor(self.R.normal(0.0, self.velocity_std, size=(3, *grid)), dtype=torch.float32)

    def displacement(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The last drawn displacement ``[1, 3, *shape]`` (voxels), zero when the draw skipped the deformation."""
        if not self._do_transform or self.noise is None:
            return torch.zeros(1, 3, *shape, device=device, dtype=dtype)
        coarse = [max(2, -(-s // self.integration_downsample)) for s in shape]
        scale = torch.tensor([(c - 1) / max(s - 1, 1) for c, s in zip(coarse, shape)], device=device, dtype=dtype)
        velocity = random_velocity(coarse, self.noise, device, dtype) * scale.view(1, 3, 1, 1, 1)
        return resize_ddf(scaling_and_squaring(velocity, self.num_steps), shape)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        first = convert_to_tensor(d[keys[0]], track_meta=False)
        shape = tuple(first.shape[1:])
        self.randomize(shape)
        ddf = self.displacement(shape, first.device, first.dtype if first.is_floating_point() else torch.float32)
        for key, mode in self.key_iterator(d, self.mode):
            image = convert_to_tensor(d[key], track_meta=False)
            if tuple(image.shape[1:]) != shape:
                raise ValueError(f"{key} has shape {tuple(image.shape[1:])}, not the first key's {shape}.")
            if self._do_transform:
                moved = warp(image[None].to(ddf.dtype), ddf, mode=mode)[0]
                image = moved.round().to(image.dtype) if not image.is_floating_point() else moved.to(image.dtype)
            d[key] = image
        if self.ddf_key is not None:
            d[self.ddf_key] = ddf[0]
        return d


class ComposeDisplacementd(MapTransform):
    """Re-express fields after the grid they live on was itself deformed: each key's displacement ``v`` becomes
    ``u + v(x + u)``, the displacement of ``x -> phi_v(phi_u(x))``, where ``u`` is ``ddf_key``'s.

    Used when the fixed image of a pair with a known field ``v`` (fixed -> moving) is warped once more by ``u``
    (:class:`RandDiffeomorphicWarpd` with its ``ddf_key``): the composed field maps the warped fixed image's points to
    the moving image. All fields are pull-back displacements ``[3, X, Y, Z]`` in voxels on one grid.

    Args:
        keys: the displacements to re-express.
        ddf_key: the displacement the grid was deformed by.
    """

    def __init__(self, keys: KeysCollection, ddf_key: str, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ddf_key = ddf_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        first = convert_to_tensor(d[self.ddf_key], track_meta=False)
        for key in keys:
            then = convert_to_tensor(d[key], track_meta=False).to(device=first.device, dtype=first.dtype)
            if then.shape != first.shape:
                raise ValueError(f"{key} has shape {tuple(then.shape)}, {self.ddf_key} {tuple(first.shape)}.")
            d[key] = first + warp(then[None], first[None])[0]
        return d

"""Fourier-domain smoothing by the RKHS operator ``K = (-alpha * Laplacian + gamma) ** -s``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def laplacian_eigenvalues(n: int, boundary: str, device: torch.device | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Eigenvalues of the negative 1D discrete Laplacian ``-(f[i-1] - 2 f[i] + f[i+1])`` on ``n`` points.

    ``"dirichlet"`` (zero beyond both ends, sine basis): ``2 - 2 cos(pi k / (n + 1))``, ``k = 1..n``.
    ``"periodic"`` (Fourier basis): ``2 - 2 cos(2 pi k / n)``, ``k = 0..n-1``.
    """
    if boundary == "dirichlet":
        k = torch.arange(1, n + 1, device=device, dtype=dtype)
        return 2 - 2 * torch.cos(torch.pi * k / (n + 1))
    if boundary == "periodic":
        k = torch.arange(n, device=device, dtype=dtype)
        return 2 - 2 * torch.cos(2 * torch.pi * k / n)
    raise ValueError(f"boundary must be 'dirichlet' or 'periodic', got {boundary!r}.")


class RKHSSmoother(nn.Module):
    """Apply ``K = (-alpha * Laplacian + gamma) ** -s`` to each channel of a field, in the frequency domain.

    With ``boundary="dirichlet"`` the field is taken to vanish just outside the grid, which makes ``K`` self-adjoint
    on the grid (the setting of the Neural ODE paper); it is applied exactly through an odd extension of the field
    to twice its size plus two, whose discrete Fourier transform holds only sine modes. ``"periodic"`` wraps around
    and needs no extension (cheaper, but displacements leak across opposite borders).

    The operator's gain at zero frequency is ``gamma ** -s``; with the default ``gamma = 1`` a constant field is kept.

    Args:
        alpha: weight of the Laplacian (``voxel**2``); larger means smoother.
        gamma: weight of the identity.
        s: power of the operator; larger means a faster roll-off of high frequencies.
        boundary: ``"dirichlet"`` or ``"periodic"``.
    """

    def __init__(self, alpha: float = 1.0, gamma: float = 1.0, s: float = 2.0, boundary: str = "dirichlet") -> None:
        super().__init__()
        if alpha < 0 or gamma <= 0 or s < 0:
            raise ValueError(f"need alpha >= 0, gamma > 0, s >= 0; got {alpha}, {gamma}, {s}.")
        if boundary not in ("dirichlet", "periodic"):
            raise ValueError(f"boundary must be 'dirichlet' or 'periodic', got {boundary!r}.")
        self.alpha, self.gamma, self.s, self.boundary = float(alpha), float(gamma), float(s), boundary
        self._cache: dict[tuple, torch.Tensor] = {}

    def _multiplier(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Symbol of ``K`` on the rfft grid of ``shape`` (the extended shape for Dirichlet)."""
        key = (tuple(shape), device, dtype)
        if key not in self._cache:
            lam = 0
            for axis, n in enumerate(shape):
                ev = laplacian_eigenvalues(n, "periodic", device=device)
                if axis == len(shape) - 1:
                    ev = ev[: n // 2 + 1]
                lam = lam + ev.view(*([1] * axis), -1, *([1] * (len(shape) - axis - 1)))
            self._cache[key] = ((self.alpha * lam + self.gamma) ** (-self.s)).to(dtype)
        return self._cache[key]

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        """Smooth ``field`` ``[B, C, *S]`` over its spatial dimensions; returns the same shape, dtype and device."""
        dims = tuple(range(2, field.ndim))
        spatial = field.shape[2:]
        x = field.to(torch.promote_types(field.dtype, torch.float32))
        if self.boundary == "dirichlet":
            for d in dims:
                zero = torch.zeros_like(x.narrow(d, 0, 1))
                x = torch.cat([zero, x, zero, -x.flip(d)], dim=d)
        spectrum = torch.fft.rfftn(x, dim=dims)
        spectrum = spectrum * self._multiplier(x.shape[2:], x.device, x.dtype)
        out = torch.fft.irfftn(spectrum, s=x.shape[2:], dim=dims)
        if self.boundary == "dirichlet":
            for d, n in zip(dims, spatial):
                out = out.narrow(d, 1, n)
        return out.to(field.dtype)

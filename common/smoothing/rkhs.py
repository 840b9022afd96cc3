"""Smoothing by the RKHS operator ``K = (-alpha * Laplacian + gamma) ** -s``, applied in its eigenbasis."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn


def laplacian_eigenvalues(
    n: int, boundary: str, device: torch.device | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
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


def sine_basis(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal, symmetric DST-I matrix ``[n, n]``: the eigenvectors of the Dirichlet Laplacian on ``n`` points."""
    k = torch.arange(1, n + 1, device=device, dtype=torch.float64)
    basis = math.sqrt(2 / (n + 1)) * torch.sin(torch.pi * k[:, None] * k[None, :] / (n + 1))
    return basis.to(dtype)


class RKHSSmoother(nn.Module):
    """Apply ``K = (-alpha * Laplacian + gamma) ** -s`` to each channel of a field ``[B, C, *S]``.

    The discrete Laplacian is diagonal in a separable basis, so ``K`` is applied exactly as: transform, scale by
    ``(alpha * lambda + gamma) ** -s``, transform back. With ``boundary="dirichlet"`` the field vanishes just outside
    the grid, which makes ``K`` self-adjoint on the grid (the setting of the Neural ODE paper); the basis is the
    sine transform, applied as one small matrix product per axis (on a 80x96x72 grid this is over ten times faster
    than the FFT of the odd extension, which is eight times the volume). ``"periodic"`` wraps around (Fourier
    basis, FFT); displacements then leak across opposite borders.

    The operator's gain at zero frequency is ``gamma ** -s``.

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
        self._cache: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def _operator(
        self, shape: Sequence[int], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The symbol of ``K`` on ``shape`` (its rfft half for periodic) and the per-axis sine bases (Dirichlet)."""
        key = (tuple(shape), device, dtype)
        if key not in self._cache:
            lam: torch.Tensor | int = 0
            for axis, n in enumerate(shape):
                ev = laplacian_eigenvalues(n, self.boundary, device=device)
                if self.boundary == "periodic" and axis == len(shape) - 1:
                    ev = ev[: n // 2 + 1]
                lam = lam + ev.view(*([1] * axis), -1, *([1] * (len(shape) - axis - 1)))
            symbol = ((self.alpha * lam + self.gamma) ** (-self.s)).to(dtype)
            bases = [sine_basis(n, device, dtype) for n in shape] if self.boundary == "dirichlet" else []
            self._cache[key] = (symbol, bases)
        return self._cache[key]

    @staticmethod
    def _transform(x: torch.Tensor, bases: list[torch.Tensor]) -> torch.Tensor:
        """Multiply ``x`` ``[B, C, *S]`` by ``bases[i]`` along spatial axis ``i`` (the symmetric DST is its own inverse)."""
        for i, basis in enumerate(bases):
            x = torch.movedim(torch.movedim(x, 2 + i, -1) @ basis, -1, 2 + i)
        return x

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        """Smooth ``field`` ``[B, C, *S]`` over its spatial dimensions; returns the same shape, dtype and device."""
        x = field.to(torch.promote_types(field.dtype, torch.float32))
        symbol, bases = self._operator(x.shape[2:], x.device, x.dtype)
        if self.boundary == "dirichlet":
            out = self._transform(self._transform(x, bases) * symbol, bases)
        else:
            dims = tuple(range(2, field.ndim))
            out = torch.fft.irfftn(torch.fft.rfftn(x, dim=dims) * symbol, s=x.shape[2:], dim=dims)
        return out.to(field.dtype)

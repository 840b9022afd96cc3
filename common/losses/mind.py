"""MIND-SSC: the modality independent neighbourhood descriptor with a self-similarity context.

For each voxel, the 12 pairs of 6-neighbourhood offsets (at distance ``dilation``) whose squared distance is
``2 * dilation**2`` are compared by the patch distance ``D(p, q) = sum_w (I(x+p+w) - I(x+q+w))**2`` over a
``(2r+1)**3`` window, then ``exp(-(D - min_pq D) / V)`` with ``V`` the mean over the 12 channels clamped to
``[1e-3, 1e3]`` times its global mean (Heinrich et al., MICCAI 2013).

The patch distance of ``(p, q)`` is the patch-summed squared difference image ``S_{p-q}`` shifted by ``q``, and
``p - q`` takes only 6 values up to sign; so each descriptor is 6 squared differences, 6 box sums and 12 shifts,
instead of 12-channel one-hot dilated convolutions (about 4x fewer operations, and no convolution weights).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

# the 12 (p, q) offset pairs of the SSC neighbourhood, as unit offsets along the three axes
_SIX = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
_PAIRS = [(p, q) for i, p in enumerate(_SIX) for q in _SIX[i + 1 :] if sum((a - b) ** 2 for a, b in zip(p, q)) == 2]


def _shift(x: torch.Tensor, offset: tuple[int, int, int], pad: int) -> torch.Tensor:
    """``x`` padded by ``pad`` on each side, viewed at ``index + offset``: ``[B, C, *S]`` of the unpadded shape."""
    s = x.shape[2:]
    return x[
        :,
        :,
        pad + offset[0] : pad + offset[0] + s[0] - 2 * pad,
        pad + offset[1] : pad + offset[1] + s[1] - 2 * pad,
        pad + offset[2] : pad + offset[2] + s[2] - 2 * pad,
    ]


class _ShiftedSquaredDifferences(torch.autograd.Function):
    """``[B, C, *S]`` padded by ``pad`` -> ``[B, len(vectors), *S - 2 pad]``: channel ``i`` is the mean over the ``C``
    channels of ``(x(y + v_i) - x(y))**2``.

    The backward pass adds each term's gradient into one buffer in place. Autograd's own backward of the slices and
    powers allocates and zero-fills a padded copy of the input per slice, which made this step, on a multi-channel
    feature map, the costliest part of a learned descriptor's forward and backward pass on the CPU; this backward
    takes about half that time.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, vectors: list[tuple[int, int, int]], pad: int
    ) -> torch.Tensor:
        inner = _shift(x, (0, 0, 0), pad)
        ctx.save_for_backward(x)
        ctx.vectors, ctx.pad = vectors, pad
        return torch.cat([(_shift(x, v, pad) - inner).square_().mean(1, keepdim=True) for v in vectors], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        grad_x = torch.zeros_like(x)
        inner, grad_inner = _shift(x, (0, 0, 0), ctx.pad), _shift(grad_x, (0, 0, 0), ctx.pad)
        grad = grad * (2.0 / x.shape[1])
        for i, v in enumerate(ctx.vectors):
            term = (_shift(x, v, ctx.pad) - inner).mul_(grad[:, i : i + 1])
            _shift(grad_x, v, ctx.pad).add_(term)
            grad_inner.sub_(term)
        return grad_x, None, None


def _box_sum(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Sum of ``x`` over a ``(2r+1)^3`` window, on the grid shrunk by ``r`` on each side (no padding)."""
    for dim in (2, 3, 4):
        n = x.shape[dim] - 2 * radius
        total = x.narrow(dim, 0, n)
        for k in range(1, 2 * radius + 1):
            total = total + x.narrow(dim, k, n)
        x = total
    return x


class _BoxSum(torch.autograd.Function):
    """:func:`_box_sum` whose backward is its adjoint, the box sum of the gradient padded by ``2 r`` zeros: one
    allocation instead of autograd's zero-filled full-size tensor per slice (nine per call)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, radius: int) -> torch.Tensor:  # type: ignore[override]
        ctx.radius = radius
        return _box_sum(x, radius)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _box_sum(F.pad(grad, [2 * ctx.radius] * 6), ctx.radius), None


def _shifted_channels(x: torch.Tensor, picks: tuple[tuple[int, tuple[int, int, int]], ...], pad: int) -> torch.Tensor:
    """``[B, C, *S]`` -> ``[B, len(picks), *S - 2 pad]``: channel ``i`` is channel ``picks[i][0]`` viewed at
    ``index + picks[i][1]`` (:func:`_shift`)."""
    return torch.cat([_shift(x[:, c : c + 1], offset, pad) for c, offset in picks], dim=1)


@functools.cache
def _offsets(d: int) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, tuple[int, int, int]], ...]]:
    """The 6 difference vectors ``v = p - q`` (up to sign) of the SSC pairs at dilation ``d``, and for each of the 12
    pairs the vector's index and the shift that reads ``D(p, q)(x) = S_{p-q}(x + q)``, or ``S_{q-p}(x + p)``."""
    vectors: list[tuple[int, int, int]] = []
    for p, q in _PAIRS:
        v = tuple(d * (a - b) for a, b in zip(p, q))
        if v not in vectors and tuple(-c for c in v) not in vectors:
            vectors.append(v)
    picks = []
    for p, q in _PAIRS:
        v = tuple(d * (a - b) for a, b in zip(p, q))
        if v in vectors:
            picks.append((vectors.index(v), tuple(d * c for c in q)))
        else:
            picks.append((vectors.index(tuple(-c for c in v)), tuple(d * c for c in p)))
    return tuple(vectors), tuple(picks)


class _ShiftedChannels(torch.autograd.Function):
    """:func:`_shifted_channels` whose backward adds into one zero buffer where autograd would allocate and fill one of
    the input's size per picked channel."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, picks: tuple[tuple[int, tuple[int, int, int]], ...], pad: int
    ) -> torch.Tensor:
        ctx.picks, ctx.pad, ctx.shape = picks, pad, x.shape
        return _shifted_channels(x, picks, pad)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        grad_x = grad.new_zeros(ctx.shape)
        for i, (c, offset) in enumerate(ctx.picks):
            _shift(grad_x[:, c : c + 1], offset, ctx.pad).add_(grad[:, i : i + 1])
        return grad_x, None, None


_CEILING = 1e3  # the local variance's ceiling relative to its mean over the image


def _normalised(
    dist: torch.Tensor, floor: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patch distances ``[B, 12, *S]`` -> ``exp(-(D - min D) / V)`` with ``V`` their mean over the channels,
    clamped to ``[floor, 1e3]`` times its mean over the image and to at least ``eps``; returns the descriptor, the
    shifted distances ``D - min D``, their channel mean and ``-1 / V``."""
    shifted = dist - dist.amin(dim=1, keepdim=True)
    var = shifted.mean(dim=1, keepdim=True)
    mean_var = var.mean(dim=(1, 2, 3, 4), keepdim=True)
    rate = var.clamp(min=mean_var * floor, max=mean_var * _CEILING).clamp_(min=eps).reciprocal_().neg_()
    return (shifted * rate).exp_(), shifted, var, rate


class _Normalisation(torch.autograd.Function):
    """:func:`_normalised` with its backward written out: autograd's chain through the minimum, the mean, the two
    clamps and the exponential allocates a 12-channel tensor per step, which made it the costliest part of the
    descriptor's forward and backward pass on the CPU (this takes about half the time). The gradient is autograd's,
    ties of the minimum sharing theirs evenly as ``amin``'s backward does."""

    @staticmethod
    def forward(ctx, dist: torch.Tensor, floor: float, eps: float) -> torch.Tensor:  # type: ignore[override]
        out, shifted, var, rate = _normalised(dist, floor, eps)
        ctx.save_for_backward(out, shifted, var, rate)
        ctx.floor, ctx.eps = floor, eps
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        out, shifted, var, rate = ctx.saved_tensors
        mean_var = var.mean(dim=(1, 2, 3, 4), keepdim=True)
        low, high = mean_var * ctx.floor, mean_var * _CEILING
        clamped = var.clamp(min=low, max=high)
        # d out / d V = out * shifted / V^2, through the floor eps only where it did not bind
        grad_out = grad * out
        grad_var = torch.linalg.vecdot(grad_out, shifted, dim=1).unsqueeze(1)
        grad_var.mul_(rate.square()).masked_fill_(clamped < ctx.eps, 0.0)
        # the clamp passes the gradient to the channel mean inside its bounds and to the image mean outside them
        grad_mean_var = torch.where(var < low, ctx.floor, torch.where(var > high, _CEILING, 0.0)).mul_(grad_var)
        grad_mean_var = grad_mean_var.sum(dim=(1, 2, 3, 4), keepdim=True).div_(var[0, 0].numel())
        grad_mean = grad_var.masked_fill_((var < low) | (var > high), 0.0).add_(grad_mean_var)
        grad_shifted = grad_out.mul_(rate).add_(grad_mean.div_(shifted.shape[1]))
        # the minimum's gradient, shared by the channels that tie for it
        ties = (shifted == 0).to(grad.dtype)
        share = grad_shifted.sum(dim=1, keepdim=True).div_(ties.sum(dim=1, keepdim=True))
        return grad_shifted.sub_(ties.mul_(share)), None, None


def mind_ssc(
    image: torch.Tensor, radius: int = 1, dilation: int = 2, eps: float = 1e-6, floor: float = 1e-3
) -> torch.Tensor:
    """MIND-SSC descriptor of ``image`` ``[B, C, X, Y, Z]`` -> ``[B, 12, X, Y, Z]`` with values in ``(0, 1]``.

    Args:
        image: intensities (``C = 1``), or a feature map whose patch distances are averaged over its ``C`` channels
            (the self-similarity tokens of a learned descriptor); the descriptor is invariant to the scale and
            offset of the input and nearly so to monotone remaps.
        radius: half width ``r`` of the patch window (voxels).
        dilation: neighbourhood distance ``d`` (voxels).
        eps: absolute floor of the local variance before normalisation.
        floor: floor of the local variance relative to its mean over the image: where the patch distances are
            smaller (flat tissue, where they are mostly noise), the descriptor flattens towards 1 instead of
            turning noise into structure.
    """
    d, r = dilation, radius
    # padded once, so that the patch sums need no padding of their own: slice sums cost about half of a separable
    # convolution with replicate padding, forward and backward, on the CPU
    x = F.pad(image, [2 * d + r] * 6, mode="replicate")
    # S_v(y) = (I(y + v) - I(y))^2 for the 6 difference vectors v = p - q (up to sign), on the grid padded by d + r;
    # D(p, q) is read from them by the shifts in picks
    vectors, picks = _offsets(d)
    # patch sums rather than means: the normalisation below is invariant to their common scale
    eps_of_sums = eps * (2 * r + 1) ** 3
    if torch.jit.is_tracing() or not torch.is_grad_enabled():
        # the same values by plain operations, which TorchScript can record and inference needs no backward of
        inner = _shift(x, (0, 0, 0), d)
        sq = torch.cat([(_shift(x, v, d) - inner).square().mean(1, keepdim=True) for v in vectors], dim=1)
        sq = _box_sum(sq, r)
        return _normalised(_shifted_channels(sq, picks, d), floor, eps_of_sums)[0]
    sq = _BoxSum.apply(_ShiftedSquaredDifferences.apply(x, vectors, d), r)
    return _Normalisation.apply(_ShiftedChannels.apply(sq, picks, d), floor, eps_of_sums)


class MINDSSC(nn.Module):
    """Module form of :func:`mind_ssc`, to plug in as a registration descriptor.

    ``reach`` (``dilation + radius`` voxels) is how far from a voxel the image values its descriptor depends on lie,
    so that the descriptor of a block of voxels can be computed from the block grown by ``reach`` on each side.
    """

    def __init__(self, radius: int = 1, dilation: int = 2, floor: float = 1e-3) -> None:
        super().__init__()
        if not 0 < floor < 1:
            raise ValueError(f"floor is a fraction of the mean local variance in (0, 1), got {floor}.")
        self.radius, self.dilation, self.floor = radius, dilation, floor
        self.reach = dilation + radius

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return mind_ssc(image, self.radius, self.dilation, floor=self.floor)

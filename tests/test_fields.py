"""Spatial tools, the RKHS smoother, MIND-SSC and the regularisers: properties users rely on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.losses import DisplacementSmoothnessLoss, JacobianBarrierLoss, mind_ssc
from common.smoothing import RKHSSmoother, laplacian_eigenvalues
from common.spatial import (
    grid_sample,
    identity_grid,
    invert_ddf,
    jacobian_determinant,
    resize_ddf,
    scaling_and_squaring,
    warp,
)


def _blobs(shape=(24, 26, 22), seed=0) -> torch.Tensor:
    """A smooth random image with structure at several scales, [1, 1, *shape] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *(s // 4 for s in shape), generator=g)
    x = F.interpolate(x, size=shape, mode="trilinear", align_corners=True)
    x = x + 0.3 * F.interpolate(torch.rand(1, 1, *(s // 2 for s in shape), generator=g), size=shape, mode="trilinear")
    return (x - x.min()) / (x.max() - x.min())


def test_jacobian_of_a_linear_map_is_its_determinant():
    a = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.05, 0.0, 1.1]], dtype=torch.float64)
    grid = identity_grid((9, 10, 11), dtype=torch.float64)
    ddf = torch.einsum("ij,j...->i...", a - torch.eye(3, dtype=torch.float64), grid)[None]
    det = jacobian_determinant(ddf)
    assert det.shape == (1, 1, 9, 10, 11)
    assert torch.allclose(det, torch.linalg.det(a).expand_as(det), atol=1e-10)


def test_jacobian_detects_a_fold():
    ddf = torch.zeros(1, 3, 8, 8, 8)
    ddf[0, 0, 4] = -2.5  # slice 4 jumps behind slice 2: the map reverses order along axis 0
    assert (jacobian_determinant(ddf) <= 0).any()


def test_scaling_and_squaring_of_a_constant_field_is_a_translation():
    v = torch.zeros(1, 3, 12, 12, 12)
    v[:, 1] = 1.5
    ddf = scaling_and_squaring(v)
    assert torch.allclose(ddf[:, :, 3:-3, 3:-3, 3:-3], v[:, :, 3:-3, 3:-3, 3:-3], atol=1e-5)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
def test_warp_is_monai_warp(mode, padding_mode):
    from monai.networks.blocks import Warp

    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 2, 9, 7, 5, generator=g, dtype=torch.float64)
    ddf = 3 * torch.randn(2, 3, 9, 7, 5, generator=g, dtype=torch.float64)
    expected = Warp(mode=mode, padding_mode=padding_mode)(image, ddf)
    assert torch.allclose(warp(image, ddf, mode, padding_mode), expected, atol=1e-12)
    with pytest.raises(ValueError, match="ddf"):
        warp(image, ddf[:, :2])


@pytest.mark.parametrize("requires_grad", [False, True])
def test_grid_sample_over_threads_gives_torchs_values_and_gradients(requires_grad):
    """One volume is sampled in as many pieces as threads (PyTorch's CPU kernel would use one): the values, the
    grid's gradient and the volume's must be PyTorch's, for a point count that the threads do not divide."""
    g = torch.Generator().manual_seed(2)
    volume = torch.rand(1, 2, 17, 19, 21, generator=g, dtype=torch.float64, requires_grad=requires_grad)
    grid = (2.4 * torch.rand(1, 17, 19, 21, 3, generator=g, dtype=torch.float64) - 1.2).requires_grad_(True)
    weights = torch.rand(1, 2, 17, 19, 21, generator=g, dtype=torch.float64)
    inputs = [grid, volume] if requires_grad else [grid]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        for padding_mode in ("border", "zeros"):
            ours = grid_sample(volume, grid, padding_mode=padding_mode)
            torchs = F.grid_sample(volume, grid, padding_mode=padding_mode, align_corners=True)
            assert torch.equal(ours, torchs)
            grads = torch.autograd.grad((ours * weights).sum(), inputs)
            expected = torch.autograd.grad((torchs * weights).sum(), inputs)
            for a, b in zip(grads, expected):
                assert torch.allclose(a, b, atol=1e-12)
    finally:
        torch.set_num_threads(threads)


def test_resize_ddf_keeps_physical_displacement():
    ddf = torch.zeros(1, 3, 11, 11, 11)
    ddf[:, 0] = 1.0  # one coarse voxel = (21 - 1) / (11 - 1) = 2 fine voxels
    assert torch.allclose(resize_ddf(ddf, (21, 21, 21))[:, 0], torch.full((1, 21, 21, 21), 2.0))


@pytest.mark.parametrize("boundary", ["dirichlet", "periodic"])
def test_rkhs_smoother_matches_its_definition(boundary):
    """K = (-alpha L + gamma)^-s built as a dense matrix from the discrete Laplacian equals the FFT operator."""
    shape, alpha, gamma, s = (5, 6, 4), 2.0, 1.0, 1.5

    def lap1d(n: int) -> torch.Tensor:
        m = 2 * torch.eye(n, dtype=torch.float64) - torch.diag(torch.ones(n - 1, dtype=torch.float64), 1)
        m = m - torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)
        if boundary == "periodic":
            m[0, -1] -= 1
            m[-1, 0] -= 1
        return m

    eyes = [torch.eye(n, dtype=torch.float64) for n in shape]
    lap = (
        torch.kron(torch.kron(lap1d(shape[0]), eyes[1]), eyes[2])
        + torch.kron(torch.kron(eyes[0], lap1d(shape[1])), eyes[2])
        + torch.kron(torch.kron(eyes[0], eyes[1]), lap1d(shape[2]))
    )
    w, v = torch.linalg.eigh(alpha * lap + gamma * torch.eye(lap.shape[0], dtype=torch.float64))
    kernel = v @ torch.diag(w**-s) @ v.T
    f = torch.randn(2, 3, *shape, dtype=torch.float64)
    expected = (f.reshape(6, -1) @ kernel.T).reshape(f.shape)
    assert torch.allclose(RKHSSmoother(alpha, gamma, s, boundary)(f), expected, atol=1e-10)


def test_laplacian_eigenvalues_are_the_published_ones():
    n = 7
    k = torch.arange(1, n + 1, dtype=torch.float64)
    assert torch.allclose(laplacian_eigenvalues(n, "dirichlet"), 2 - 2 * torch.cos(math.pi * k / (n + 1)))


def test_rkhs_smoother_keeps_device_dtype_and_damps_high_frequencies():
    f = torch.randn(1, 3, 16, 16, 16)
    out = RKHSSmoother(alpha=4.0, s=2.0)(f)
    assert out.dtype == f.dtype and out.device == f.device and out.shape == f.shape
    assert torch.diff(out, dim=2).abs().mean() < 0.2 * torch.diff(f, dim=2).abs().mean()


def test_mind_is_nearly_invariant_to_a_monotone_remap_while_mse_is_not():
    img = _blobs()
    remapped = 0.2 + 3.0 * img**2.0  # monotone, non-linear, new range
    mind_change = F.mse_loss(mind_ssc(img), mind_ssc(remapped))
    mind_shift = F.mse_loss(mind_ssc(img), mind_ssc(torch.roll(img, 2, dims=2)))
    raw_change = F.mse_loss(img, remapped)
    raw_shift = F.mse_loss(img, torch.roll(img, 2, dims=2))
    assert mind_change < 0.25 * mind_shift, (mind_change, mind_shift)
    assert raw_change > 10 * raw_shift, (raw_change, raw_shift)


def test_mind_matches_the_direct_twelve_pair_definition():
    img = _blobs((20, 22, 24))
    r, d = 1, 2
    from common.losses.mind import _PAIRS

    pad = 3 * d
    x = F.pad(img, [pad] * 6, mode="replicate")

    def at(o):
        return x[:, :, pad + o[0] : pad + o[0] + 20, pad + o[1] : pad + o[1] + 22, pad + o[2] : pad + o[2] + 24]

    dist = []
    for p, q in _PAIRS:
        total = 0
        for w in [(a, b, c) for a in range(-r, r + 1) for b in range(-r, r + 1) for c in range(-r, r + 1)]:
            total = total + (at([d * pi + wi for pi, wi in zip(p, w)]) - at([d * qi + wi for qi, wi in zip(q, w)])) ** 2
        dist.append(total / (2 * r + 1) ** 3)
    dist = torch.cat(dist, 1)
    dist = dist - dist.amin(1, keepdim=True)
    var = dist.mean(1, keepdim=True)
    var = var.clamp(var.mean() * 1e-3, var.mean() * 1e3)
    expected = torch.exp(-dist / var)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    assert len(_PAIRS) == 12
    assert torch.allclose(mind_ssc(img, r, d)[inner], expected[inner], atol=1e-6)


def test_mind_gradient_of_a_multichannel_map_is_exact():
    """Its backward pass is written by hand (for speed); check it against finite differences, in double precision,
    on a feature map of several channels as a learned descriptor gives it."""
    g = torch.Generator().manual_seed(3)
    feats = torch.rand(1, 3, 7, 8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(1, 12, 7, 8, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: (mind_ssc(f, 1, 1) * weights).sum(), (feats,))


def test_mind_gradient_is_autograds_where_channels_tie_and_the_variance_is_clamped():
    """The normalisation's backward is written by hand: where the image is flat every channel ties for the minimum
    and the local variance sits at its floor, at a bright spot it is capped by the ceiling; there its gradient must
    still be what autograd gives for the plain formula."""
    g = torch.Generator().manual_seed(4)
    dist = torch.rand(1, 12, 12, 12, 12, generator=g, dtype=torch.float64)
    dist[:, :, :4] = 0.0
    dist[:, :6, 8, 8, 8] = 1e9
    dist.requires_grad_(True)
    weights = torch.rand(1, 12, 12, 12, 12, generator=g, dtype=torch.float64)
    from common.losses.mind import _Normalisation

    shifted = dist - dist.amin(1, keepdim=True)
    var = shifted.mean(1, keepdim=True)
    mean = var.mean()
    assert bool((var < mean * 1e-3).any()) and bool((var > mean * 1e3).any())
    expected = torch.exp(-shifted / var.clamp(mean * 1e-3, mean * 1e3).clamp(min=1e-6))
    ours = _Normalisation.apply(dist, 1e-3, 1e-6)
    assert torch.allclose(ours, expected, atol=1e-12)
    grad, want = (torch.autograd.grad((x * weights).sum(), dist)[0] for x in (ours, expected))
    assert torch.allclose(grad, want, atol=1e-9)


def test_jacobian_barrier_is_zero_for_mild_and_positive_for_strong_compression():
    grid = identity_grid((10, 10, 10))[None]
    mild = -0.3 * grid * torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1, 1)  # det 0.7
    strong = -0.8 * grid * torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1, 1)  # det 0.2
    loss = JacobianBarrierLoss(epsilon=0.5)
    assert loss(mild) == 0
    assert loss(strong) == pytest.approx(0.3**2, rel=1e-4)
    assert DisplacementSmoothnessLoss()(mild) > 0


def test_fixed_point_inverse_undoes_a_smooth_field():
    from .conftest import smooth_field

    ddf = smooth_field((24, 28, 20), amplitude=3.0, seed=2)
    inverse = invert_ddf(ddf)
    inner = (slice(4, -4),) * 3
    residual = (inverse + warp(ddf, inverse)).norm(dim=1)[0][inner]
    assert residual.mean() < 0.01 and residual.max() < 0.1, (residual.mean(), residual.max())

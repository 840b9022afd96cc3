from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from common.metrics import (
    dice_per_label,
    hd95_per_label,
    mean_dict,
    ndv_percent,
    nonpositive_jacobian_percent,
    patchwise_mi_map,
    percentiles,
    tre,
)
from common.visualize import save_qc_figure


def _cube(shape=(24, 20, 20), lo=5, hi=15, label=1) -> torch.Tensor:
    vol = torch.zeros(shape, dtype=torch.int32)
    vol[lo:hi, lo:hi, lo:hi] = label
    return vol


def _identity_index(shape) -> torch.Tensor:
    return torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))


# overlap


def test_dice_identical_disjoint_and_partial():
    ref = _cube()
    ref[18:22, 2:6, 2:6] = 2
    assert dice_per_label(ref, ref) == {1: 1.0, 2: 1.0}

    disjoint = torch.zeros_like(ref)
    disjoint[0:4, 0:4, 0:4] = 1
    assert dice_per_label(disjoint, _cube(), labels=[1]) == {1: 0.0}

    # a 10^3 cube shifted by 2 voxels overlaps on 8 * 10 * 10 voxels: dice = 2 * 800 / 2000
    assert dice_per_label(torch.roll(_cube(), 2, 0), _cube())[1] == pytest.approx(0.8)


def test_default_labels_and_missing_label():
    pred, ref = _cube(), _cube()
    ref[18:22, 2:6, 2:6] = 2  # only in ref: not scored by default
    assert set(dice_per_label(pred, ref)) == {1}
    dice = dice_per_label(pred, ref, labels=[1, 2, 3])
    assert dice[2] == 0.0 and math.isnan(dice[3])
    hd = hd95_per_label(pred, ref, (1.0, 1.0, 1.0), labels=[1, 2])
    assert hd[1] == 0.0 and math.isnan(hd[2])
    assert mean_dict(dice) == pytest.approx(0.5)


def test_hd95_shifted_cube_in_mm():
    ref = _cube()
    pred = torch.roll(ref, 2, 0)
    assert hd95_per_label(pred, ref, (1.5, 0.7, 3.0))[1] == pytest.approx(3.0, abs=1e-4)
    assert hd95_per_label(pred[None].numpy(), ref[None].numpy(), (1.5, 1.5, 1.5))[1] == pytest.approx(3.0, abs=1e-4)


# folding


def test_nonpositive_jacobian_percent():
    det = torch.ones(4, 5, 5)
    det[0, 0, :3] = -0.2
    det[1, 1, :4] = 0.0
    assert nonpositive_jacobian_percent(det) == pytest.approx(7.0)
    mask = torch.zeros(4, 5, 5, dtype=torch.bool)
    mask[0] = True  # 25 voxels, 3 of them folded
    assert nonpositive_jacobian_percent(det[None], mask) == pytest.approx(12.0)


def test_ndv_identity_smooth_and_fold():
    shape = (8, 8, 8)
    assert ndv_percent(torch.zeros(3, *shape)) == 0.0

    grid = _identity_index(shape)
    smooth = 0.3 * torch.sin(grid * 0.7) * torch.cos(grid.flip(0) * 0.5)
    assert ndv_percent(smooth) == 0.0

    # voxels 4 and 5 swap places along axis 0: the cube layer between them is turned inside out
    swap = torch.zeros(3, *shape)
    swap[0, 4], swap[0, 5] = 1.0, -1.0
    assert ndv_percent(swap) == pytest.approx(100.0 / 7.0, rel=1e-5)
    assert ndv_percent(swap, slab=2) == pytest.approx(100.0 / 7.0, rel=1e-5)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[4] = True
    assert ndv_percent(swap, mask) == pytest.approx(100.0, rel=1e-5)

    mirror = torch.zeros(3, *shape)
    mirror[0] = -2.0 * grid[0]  # x -> -x everywhere
    assert ndv_percent(mirror) == pytest.approx(100.0, rel=1e-5)


# landmarks


def _anisotropic_affine() -> torch.Tensor:
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = rot @ torch.diag(torch.tensor([0.8, 1.2, 2.5], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-10.0, 5.0, 30.0])
    return affine


def test_tre_translation():
    affine = _anisotropic_affine()
    shape = (12, 10, 8)
    idx = torch.tensor([[2.0, 3.0, 1.0], [5.5, 4.25, 6.5], [10.0, 0.0, 7.0]], dtype=torch.float64)
    fixed = (affine[:3, :3] @ idx.T).T + affine[:3, 3]
    shift = torch.tensor([3.0, -4.0, 12.0], dtype=torch.float64)
    moving = fixed + shift

    before = tre(fixed, moving, torch.zeros(3, *shape), affine)
    assert torch.allclose(before, torch.full((3,), 13.0, dtype=torch.float64))

    u_vox = torch.linalg.solve(affine[:3, :3], shift).float()
    ddf = u_vox.view(3, 1, 1, 1).expand(3, *shape).clone()
    after = tre(fixed.numpy(), moving.numpy(), ddf, affine.numpy())
    assert torch.allclose(after, torch.zeros(3, dtype=torch.float64), atol=1e-4)


def test_tre_interpolates_a_linear_field_exactly():
    affine = _anisotropic_affine()
    shape = (12, 10, 8)
    grid = _identity_index(shape).double()
    ddf = (0.1 * grid[1] - 0.05 * grid[2] + 0.3).expand(3, *shape) * torch.tensor([1.0, -2.0, 0.5]).view(3, 1, 1, 1)
    idx = torch.tensor([[2.3, 3.7, 1.1], [5.5, 4.25, 6.5]], dtype=torch.float64)
    u = (0.1 * idx[:, 1] - 0.05 * idx[:, 2] + 0.3)[:, None] * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    fixed = (affine[:3, :3] @ idx.T).T + affine[:3, 3]
    moving = (affine[:3, :3] @ (idx + u).T).T + affine[:3, 3]
    assert torch.allclose(tre(fixed, moving, ddf.float(), affine), torch.zeros(2, dtype=torch.float64), atol=1e-4)


# mutual information


def test_patchwise_mi_self_beats_shuffled():
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 24, 24, 24, generator=gen), 3, 1, 1)[0, 0]
    shuffled = image.flatten()[torch.randperm(image.numel(), generator=gen)].view_as(image)

    pmm, mean_self = patchwise_mi_map(image, image)
    assert pmm.shape == (3, 3, 3)
    assert mean_self == pytest.approx(1.0)
    _, mean_shuffled = patchwise_mi_map(image, shuffled)
    assert mean_self > mean_shuffled

    mask = torch.zeros(24, 24, 24, dtype=torch.bool)
    mask[:12] = True  # centres of patches along axis 0 are at 8, 12, 16
    pmm_masked, _ = patchwise_mi_map(image, 1.0 - image**2, mask=mask)
    assert torch.isfinite(pmm_masked[0]).all() and torch.isnan(pmm_masked[1:]).all()


# QC figure


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_qc_figure(tmp_path):
    shape = (20, 16, 12)
    grid = np.indices(shape).astype(np.float32)
    fixed = np.exp(-((grid[0] - 10) ** 2 + (grid[1] - 8) ** 2 + (grid[2] - 6) ** 2) / 30.0)
    jac = 1.0 + 0.5 * np.sin(grid[0])
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # LPS-ordered array axes, anisotropic
    warped = torch.from_numpy(fixed)[None]  # [1, X, Y, Z] tensors are accepted too
    out = save_qc_figure(fixed, fixed**2, warped, jac, (1.0, 1.0, 2.0), tmp_path / "qc.png", "pair", affine=affine)
    assert out == tmp_path / "qc.png"
    width, height = _png_size(out)
    assert width * 3 == height * 5
    assert [p.name for p in tmp_path.iterdir()] == ["qc.png"]


def test_qc_figure_bad_input_leaves_nothing(tmp_path):
    fixed = np.random.rand(10, 10, 10).astype(np.float32)
    with pytest.raises(ValueError):
        save_qc_figure(fixed, fixed, fixed[:-1], fixed, (1.0, 1.0, 1.0), tmp_path / "qc.png")
    assert list(tmp_path.iterdir()) == []


def test_normalized_mutual_information_is_one_for_a_remapped_image_and_near_zero_for_noise():
    from common.metrics import normalized_mutual_information

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 8, (24, 24, 24), generator=g).float()
    assert normalized_mutual_information(a, 7 - a, bins=8) == pytest.approx(1.0)  # inverted contrast, same content
    assert normalized_mutual_information(a, torch.rand(24, 24, 24, generator=g), bins=8) < 0.05


def test_the_plausibility_report_flags_what_users_should_not_trust():
    """No warning for an identity result; a large field that changed nothing in the image (for no similarity gain) and
    a result whose similarity fell are flagged, and the region is the fixed mask when there is one."""
    from common.spatial import jacobian_determinant
    from common.workflow import PlausibilityReportd

    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 24, 24, 24, generator=g) + 0.5
    moving_on_fixed = 2 - fixed + 0.05 * torch.rand(1, 24, 24, 24, generator=g)

    def report(ddf: torch.Tensor, warped: torch.Tensor, **extra) -> dict:
        data = {"fixed": fixed, "moving_on_fixed": moving_on_fixed, "warped": warped, "ddf": ddf, "spacing": (2.0,) * 3}
        data["jacobian"] = jacobian_determinant(ddf)[0, 0]
        return PlausibilityReportd()({**data, **extra})["metrics"]["plausibility"]

    still = report(torch.zeros(1, 3, 24, 24, 24), moving_on_fixed)
    assert still["warnings"] == [] and still["jacobian_percentiles"]["p1"] == pytest.approx(1.0)
    assert still["nmi"]["after"] == pytest.approx(still["nmi"]["before"])
    shifted = report(torch.full((1, 3, 24, 24, 24), 4.0), moving_on_fixed)  # 13.9 mm everywhere, nothing gained
    assert any("large displacements" in w for w in shifted["warnings"])
    worse = report(torch.zeros(1, 3, 24, 24, 24), torch.rand(1, 24, 24, 24, generator=g))
    assert any("similarity fell" in w for w in worse["warnings"])
    masked = report(torch.zeros(1, 3, 24, 24, 24), moving_on_fixed, fixed_mask=torch.ones(1, 24, 24, 24))
    assert masked["region"] == "fixed mask"


def test_percentiles_are_torch_quantiles_found_by_selection():
    torch.manual_seed(0)
    values = torch.randn(3, 40, 50) ** 3
    q = [0.5, 1.0, 50.0, 99.0, 99.5]
    expected = torch.quantile(values.flatten(), torch.tensor(q) / 100)
    assert torch.allclose(percentiles(values, q), expected, rtol=1e-5, atol=1e-6)
    # every n // max_values-th entry, as the statistics of a large image use them
    sub = percentiles(values, q, max_values=1000)
    assert torch.allclose(sub, torch.quantile(values.flatten()[:: values.numel() // 1000], torch.tensor(q) / 100))
    assert percentiles(torch.arange(11), [50.0]).item() == 5.0
    with pytest.raises(ValueError, match="in \\[0, 100\\]"):
        percentiles(values, [0.99, 101.0])

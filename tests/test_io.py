"""Tests of common.io: loading and validation, resampling, landmarks, writers, and the ITK field convention."""

from __future__ import annotations

import json
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from common.io import (
    RegistrationInputError,
    atomic_write,
    check_device_memory,
    check_overlap,
    compose_fixed_to_moving,
    load_affine_itk,
    load_image,
    load_label,
    load_landmarks,
    load_mask,
    resample_to_grid,
    save_csv,
    save_ddf_itk,
    save_image,
    save_json,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def oriented_affine(axes: list[tuple[int, float]], spacing: list[float], centre: list[float], shape) -> np.ndarray:
    """Affine whose array axis ``c`` runs along world axis ``axes[c][0]`` with sign ``axes[c][1]``, centred."""
    affine = np.eye(4)
    for col, (world_axis, sign) in enumerate(axes):
        affine[:3, col] = 0.0
        affine[world_axis, col] = sign * spacing[col]
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


FIXED_SHAPE = (24, 20, 22)
MOVING_SHAPE = (26, 22, 24)
# LIA, anisotropic, non-zero origin
FIXED_AFFINE = oriented_affine([(0, -1), (2, -1), (1, 1)], [1.2, 0.9, 1.5], [5.0, -3.0, 2.0], FIXED_SHAPE)
# PRI, other spacing, shifted centre
MOVING_AFFINE = oriented_affine([(1, -1), (0, 1), (2, -1)], [1.3, 1.4, 1.6], [7.0, -4.5, 3.0], MOVING_SHAPE)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = FIXED_AFFINE) -> Path:
    nib.Nifti1Image(data, affine).to_filename(path)
    return path


def smooth_texture(shape, seed: int) -> np.ndarray:
    """Random texture plus a smooth blob: any axis or sign mistake changes it everywhere."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = 200.0 * np.exp(-2.0 * sum((g - 0.2 * i) ** 2 for i, g in enumerate(grid)))
    return blob + 50.0 * rng.random(shape)


def smooth_field(shape) -> torch.Tensor:
    """A few voxels of smooth, non-trivial displacement ``[3, X, Y, Z]``."""
    g = np.meshgrid(*[np.arange(n) / n for n in shape], indexing="ij")
    u = np.stack(
        [
            2.5 * np.sin(2 * np.pi * g[1] + 0.3) * np.cos(np.pi * g[2]),
            1.8 * np.cos(2 * np.pi * g[0]) * np.sin(np.pi * g[2] + 1.0),
            2.2 * np.sin(np.pi * (g[0] + g[1])) - 0.7,
        ]
    )
    return torch.from_numpy(u.astype(np.float32))


def itk_warp(moving: Path, fixed: Path, ddf: Path) -> np.ndarray:
    """Apply ``ddf`` to ``moving`` with ITK's own resampler, as the bundle contract describes; ``[X, Y, Z]``."""
    field = itk.imread(str(ddf), itk.Vector[itk.F, 3])
    warped = itk.warp_image_filter(
        itk.imread(str(moving), itk.F),
        displacement_field=field,
        output_parameters_from_image=itk.imread(str(fixed), itk.F),
    )
    return itk.array_from_image(warped).transpose(2, 1, 0)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    fixed = write_nifti(tmp_path / "fixed.nii.gz", smooth_texture(FIXED_SHAPE, 0).astype(np.float32))
    moving = write_nifti(tmp_path / "moving.nii.gz", smooth_texture(MOVING_SHAPE, 1).astype(np.int16), MOVING_AFFINE)
    return fixed, moving


def test_itk_applies_saved_field_like_resample_to_grid(pair, tmp_path):
    fixed_path, moving_path = pair
    assert nib.aff2axcodes(FIXED_AFFINE) == ("L", "I", "A") and nib.aff2axcodes(MOVING_AFFINE) == ("P", "R", "I")
    fixed, moving = load_image(fixed_path, "fixed image"), load_image(moving_path, "moving image")
    ddf = smooth_field(FIXED_SHAPE)
    warped = resample_to_grid(moving, moving.affine, fixed.affine, FIXED_SHAPE, ddf=ddf)
    assert warped.shape == (1, *FIXED_SHAPE)
    save_image(warped[0], fixed.affine, tmp_path / "warped.nii.gz")
    save_ddf_itk(ddf, fixed.affine, tmp_path / "ddf.nii.gz")

    ours = nib.load(tmp_path / "warped.nii.gz").get_fdata()
    theirs = itk_warp(moving_path, fixed_path, tmp_path / "ddf.nii.gz")
    value_range = float(moving.max() - moving.min())
    inside = ours != 0
    assert 0.5 < inside.mean() < 1.0  # the test covers both sampled voxels and the zero outside
    # every voxel, edges included: float32 rounding only (about 1e-6 of the range)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5 * value_range)


def test_itk_translation_field_shifts_moving(tmp_path):
    image = smooth_texture(FIXED_SHAPE, 2).astype(np.float32)
    path = write_nifti(tmp_path / "image.nii.gz", image)
    shift = (2, -1, 3)
    ddf = torch.tensor(shift, dtype=torch.float32).view(3, 1, 1, 1).expand(3, *FIXED_SHAPE)
    save_ddf_itk(ddf, FIXED_AFFINE, tmp_path / "ddf.nii.gz")
    field = itk.array_from_image(itk.imread(str(tmp_path / "ddf.nii.gz"), itk.Vector[itk.F, 3]))
    lps = np.diag([-1.0, -1.0, 1.0]) @ FIXED_AFFINE[:3, :3] @ np.asarray(shift, dtype=float)
    np.testing.assert_allclose(field[0, 0, 0], lps, atol=1e-6)  # (-2.4, -2.7, -0.9) mm

    expected = np.zeros_like(image)
    expected[:-2, 1:, :-3] = image[2:, :-1, 3:]
    np.testing.assert_allclose(itk_warp(path, path, tmp_path / "ddf.nii.gz"), expected, atol=1e-4)
    ours = resample_to_grid(torch.from_numpy(image)[None], FIXED_AFFINE, FIXED_AFFINE, FIXED_SHAPE, ddf=ddf)
    np.testing.assert_allclose(ours[0].numpy(), expected, atol=1e-4)


def test_transforms_read_back_as_itk_maps_points(tmp_path):
    """An affine written by ITK itself (a centre of rotation, as ANTs writes) and a field written by us read back as the
    point maps ITK applies, in RAS: ``compose_fixed_to_moving`` gives ``A (x + u(x))`` (antsApplyTransforms' order)."""
    transform = itk.AffineTransform[itk.D, 3].New()
    matrix = np.array([[1.05, 0.1, 0.0], [-0.08, 0.95, 0.02], [0.01, 0.0, 1.1]])
    transform.SetMatrix(itk.matrix_from_array(matrix))
    transform.SetCenter([10.0, -20.0, 5.0])
    transform.SetTranslation([3.0, -4.0, 7.5])
    itk.transformwrite([transform], str(tmp_path / "affine.mat"))
    ras = load_affine_itk(tmp_path / "affine.mat")
    point_ras = np.array([12.0, 30.0, -8.0])
    moved_lps = np.asarray(transform.TransformPoint([-12.0, -30.0, -8.0]))
    np.testing.assert_allclose((ras @ np.append(point_ras, 1))[:3] * [-1, -1, 1], moved_lps, atol=1e-9)

    ddf = smooth_field(FIXED_SHAPE)
    save_ddf_itk(ddf, FIXED_AFFINE, tmp_path / "ddf.nii.gz")
    points, grid = compose_fixed_to_moving(tmp_path / "ddf.nii.gz", tmp_path / "affine.mat")
    np.testing.assert_allclose(grid, FIXED_AFFINE, atol=1e-6)
    voxel = (3, 5, 2)
    field = itk.imread(str(tmp_path / "ddf.nii.gz"), itk.Vector[itk.F, 3])
    on_grid = field.TransformIndexToPhysicalPoint([int(v) for v in voxel])
    by_field = np.asarray(on_grid) + np.asarray(field.GetPixel([int(v) for v in voxel]))
    expected_lps = np.asarray(transform.TransformPoint([float(v) for v in by_field]))
    np.testing.assert_allclose(points[(slice(None), *voxel)] * [-1, -1, 1], expected_lps, atol=1e-4)
    from scipy.io import savemat

    savemat(tmp_path / "other.mat", {"something": np.zeros(3)}, format="4")
    with pytest.raises(RegistrationInputError, match="AffineTransform"):
        load_affine_itk(tmp_path / "other.mat")


def test_resample_through_headers_only(tmp_path):
    image = torch.from_numpy(smooth_texture(FIXED_SHAPE, 3))[None]  # float64
    canonical = nib.as_closest_canonical(nib.Nifti1Image(image[0].numpy(), FIXED_AFFINE))
    # a re-stored (RAS) copy brought back onto the original grid is the original, exactly
    restored = torch.from_numpy(np.ascontiguousarray(canonical.get_fdata()))[None]
    back = resample_to_grid(restored, canonical.affine, FIXED_AFFINE, FIXED_SHAPE)
    assert back.dtype == torch.float64
    torch.testing.assert_close(back, image, rtol=0, atol=1e-9)
    identity = resample_to_grid(image.float(), FIXED_AFFINE, FIXED_AFFINE, FIXED_SHAPE)
    torch.testing.assert_close(identity, image.float(), rtol=0, atol=1e-4)


def test_resample_nearest_keeps_label_values():
    labels = torch.from_numpy(np.random.default_rng(4).choice([0, 3, 17, 1_000_003], size=MOVING_SHAPE))[None]
    labels = labels.to(torch.int32)
    out = resample_to_grid(labels, MOVING_AFFINE, FIXED_AFFINE, FIXED_SHAPE, smooth_field(FIXED_SHAPE), "nearest")
    assert out.dtype == torch.int32 and out.shape == (1, *FIXED_SHAPE)
    assert set(out.unique().tolist()) <= {0, 3, 17, 1_000_003}
    assert len(out.unique()) == 4
    with pytest.raises(ValueError, match="mode"):
        resample_to_grid(labels, MOVING_AFFINE, FIXED_AFFINE, FIXED_SHAPE, mode="bicubic")


def test_load_preserves_geometry_nifti_and_itk_formats(tmp_path):
    data = smooth_texture(FIXED_SHAPE, 5).astype(np.int16)
    nifti = write_nifti(tmp_path / "image.nii.gz", data)
    img = load_image(nifti)
    assert img.shape == (1, *FIXED_SHAPE) and img.dtype == torch.float32 and img.affine.dtype == torch.float64
    assert torch.equal(img.affine, torch.as_tensor(nib.load(nifti).affine))
    assert torch.equal(img[0], torch.from_numpy(data.astype(np.float32)))
    for suffix in (".mha", ".nrrd"):
        other = tmp_path / f"image{suffix}"
        itk.imwrite(itk.imread(str(nifti)), str(other))
        loaded = load_image(other)
        torch.testing.assert_close(loaded.affine, img.affine, rtol=0, atol=1e-5)
        assert torch.equal(loaded.as_tensor(), img.as_tensor())


def test_load_squeezes_trailing_singleton_and_accepts_float_labels(tmp_path):
    data = smooth_texture(FIXED_SHAPE, 6).astype(np.float32)
    img = load_image(write_nifti(tmp_path / "image.nii.gz", data[..., None]))
    assert img.shape == (1, *FIXED_SHAPE)
    labels = np.random.default_rng(6).integers(0, 5, FIXED_SHAPE).astype(np.float32)
    label = load_label(write_nifti(tmp_path / "label.nii.gz", labels[..., None]), img)
    assert label.dtype == torch.int32 and torch.equal(label[0], torch.from_numpy(labels).int())


def expect_error(match: str, fn, *args) -> str:
    with pytest.raises(RegistrationInputError, match=match) as info:
        fn(*args)
    return str(info.value)


def test_bad_images_name_file_and_problem(tmp_path):
    missing = tmp_path / "missing.nii.gz"
    assert "missing.nii.gz" in expect_error("file not found", load_image, missing, "moving image")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not an image at all" * 50)
    assert "moving image" in expect_error("corrupt.nii.gz.*cannot be read", load_image, corrupt, "moving image")
    corrupt_mha = tmp_path / "corrupt.mha"
    corrupt_mha.write_bytes(b"\x00\x01garbage" * 50)
    expect_error("corrupt.mha.*cannot be read", load_image, corrupt_mha)

    volumes = np.random.default_rng(7).random((*FIXED_SHAPE, 2)).astype(np.float32)
    expect_error("four_d.nii.gz.*not a 3D scalar image", load_image, write_nifti(tmp_path / "four_d.nii.gz", volumes))
    expect_error("two_d.nii.gz.*not a 3D", load_image, write_nifti(tmp_path / "two_d.nii.gz", volumes[..., 0, 0]))

    nan = smooth_texture(FIXED_SHAPE, 8)
    nan[1, 2, 3], nan[4, 5, 6], nan[7, 8, 9] = np.nan, np.inf, -np.inf
    expect_error("nan.nii.gz.*3 NaN/Inf", load_image, write_nifti(tmp_path / "nan.nii.gz", nan))
    constant = np.full(FIXED_SHAPE, 7, dtype=np.uint8)
    expect_error("constant.nii.gz.*constant", load_image, write_nifti(tmp_path / "constant.nii.gz", constant))


def test_bad_labels_and_pairs(pair, tmp_path):
    fixed_path, moving_path = pair
    fixed = load_image(fixed_path, "fixed image")
    labels = np.zeros(FIXED_SHAPE, np.int16)
    labels[5:10, 5:10, 5:10] = 2

    other_shape = write_nifti(tmp_path / "shape.nii.gz", labels[:-1])
    message = expect_error("shape.nii.gz.*grid differs from its image", load_label, other_shape, fixed, "fixed label")
    assert "fixed.nii.gz" in message and "(23, 20, 22) vs (24, 20, 22)" in message
    shifted = FIXED_AFFINE.copy()
    shifted[:3, 3] += 0.5
    other_affine = write_nifti(tmp_path / "affine.nii.gz", labels, shifted)
    expect_error("affine.nii.gz.*grid differs.*affine", load_label, other_affine, fixed)
    fractional = write_nifti(tmp_path / "fractional.nii.gz", labels + np.float32(0.5) * (labels > 0))
    expect_error("fractional.nii.gz.*125 non-integer", load_label, fractional, fixed)
    assert load_label(write_nifti(tmp_path / "ok.nii.gz", labels), fixed).sum() == 2 * 125

    check_overlap(fixed, load_image(moving_path))
    far_affine = FIXED_AFFINE.copy()
    far_affine[2, 3] += 200.0
    far = load_image(write_nifti(tmp_path / "far.nii.gz", smooth_texture(FIXED_SHAPE, 9), far_affine))
    message = expect_error("do not overlap in world space", check_overlap, fixed, far)
    assert "fixed.nii.gz" in message and "far.nii.gz" in message and "moving spans" in message


def test_bad_masks_get_clear_errors_and_a_good_one_loads_as_bool(pair, tmp_path):
    fixed = load_image(pair[0], "fixed image")
    mask = np.zeros(FIXED_SHAPE, np.uint8)
    mask[4:12, 4:12, 4:12] = 255
    loaded = load_mask(write_nifti(tmp_path / "mask.nii.gz", mask), fixed, "fixed mask")
    assert loaded.dtype == torch.bool and int(loaded.sum()) == 8**3
    several = write_nifti(tmp_path / "several.nii.gz", mask // 255 * 2 + (np.arange(24)[:, None, None] > 20))
    expect_error("fixed mask.*several.nii.gz.*not binary: it holds 3 values", load_mask, several, fixed, "fixed mask")
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros(FIXED_SHAPE, np.float32))
    expect_error("empty.nii.gz.*(empty|constant)", load_mask, empty, fixed, "fixed mask")
    expect_error("shape.nii.gz.*grid differs", load_mask, write_nifti(tmp_path / "shape.nii.gz", mask[:-2]), fixed)


def test_memory_check():
    check_device_memory((8, 8, 8), "cpu", 1024)
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo: CPU free memory is unknown on this platform")
    message = expect_error("needs about", check_device_memory, (512, 512, 512), "cpu", 10**15, "use a coarser level")
    assert "512x512x512" in message and "on cpu" in message and message.endswith("use a coarser level")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "warped.nii.gz"
    with pytest.raises(RuntimeError), atomic_write(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp != final
        tmp.write_bytes(b"half written")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []

    final.write_bytes(b"old")
    save_image(np.ones((3, 4, 5)), FIXED_AFFINE, final, dtype=np.float32)
    assert [p.name for p in tmp_path.iterdir()] == ["warped.nii.gz"]
    stored = nib.load(final)
    assert stored.get_data_dtype() == np.float32 and np.allclose(stored.affine, FIXED_AFFINE, atol=1e-5)


def test_nifti_gz_at_any_compression_level_is_a_gzip_file_with_the_same_image(tmp_path):
    """Fields are stored undeflated (level 0) for speed: still a ``.nii.gz`` that any reader opens."""
    data = np.random.default_rng(0).normal(size=(16, 12, 8)).astype(np.float32)
    data[:4] = 0  # some background, which deflate shrinks
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    for level in (0, 1):
        save_image(data, affine, tmp_path / f"level{level}.nii.gz", compresslevel=level)
        assert (tmp_path / f"level{level}.nii.gz").read_bytes()[:2] == b"\x1f\x8b"
        image = nib.load(tmp_path / f"level{level}.nii.gz")
        np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), data)
        np.testing.assert_allclose(image.affine, affine)
    assert (tmp_path / "level0.nii.gz").stat().st_size > (tmp_path / "level1.nii.gz").stat().st_size


def test_save_json_and_csv(tmp_path):
    save_json({"dice": np.float32(0.5), "per_label": torch.tensor([1.0, 2.0]), "file": tmp_path}, tmp_path / "m.json")
    expected = {"dice": 0.5, "per_label": [1.0, 2.0], "file": str(tmp_path)}
    assert json.loads((tmp_path / "m.json").read_text()) == expected
    save_csv([{"pair": "a", "dice": 0.5}, {"pair": "b", "tre": 1.25}], tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text().splitlines() == ["pair,dice,tre", "a,0.5,", "b,,1.25"]


def test_landmarks_conventions(tmp_path):
    def write(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text, encoding="utf-8")
        return tmp_path / name

    ras = torch.tensor([[-1.0, -2.0, 3.0], [4.0, 5.5, -6.0]], dtype=torch.float64)
    torch.testing.assert_close(load_landmarks(write("plain.csv", "\ufeff1,2,3\n-4,-5.5,-6\n")), ras)  # LPS by default
    torch.testing.assert_close(load_landmarks(write("lps.csv", "x_LPS,y_LPS,z_LPS\n1,2,3\n\n-4,-5.5,-6\n")), ras)
    torch.testing.assert_close(load_landmarks(write("ras.csv", "x (RAS),y,z\n-1,-2,3\n4,5.5,-6\n")), ras)
    torch.testing.assert_close(load_landmarks(tmp_path / "ras.csv", "RAS"), ras)
    torch.testing.assert_close(load_landmarks(tmp_path / "plain.csv", "ras"), -ras * torch.tensor([1.0, 1.0, -1.0]))

    expect_error("ras.csv.*header says RAS but LPS", load_landmarks, tmp_path / "ras.csv", "LPS")
    expect_error("bad.csv.*row 3 is not three finite numbers", load_landmarks, write("bad.csv", "x,y,z\n1,2,3\n1,2\n"))
    expect_error("nan.csv.*row 1", load_landmarks, write("nan.csv", "1,nan,3\n"))
    expect_error("empty.csv.*no points", load_landmarks, write("empty.csv", "x,y,z\n"))
    expect_error("absent.csv.*not found", load_landmarks, tmp_path / "absent.csv")


def test_real_template_and_atlas():
    template = DATA / "templates" / "spm12" / "canonical_avg152T1.nii.gz"
    atlas = DATA / "templates" / "spm12" / "tpm_labels_Neuromorphometrics.nii.gz"
    if not template.is_file() or not atlas.is_file():
        pytest.skip(f"reference data not found at {DATA} (see the data README); only present on developer machines")
    image = load_image(template)
    assert nib.aff2axcodes(image.affine.numpy()) == ("L", "A", "S")
    assert torch.equal(image.affine, torch.as_tensor(nib.load(template).affine))
    labels = load_label(atlas, load_image(atlas))
    assert labels.dtype == torch.int32 and len(labels.unique()) > 100


def test_nifti_loads_without_itk_and_other_formats_say_what_is_missing(tmp_path):
    """ITK is only needed for NRRD, MHA/MHD and DICOM: a machine without it still reads NIfTI (run in a fresh
    interpreter in which importing itk fails)."""
    import subprocess
    import sys

    from common.sample import sample_pair

    (tmp_path / "image.nrrd").write_bytes(b"NRRD0004\n")
    script = (
        "import sys; sys.modules['itk'] = None\n"
        "from common.io import load_image, RegistrationInputError\n"
        f"print(tuple(load_image({sample_pair()['fixed']!r}).shape))\n"
        f"try:\n    load_image({str(tmp_path / 'image.nrrd')!r})\nexcept RegistrationInputError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(1, 74, 80, 93)" in result.stdout and "read through ITK: pip install itk" in result.stdout

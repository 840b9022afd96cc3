"""Loader fuzzing: whatever file a user passes, the loaders return a valid image or raise the contract's clear error."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.io import RegistrationInputError, load_image, load_label, load_landmarks

EXAMPLES = 150
DTYPES = [np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64, np.complex64]


@st.composite
def nifti_files(draw) -> tuple[bytes, str]:
    """Bytes of a NIfTI file with random shape, type, values and header geometry; or damaged/foreign bytes."""
    kind = draw(st.sampled_from(["nifti", "nifti", "nifti", "truncated", "junk", "text"]))
    if kind == "junk":
        return draw(st.binary(min_size=0, max_size=600)), ".nii.gz"
    if kind == "text":
        return draw(st.text(max_size=200)).encode(), draw(st.sampled_from([".nii", ".nii.gz"]))
    any_shape = st.lists(st.integers(1, 6), min_size=1, max_size=5)
    shape = tuple(draw(st.one_of(st.lists(st.integers(2, 6), min_size=3, max_size=3), any_shape)))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = draw(st.sampled_from(["random", "constant", "integral", "nan", "inf", "huge"]))
    data = rng.normal(0, 100, shape)
    if values == "constant":
        data[...] = 7
    elif values == "integral":
        data = np.round(data)
    elif values in ("nan", "inf") and np.issubdtype(dtype, np.inexact):
        data.flat[rng.integers(data.size)] = np.nan if values == "nan" else np.inf
    elif values == "huge":
        data.flat[rng.integers(data.size)] = 1e300 if np.issubdtype(dtype, np.floating) else np.iinfo(np.int64).max
    if np.issubdtype(dtype, np.integer) and values != "huge":
        info = np.iinfo(dtype)
        data = np.clip(np.nan_to_num(data), info.min, info.max)
    data = data.astype(dtype) if values != "huge" or dtype in (np.float64, np.int64) else data.astype(np.float64)
    geometry = draw(st.sampled_from(["diagonal", "oblique", "zero", "singular", "nan", "no_codes"]))
    affine = np.diag([*rng.uniform(0.3, 3, 3), 1.0])
    if geometry == "oblique":
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        affine[:3, :3] = q * rng.uniform(0.3, 3, 3)
    elif geometry == "zero":
        affine[:3, :3] = 0
    elif geometry == "singular":
        affine[2, :3] = affine[0, :3]
    elif geometry == "nan":
        affine[0, 3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = nib.Nifti1Image(data, None, dtype=data.dtype)
        # the header's sform as drawn, zero, singular or NaN included: nibabel's own constructor would refuse those
        img.header.set_qform(None, code=0)
        img.header.set_sform(affine, code=0 if geometry == "no_codes" else 1)
        content = img.to_bytes()
    if kind == "truncated":
        content = content[: draw(st.integers(0, max(0, len(content) - 1)))]
    compress = draw(st.booleans())
    return (gzip.compress(content) if compress else content), ".nii.gz" if compress else ".nii"


def _assert_valid_image(img: torch.Tensor) -> None:
    assert img.ndim == 4 and img.shape[0] == 1 and min(img.shape[1:]) >= 2
    assert img.dtype == torch.float32 and bool(torch.isfinite(img).all())
    affine = img.affine.to(torch.float64)
    assert bool(torch.isfinite(affine).all()) and abs(float(torch.linalg.det(affine[:3, :3]))) > 1e-12


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=nifti_files())
def test_any_file_loads_as_a_valid_image_or_raises_the_clear_error(case, tmp_path):
    content, suffix = case
    path = tmp_path / f"case{suffix}"
    path.write_bytes(content)
    reference = torch.zeros(1)
    try:
        img = load_image(path, role="moving image")
    except RegistrationInputError as e:
        assert str(path) in str(e)
    else:
        _assert_valid_image(img)
        reference = img
    try:
        label = load_label(path, reference if reference.ndim == 4 else _some_image(tmp_path), role="label map")
    except RegistrationInputError as e:
        assert str(path) in str(e)
    else:
        assert label.dtype == torch.int32 and label.ndim == 4


def _some_image(folder: Path) -> torch.Tensor:
    path = folder / "reference.nii"
    if not path.exists():
        nib.save(nib.Nifti1Image(np.arange(27, dtype=np.float32).reshape(3, 3, 3), np.eye(4)), path)
    return load_image(path)


@pytest.mark.parametrize("case", ["zero", "singular", "complex", "label_overflow"])
def test_values_and_geometry_are_never_silently_changed(case, tmp_path):
    data, affine = np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.eye(4)
    if case == "zero":
        affine[:3, :3] = 0
    elif case == "singular":
        affine[2, :3] = affine[0, :3]
    elif case == "complex":
        data = data + 1j * data
    elif case == "label_overflow":
        data = (np.arange(64, dtype=np.int64) * 2**33).reshape(4, 4, 4)
    img = nib.Nifti1Image(data, None, dtype=data.dtype)
    img.header.set_qform(None, code=0)
    img.header.set_sform(affine, code=1)
    path = tmp_path / "case.nii.gz"
    nib.save(img, path)
    with pytest.raises(RegistrationInputError, match=r"geometry|complex|32-bit"):
        reference = load_image(path)
        load_label(path, reference)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300),
        st.lists(
            st.lists(st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=5)), max_size=4), max_size=6
        ).map(lambda rows: "\n".join(",".join(map(str, r)) for r in rows)),
    )
)
def test_any_landmark_file_loads_as_points_or_raises_the_clear_error(content, tmp_path):
    path = tmp_path / "points.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    try:
        points = load_landmarks(path, role="fixed landmarks")
    except RegistrationInputError as e:
        assert str(path) in str(e)
    else:
        assert points.ndim == 2 and points.shape[1] == 3 and len(points) > 0 and bool(torch.isfinite(points).all())

"""Atomic writers: an output appears under its final name complete, or not at all."""

from __future__ import annotations

import csv
import gzip
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.config import DtypeLike, NdarrayOrTensor, PathLike
from monai.utils import convert_to_numpy

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers infer the format); move it into place on
    success, delete it on failure.

    Example::

        with atomic_write("out/warped.nii.gz") as tmp:  # tmp is out/.warped.tmp-1a2b3c4d.nii.gz
            nib.save(img, tmp)
    """
    final = Path(path)
    suffixes = final.suffixes
    keep = 2 if len(suffixes) > 1 and final.suffix.lower() in _COMPRESSION_SUFFIXES else 1
    suffix = "".join(suffixes[-keep:])
    stem = final.name[: len(final.name) - len(suffix)]
    tmp = final.with_name(f".{stem}.tmp-{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_nifti(
    data: np.ndarray, affine_ras: NdarrayOrTensor, path: PathLike, intent: str | None = None, compresslevel: int = 1
) -> None:
    """Atomically write ``data`` with ``affine_ras`` as both header transforms (so that readers preferring either
    agree), in millimetres, with an optional NIfTI ``intent``; a ``.gz`` file is deflated at ``compresslevel``
    (0: stored, still a gzip file every NIfTI reader opens)."""
    affine = convert_to_numpy(affine_ras, dtype=np.float64)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    if intent is not None:
        img.header.set_intent(intent)
    with atomic_write(path) as tmp:
        if tmp.suffix.lower() == ".gz":
            with gzip.open(tmp, "wb", compresslevel=compresslevel) as f:
                f.write(img.to_bytes())
        else:
            nib.save(img, tmp)


def save_image(
    array: NdarrayOrTensor,
    affine_ras: NdarrayOrTensor,
    path: PathLike,
    dtype: DtypeLike = None,
    compresslevel: int = 1,
) -> None:
    """Write ``array`` ``[X, Y, Z]`` with voxel-to-world ``affine_ras`` (4x4, RAS mm) as NIfTI through NiBabel.

    ``dtype`` casts the data before writing (e.g. ``np.float32``, ``np.int16``); None keeps the array's type.
    ``compresslevel`` applies to ``.gz`` files (0 for float maps such as a Jacobian, which deflate by only 10-20 %).
    """
    data = convert_to_numpy(array, dtype=dtype)
    if data.ndim != 3:
        raise ValueError(f"save_image expects an [X, Y, Z] array, got shape {data.shape}.")
    _save_nifti(data, affine_ras, path, compresslevel=compresslevel)


def save_series(array: NdarrayOrTensor, affine_ras: NdarrayOrTensor, path: PathLike, dtype: DtypeLike = None) -> None:
    """Write a time series ``[T, X, Y, Z]`` as a 4D NIfTI (``X, Y, Z, T``) with voxel-to-world ``affine_ras``."""
    data = convert_to_numpy(array, dtype=dtype)
    if data.ndim != 4:
        raise ValueError(f"save_series expects a [T, X, Y, Z] array, got shape {data.shape}.")
    _save_nifti(np.moveaxis(data, 0, -1), affine_ras, path)


def save_ddf_itk(ddf: NdarrayOrTensor, fixed_affine_ras: NdarrayOrTensor, path: PathLike) -> None:
    """Write a voxel displacement field as ITK/ANTs do: NIfTI vectors in LPS millimetres on the fixed grid.

    The world displacement is ``diag(-1, -1, 1) @ A[:3, :3] @ u`` with ``A`` the fixed RAS affine, so that
    ``itk.warp_image_filter(moving, displacement_field=itk.imread(path, itk.Vector[itk.F, 3]),
    output_parameters_from_image=fixed)`` reproduces :func:`common.io.resample.resample_to_grid` with this ``u``.
    The file is the one ITK's own writer makes (intent ``vector``, array ``[X, Y, Z, 1, 3]`` of float32), written through NiBabel: loading ITK's Python wrapping for one write costs seconds.
    A ``.nii.gz`` is stored uncompressed inside its gzip wrapper: a 1 mm brain field (5 million voxels) would deflate
    by under 10 % in about 2 s.

    Args:
        ddf: ``[3, X, Y, Z]`` displacement in voxels of the fixed grid (channel ``c`` along array axis ``c``).
        fixed_affine_ras: 4x4 voxel-to-world of the fixed image (RAS mm).
        path: output file, ``.nii`` or ``.nii.gz``.
    """
    u = convert_to_numpy(ddf, dtype=np.float64)
    if u.ndim != 4 or u.shape[0] != 3:
        raise ValueError(f"save_ddf_itk expects a [3, X, Y, Z] field, got shape {u.shape}.")
    if not str(path).endswith((".nii", ".nii.gz")):
        raise ValueError(f"save_ddf_itk writes NIfTI (.nii or .nii.gz), got {path}.")
    lps = _RAS_TO_LPS @ convert_to_numpy(fixed_affine_ras, dtype=np.float64)[:3, :3]
    vectors = np.einsum("ij,jxyz->xyzi", lps, u).astype(np.float32)[:, :, :, None, :]
    _save_nifti(vectors, fixed_affine_ras, path, intent="vector", compresslevel=0)


def save_affine_itk(matrix_ras: NdarrayOrTensor, path: PathLike) -> None:
    """Write a world-space affine map as the ITK transform file ANTs writes (``0GenericAffine.mat``): MATLAB v4 with
    ``AffineTransform_double_3_3`` (the LPS matrix row by row, then the translation) and ``fixed`` (its centre, 0).

    Args:
        matrix_ras: 4x4 map of a fixed-image point to the moving image's point, RAS mm (ITK's transforms map fixed
            points to moving ones: ``antsApplyTransforms -t affine.mat`` and ITK's resampler read it as such).
        path: output file, ``.mat``.
    """
    from scipy.io import savemat

    matrix = convert_to_numpy(matrix_ras, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"save_affine_itk expects a 4x4 matrix, got shape {matrix.shape}.")
    if not str(path).endswith(".mat"):
        raise ValueError(f"save_affine_itk writes a .mat file, got {path}.")
    lps = np.eye(4)
    lps[:3, :3] = _RAS_TO_LPS
    converted = lps @ matrix @ lps  # diag(-1, -1, 1, 1) is its own inverse
    parameters = np.concatenate([converted[:3, :3].reshape(-1), converted[:3, 3]])[:, None]
    with atomic_write(Path(path)) as tmp, open(tmp, "wb") as f:
        savemat(f, {"AffineTransform_double_3_3": parameters, "fixed": np.zeros((3, 1))}, format="4")


def _to_builtin(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable.")


def save_json(obj: Any, path: PathLike) -> None:
    """Write ``obj`` as indented JSON; numpy/torch values and paths are converted to plain types."""
    text = json.dumps(obj, indent=2, default=_to_builtin) + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def save_csv(rows: list[dict[str, Any]], path: PathLike) -> None:
    """Write ``rows`` as CSV with a header: the union of their keys in order of first appearance."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)

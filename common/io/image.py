"""Loading and validating 3D images and label maps, and the checks made before registering a pair.

Images are returned as :class:`monai.data.MetaTensor` ``[1, X, Y, Z]`` whose ``.affine`` maps voxel indices to
world RAS millimetres (MONAI's convention); array axes are the file's own index axes, whatever its orientation.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import PathLike
from monai.data import ITKReader, MetaTensor, NibabelReader
from monai.transforms import LoadImage
from monai.utils import optional_import

from .errors import RegistrationInputError, input_error

_NIBABEL_SUFFIXES = (".nii", ".nii.gz")
_, has_itk = optional_import("itk")
_GRID_ATOL = 1e-3
_GB = 1e9
_INT32_RANGE = (-(2**31), 2**31 - 1)


@lru_cache(maxsize=1)
def _loader() -> LoadImage:
    # dtype=None keeps the stored type so that label maps can be checked for integer values before any cast.
    # ITK is needed for NRRD, MHA/MHD and DICOM only: without it NIfTI still loads.
    readers = [ITKReader(), NibabelReader()] if has_itk else [NibabelReader()]
    return LoadImage(reader=readers, image_only=True, ensure_channel_first=True, dtype=None)


def _load_file(path: PathLike, role: str) -> MetaTensor:
    """Read any ITK/NiBabel image file, channels (or frames) first, in its stored dtype; a clear error if it is missing
    or unreadable."""
    file = Path(path)
    if not file.exists():
        raise input_error(role, path, "file not found")
    loader = _loader()
    # NIfTI through NiBabel (MONAI's reference reader for it); NRRD, MHA/MHD and DICOM folders through ITK.
    nifti = file.is_file() and file.name.lower().endswith(_NIBABEL_SUFFIXES)
    if not nifti and not has_itk:
        raise input_error(role, path, "is not NIfTI; NRRD, MHA/MHD and DICOM are read through ITK: pip install itk")
    reader = next(r for r in loader.readers[::-1] if isinstance(r, NibabelReader if nifti else ITKReader))
    try:
        img = loader(file, reader=reader)
    except Exception as e:
        detail = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise input_error(role, path, f"cannot be read as an image ({type(e).__name__}: {detail[:200]})") from e
    if nifti:  # MONAI's reader replaces a singular header matrix: check the one in the file
        _check_geometry(torch.as_tensor(nib.load(file).affine), role, path)
    return img


def _read(path: PathLike, role: str) -> MetaTensor:
    """Read any ITK/NiBabel 3D scalar image as ``[1, X, Y, Z]`` in its stored dtype; validate exists/readable/3D."""
    img = _load_file(path, role)
    data = img.as_tensor()
    while data.ndim > 4 and data.shape[-1] == 1:  # e.g. NIfTI stored as X,Y,Z,1,1
        data = data[..., 0]
    if data.ndim > 4 or data.shape[0] > 1:
        shape = tuple(img.shape)
        raise input_error(role, path, f"is not a 3D scalar image (array shape {shape}, volumes or components first)")
    spatial = tuple(data.shape[1:])
    if len(spatial) != 3 or min(spatial) < 2:
        raise input_error(role, path, f"is not a 3D image (spatial shape {spatial})")
    if data.is_complex():
        raise input_error(role, path, "holds complex values; give the magnitude (or one part) as a real image")
    _check_geometry(img.affine, role, path)
    return MetaTensor(data, meta=img.meta)


def _check_geometry(affine: torch.Tensor, role: str, path: PathLike) -> None:
    """The header's voxel-to-world matrix must be usable as it is: finite and invertible (never replaced by a guess)."""
    matrix = affine.to(torch.float64)[:3, :3]
    if not bool(torch.isfinite(affine).all()) or abs(float(torch.linalg.det(matrix))) < 1e-12:
        raise input_error(
            role,
            path,
            f"header geometry is unusable (voxel-to-world matrix {_format_affine(affine)} is not finite or not "
            "invertible); fix the header (e.g. with nibabel or 3D Slicer) instead of letting a tool guess it",
        )


def load_series(path: PathLike, role: str = "series") -> MetaTensor:
    """Load a 4D time series (NIfTI ``X, Y, Z, T`` or any ITK-readable 4D file) as float32 ``[T, X, Y, Z]`` with a
    float64 RAS ``.affine`` (mm) shared by every frame.

    Raises:
        RegistrationInputError: naming ``role`` and ``path``, if the file is missing or unreadable, is not a series of
            at least two 3D frames, or has NaN/Inf values.
    """
    img = _load_file(path, role)
    if img.ndim != 4 or img.shape[0] < 2 or min(img.shape[1:]) < 2:
        shape = tuple(img.shape)
        raise input_error(role, path, f"is not a 4D series of at least two 3D frames (shape {shape}, frames first)")
    data = img.as_tensor().to(torch.float32)
    bad = _count_nonfinite(data)
    if bad:
        raise input_error(role, path, f"contains {bad} NaN/Inf values")
    return MetaTensor(data, meta=img.meta)


def _count_nonfinite(data: torch.Tensor) -> int:
    return int((~torch.isfinite(data)).sum()) if data.is_floating_point() else 0


def load_image(path: PathLike, role: str = "image") -> MetaTensor:
    """Load a 3D scalar image as float32 ``[1, X, Y, Z]`` with a float64 RAS ``.affine`` (mm).

    Any integer or float type is accepted; NIfTI, NRRD, MHA/MHD and DICOM series folders are read.

    Raises:
        RegistrationInputError: naming ``role`` and ``path``, if the file is missing or unreadable, not one 3D
            volume, has NaN/Inf values, or is constant.
    """
    img = _read(path, role).to(torch.float32)
    bad = _count_nonfinite(img)  # after the cast, so that float64 values beyond float32's range count too
    if bad:
        raise input_error(role, path, f"contains {bad} NaN/Inf values")
    if torch.equal(img.amin(), img.amax()):
        raise input_error(role, path, f"is constant (every voxel is {float(img.flatten()[0]):g})")
    return img


def _format_affine(affine: torch.Tensor) -> str:
    return np.array2string(np.asarray(affine, dtype=np.float64)[:3], precision=3, separator=",").replace("\n", "")


def _check_same_grid(data: MetaTensor, reference: MetaTensor, role: str, path: PathLike) -> None:
    """``data`` must lie on ``reference``'s grid: equal spatial shapes, affines within 1e-3."""
    ref_name = reference.meta.get("filename_or_obj", "reference image")
    same_shape = data.shape[1:] == reference.shape[1:]
    if not same_shape or not torch.allclose(data.affine, reference.affine.to(data.affine), atol=_GRID_ATOL):
        raise input_error(
            role,
            path,
            f"grid differs from its image '{ref_name}' (shape {tuple(data.shape[1:])} vs "
            f"{tuple(reference.shape[1:])}; affine {_format_affine(data.affine)} vs "
            f"{_format_affine(reference.affine)})",
        )


def load_label(path: PathLike, reference: MetaTensor, role: str = "label") -> MetaTensor:
    """Load an integer label map as int32 ``[1, X, Y, Z]`` that must lie on ``reference``'s grid.

    Float storage is accepted when every value is integral. The grid matches when the spatial shapes are equal
    and the affines agree within 1e-3.

    Raises:
        RegistrationInputError: naming ``role`` and ``path``, for the failures of :func:`load_image` other than
            being constant, for non-integer values, and for a grid that differs from ``reference``'s.
    """
    label = _read(path, role)
    bad = _count_nonfinite(label)
    if bad:
        raise input_error(role, path, f"contains {bad} NaN/Inf values")
    if label.is_floating_point():
        fractional = int((label != label.round()).sum())
        if fractional:
            raise input_error(role, path, f"has {fractional} non-integer values; a label map holds integers")
    low, high = float(label.min()), float(label.max())
    if low < _INT32_RANGE[0] or high > _INT32_RANGE[1]:
        raise input_error(
            role, path, f"has labels from {low:.0f} to {high:.0f}, beyond the 32-bit integers written out"
        )
    _check_same_grid(label, reference, role, path)
    return label.to(torch.int32)


def load_mask(path: PathLike, reference: MetaTensor, role: str = "mask") -> MetaTensor:
    """Load a binary mask as bool ``[1, X, Y, Z]`` (True inside) that must lie on ``reference``'s grid.

    Binary means 0 and one other value (1, 255, ... in any integer or float type); the other value is inside.

    Raises:
        RegistrationInputError: naming ``role`` and ``path``, for the failures of :func:`load_image` other than
            being constant, for more than two values, for an empty mask, and for a grid that differs from
            ``reference``'s.
    """
    mask = _read(path, role)
    bad = _count_nonfinite(mask)
    if bad:
        raise input_error(role, path, f"contains {bad} NaN/Inf values")
    values = torch.unique(mask.as_tensor())
    inside = values[values != 0]
    if len(inside) > 1:
        shown = ", ".join(f"{float(v):g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise input_error(
            role, path, f"is not binary: it holds {len(values)} values ({shown}); a mask holds 0 and one other value"
        )
    if len(inside) == 0:
        raise input_error(role, path, "is empty: no voxel is inside the mask")
    _check_same_grid(mask, reference, role, path)
    return mask != 0


def world_bounds(image: MetaTensor) -> torch.Tensor:
    """World RAS box ``[2, 3]`` (min row, max row; mm) of the voxels' extent ``[-0.5, N - 0.5]`` on every axis."""
    affine = image.affine.to(torch.float64).cpu()
    extent = [(-0.5, n - 0.5) for n in image.shape[1:]]
    corners = [[x, y, z, 1.0] for x in extent[0] for y in extent[1] for z in extent[2]]
    world = (torch.tensor(corners, dtype=torch.float64) @ affine.T)[:, :3]
    return torch.stack([world.amin(0), world.amax(0)])


def _format_bounds(bounds: torch.Tensor) -> str:
    return "x".join(f"[{lo:.1f}, {hi:.1f}]" for lo, hi in bounds.T.tolist()) + " mm RAS"


def check_overlap(fixed: MetaTensor, moving: MetaTensor) -> None:
    """Raise RegistrationInputError unless the world boxes of ``fixed`` and ``moving`` intersect."""
    bf, bm = world_bounds(fixed), world_bounds(moving)
    if bool((torch.maximum(bf[0], bm[0]) < torch.minimum(bf[1], bm[1])).all()):
        return
    name_f = fixed.meta.get("filename_or_obj", "")
    name_m = moving.meta.get("filename_or_obj", "")
    raise RegistrationInputError(
        f"fixed '{name_f}' and moving '{name_m}' do not overlap in world space "
        f"(fixed spans {_format_bounds(bf)}, moving spans {_format_bounds(bm)})"
    )


def available_memory_bytes(device: str | torch.device) -> int | None:
    """Free memory on ``device`` in bytes: CUDA's free memory, or MemAvailable on a Linux CPU; else None."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    meminfo = Path("/proc/meminfo")
    if dev.type != "cpu" or not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


def check_device_memory(
    shape: Sequence[int],
    device: str | torch.device,
    bytes_needed: int,
    hint: str = "run with --device cpu or set a coarser level",
) -> None:
    """Raise RegistrationInputError if ``bytes_needed`` exceeds the free memory of ``device``.

    Nothing is checked where the free memory is unknown (a CPU without ``/proc/meminfo``, other devices).

    Args:
        shape: spatial shape of the grid, for the message.
        device: where the work runs, e.g. ``"cuda:0"`` or ``"cpu"``.
        bytes_needed: the estimate, e.g. bytes per voxel times the number of voxels.
        hint: what the user can do about it, appended to the message.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    free = available_memory_bytes(dev)
    if free is None or bytes_needed <= free:
        return
    raise RegistrationInputError(
        f"a {'x'.join(str(int(s)) for s in shape)} grid needs about {bytes_needed / _GB:.1f} GB on {dev} "
        f"but only {free / _GB:.1f} GB is free; {hint}"
    )

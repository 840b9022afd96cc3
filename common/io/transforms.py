"""Reading the transforms the collection writes, and ANTs and ITK write: displacement fields and affine maps in ITK's
convention (LPS millimetres), returned in RAS millimetres like every other world quantity of the collection."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from monai.config import PathLike

from .errors import input_error

__all__ = ["compose_fixed_to_moving", "load_affine_itk", "load_ddf_itk"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def load_affine_itk(path: PathLike) -> np.ndarray:
    """The 4x4 map of a fixed-image point to the moving image's point (RAS mm) stored in an ITK transform file
    (MATLAB ``.mat`` as ANTs writes ``0GenericAffine.mat``, or as :func:`~common.io.save_affine_itk` writes).

    ITK's ``MatrixOffsetTransformBase`` maps ``x`` to ``M (x - c) + t + c`` with ``c`` the ``fixed`` centre, in LPS.
    """
    from scipy.io import loadmat

    try:
        content = loadmat(str(path))
    except (OSError, ValueError) as error:
        raise input_error("affine", path, f"is not a readable ITK transform file ({error})") from None
    key = next((k for k in content if k.startswith("AffineTransform_")), None)
    if key is None:
        raise input_error("affine", path, "holds no AffineTransform_* parameters")
    parameters = np.asarray(content[key], dtype=np.float64).reshape(-1)
    if parameters.size != 12:
        raise input_error("affine", path, f"holds {parameters.size} parameters, a 3D affine has 12")
    matrix, translation = parameters[:9].reshape(3, 3), parameters[9:]
    centre = np.asarray(content.get("fixed", np.zeros(3)), dtype=np.float64).reshape(-1)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def load_ddf_itk(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A displacement field in ITK's convention (NIfTI vectors, LPS mm, as :func:`~common.io.save_ddf_itk`, ANTs and
    ITK write it) as ``(displacement [3, X, Y, Z] in RAS mm, the grid's 4x4 RAS affine)``."""
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float64)
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim != 4 or data.shape[-1] != 3:
        raise input_error("displacement field", path, f"is not a 3D vector image (array shape {image.shape})")
    return np.einsum("ij,xyzj->ixyz", _RAS_TO_LPS, data), image.affine


def compose_fixed_to_moving(ddf_path: PathLike, affine_path: PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Where each voxel of a displacement field's grid lands in the moving image, ``A (x + u(x))`` in RAS mm, with
    ``A`` the affine map of ``affine_path`` when given (ANTs' order: ``antsApplyTransforms -t ddf -t affine``).

    Returns:
        ``(points [3, X, Y, Z] in RAS mm, the grid's 4x4 RAS affine)``.
    """
    displacement, grid = load_ddf_itk(ddf_path)
    voxels = np.indices(displacement.shape[1:], dtype=np.float64)
    points = np.einsum("ij,j...->i...", grid[:3, :3], voxels) + grid[:3, 3, None, None, None] + displacement
    if affine_path is not None:
        matrix = load_affine_itk(affine_path)
        points = np.einsum("ij,j...->i...", matrix[:3, :3], points) + matrix[:3, 3, None, None, None]
    return points, grid

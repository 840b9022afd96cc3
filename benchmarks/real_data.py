"""Pairs of real scans with a known answer: the SPM12 T1, T2 and PD templates, the FLAIR and CT templates (one MNI
space, real contrasts), labelled by the Neuromorphometrics atlas of the same space.

Two datasets:

    real_known     each non-T1 template moved by a known smooth deformation and "acquired" differently from the fixed
                   T1 template (thick slices along one axis, a bias field, noise; half of them on the atlas's 1.5 mm
                   grid instead of the templates' 2 mm): registration should recover the deformation.
    real_identity  the same acquisitions without any deformation: the answer is the identity, so every change a
                   method makes (Dice below the unregistered 1.0, volume change) is its error.

The moving label map is the atlas carried by the same deformation; the deformation itself is kept beside the pair
(``known_field_mm.nii.gz``: the moving image at world point ``w`` shows the anatomy at ``w + u(w)``, mm, RAS).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import map_coordinates, uniform_filter1d, zoom

from benchmarks.make_sample import save_nifti

__all__ = [
    "NEUROMORPHOMETRICS_GROUPS",
    "REAL_CASES",
    "acquire",
    "known_field",
    "real_pair_files",
    "world_grid",
    "world_to_voxel",
]

SPM = Path("templates") / "spm12"
FIXED_T1 = SPM / "canonical_avg152T1.nii.gz"
ATLAS = SPM / "tpm_labels_Neuromorphometrics.nii.gz"
# moving image of each case and the grid it is acquired on ("template": 2 mm, "atlas": 1.5 mm)
REAL_CASES: dict[str, tuple[Path, str]] = {
    "t2": (SPM / "canonical_avg152T2.nii.gz", "template"),
    "pd": (SPM / "canonical_avg152PD.nii.gz", "atlas"),
    "flair": (Path("clinical") / "GG-366-FLAIR-2.0mm-8mmFWHM.nii.gz", "atlas"),
    "ct": (Path("clinical") / "scct_stripped.nii.gz", "template"),
}
# Neuromorphometrics label values (the atlas's own xml) grouped like the rendered sets' FreeSurfer structures; every
# value from 100 up is a cortical region
NEUROMORPHOMETRICS_GROUPS: dict[str, tuple[int, ...]] = {
    "cortex": tuple(range(100, 208)),
    "white_matter": (44, 45),
    "subcortical_gm": (23, 30, 31, 32, 36, 37, 47, 48, 55, 56, 57, 58, 59, 60, 61, 62, 75, 76),
    "ventricles_csf": (4, 11, 46, 49, 50, 51, 52),
    "cerebellum": (38, 39, 40, 41, 71, 72, 73),
    "brainstem": (35,),
}


def known_field(shape: tuple[int, ...], rng: np.random.Generator, max_mm: float = 5.0) -> np.ndarray:
    """A smooth random displacement ``[3, *shape]`` in mm (world axes), largest magnitude ``max_mm``: cubic
    interpolation of normal values on a 5x5x5 control grid (about 4 cm apart), so that it stays invertible."""
    coarse = rng.normal(size=(3, 5, 5, 5))
    field = np.stack([zoom(c, np.array(shape) / 5, order=3)[tuple(slice(0, s) for s in shape)] for c in coarse])
    return field * (max_mm / np.linalg.norm(field, axis=0).max())


def acquire(image: np.ndarray, rng: np.random.Generator, slice_factor: int = 3) -> np.ndarray:
    """``image`` as another scanner would give it: thick slices (a box profile of ``slice_factor`` voxels along one
    random axis, one sample per slice, linearly interpolated back), a smooth multiplicative bias (about ±20 %) and
    Rician noise (2 % of the 99th percentile)."""
    axis = int(rng.integers(3))
    n = image.shape[axis]
    profile = uniform_filter1d(image, size=slice_factor, axis=axis, mode="nearest")
    slices = np.take(profile, np.arange(slice_factor // 2, n, slice_factor), axis=axis)
    coords = list(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in image.shape], indexing="ij"))
    coords[axis] = (coords[axis] - slice_factor // 2) / slice_factor
    thick = map_coordinates(slices, coords, order=1, mode="nearest")
    bias = zoom(rng.normal(scale=0.1, size=(3, 3, 3)), np.array(image.shape) / 3, order=3)
    thick = thick * np.exp(bias[tuple(slice(0, s) for s in image.shape)])
    scale = 0.02 * np.percentile(thick, 99)
    noisy = np.hypot(thick + rng.normal(scale=scale, size=thick.shape), rng.normal(scale=scale, size=thick.shape))
    return noisy.astype(np.float32)


def world_to_voxel(affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Voxel coordinates ``[3, ...]`` of world points ``[3, ...]`` (mm) in the grid of ``affine``."""
    inverse = np.linalg.inv(affine)
    return np.tensordot(inverse[:3, :3], world, axes=1) + inverse[:3, 3].reshape(3, *([1] * (world.ndim - 1)))


def world_grid(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates ``[3, *shape]`` (mm) of every voxel of the grid ``affine``, ``shape``."""
    voxels = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return np.tensordot(affine[:3, :3], voxels, axes=1) + affine[:3, 3].reshape(3, 1, 1, 1)


def real_pair_files(data_dir: Path, folder: Path, case: str, seed: int, deformed: bool) -> dict[str, Path]:
    """Write (once) the fixed T1 template and its atlas labels, and the ``case`` template moved by a known field
    (``deformed``; else the identity) and acquired differently, with the atlas carried along, into ``folder``."""
    files = {key: folder / f"{key}.nii.gz" for key in ("fixed", "moving", "fixed_label", "moving_label")}
    files["known_field"] = folder / "known_field_mm.nii.gz"
    if all(path.exists() for path in files.values()):
        return files
    fixed, atlas = nib.load(str(data_dir / FIXED_T1)), nib.load(str(data_dir / ATLAS))
    source_path, grid = REAL_CASES[case]
    source = nib.load(str(data_dir / source_path))
    target = source if grid == "template" else atlas
    shape, affine = target.shape[:3], target.affine
    rng = np.random.default_rng([seed, list(REAL_CASES).index(case), int(deformed)])
    field = known_field(shape, rng) if deformed else np.zeros((3, *shape))
    moved = world_grid(affine, shape) + field
    image = map_coordinates(
        np.asanyarray(source.dataobj).astype(np.float32), world_to_voxel(source.affine, moved), order=1, cval=0
    )
    labels = np.rint(np.asanyarray(atlas.dataobj)).astype(np.int16)
    moving_label = map_coordinates(labels, world_to_voxel(atlas.affine, moved), order=0, cval=0)
    fixed_grid = world_to_voxel(atlas.affine, world_grid(fixed.affine, fixed.shape[:3]))
    save_nifti(np.asanyarray(fixed.dataobj).astype(np.float32), fixed.affine, files["fixed"])
    save_nifti(map_coordinates(labels, fixed_grid, order=0, cval=0), fixed.affine, files["fixed_label"])
    save_nifti(acquire(np.clip(image, 0, None), rng), affine, files["moving"])
    save_nifti(moving_label.astype(np.int16), affine, files["moving_label"])
    save_nifti(np.moveaxis(field, 0, -1).astype(np.float32), affine, files["known_field"])
    return files

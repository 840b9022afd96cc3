"""Pairs of real scans with a known answer: the SPM12 T1, T2 and PD templates (averages of the same 152 subjects in one
MNI space, so one anatomy in three real contrasts), labelled by the Neuromorphometrics atlas of that space.

Two datasets:

    real_known     the T2 and PD templates moved by a known smooth deformation and "acquired" differently from the fixed
                   T1 template (thick slices along one axis, a bias field, noise; PD on the atlas's 1.5 mm grid instead
                   of the templates' 2 mm): registration should recover the deformation.
    real_identity  the same acquisitions without any deformation: the answer is the identity, so every change a
                   method makes (Dice below the unregistered 1.0, volume change) is its error.

One case, ``t2_lesion``, is the T2 template with a real stroke lesion in it, present in the moving image only: the
lesion mask drawn on a patient's T2 scan (``clinical/``), placed into the template's space by matching the patient's
head to the atlas's brain (centre and spread along each axis), and filled with the patient's own lesion contrast (its
T2 intensity relative to the tissue around the lesion), so that the fixed T1 template has nothing that corresponds.

The FLAIR and CT templates of ``clinical/`` are left out: they average other people, normalised to MNI space, so their
anatomy is not the T1 template's. Every method (ConvexAdam, which halves the error on the T2 and PD cases, included)
moved them 2.5 to 4 mm away from the identity inside the brain, the same way, while the CT template's own tissue maps
overlapped the atlas's no worse after than before: the identity is not their answer.

The moving label map is the atlas carried by the same deformation; the deformation itself is kept beside the pair
(``known_field_mm.nii.gz``: the moving image at world point ``w`` shows the anatomy at ``w + u(w)``, mm, RAS), and
:func:`true_fixed_to_moving` turns it into the answer a registration should give.
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
    "field_error_mm",
    "implant_lesion",
    "known_field",
    "real_pair_files",
    "true_fixed_to_moving",
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
    "t2_lesion": (SPM / "canonical_avg152T2.nii.gz", "template"),
}
PATIENT_T2 = Path("clinical") / "T2.nii.gz"
PATIENT_LESION = Path("clinical") / "lesionT2.nii.gz"
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


def _mask_moments(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and standard deviation along each world axis (mm) of a mask's voxels."""
    world = np.tensordot(affine[:3, :3], np.argwhere(mask).T.astype(np.float64), axes=1) + affine[:3, 3, None]
    return world.mean(axis=1), world.std(axis=1)


def implant_lesion(template: nib.Nifti1Image, data_dir: Path) -> np.ndarray:
    """The ``template`` image (a T2 contrast) with the patient's stroke lesion in it: the lesion's world position is
    mapped from the patient's head (voxels above 10 % of the 99th percentile) to the atlas's brain by matching their
    centres and spreads per axis, and inside the (linearly resampled, soft) mask the template is multiplied by the
    patient's lesion contrast: its T2 intensity over the median of the tissue 2 to 6 mm around the lesion."""
    from scipy.ndimage import binary_dilation

    patient, lesion = nib.load(str(data_dir / PATIENT_T2)), nib.load(str(data_dir / PATIENT_LESION))
    scan = np.asanyarray(patient.dataobj).astype(np.float32)
    mask = np.asanyarray(lesion.dataobj) > 0.5
    head = scan > 0.1 * np.percentile(scan, 99)
    ring = binary_dilation(mask, iterations=6) & ~binary_dilation(mask, iterations=2) & head
    contrast = np.where(mask, scan / np.median(scan[ring]), 1.0)
    atlas = nib.load(str(data_dir / ATLAS))
    patient_centre, patient_spread = _mask_moments(head, patient.affine)
    atlas_centre, atlas_spread = _mask_moments(np.asanyarray(atlas.dataobj) > 0, atlas.affine)
    world = world_grid(template.affine, template.shape[:3])
    in_patient = (world - atlas_centre[:, None, None, None]) * (patient_spread / atlas_spread)[:, None, None, None]
    at = world_to_voxel(patient.affine, in_patient + patient_centre[:, None, None, None])
    soft = map_coordinates(mask.astype(np.float32), at, order=1, cval=0)
    ratio = map_coordinates(contrast.astype(np.float32), at, order=1, cval=1)
    image = np.asanyarray(template.dataobj).astype(np.float32)
    return image * (1 + soft * (ratio - 1))


def true_fixed_to_moving(field_path: Path, affine: np.ndarray, shape: tuple[int, ...], steps: int = 20) -> np.ndarray:
    """Where each voxel of the grid ``affine``, ``shape`` should land in the moving image (``[3, *shape]``, RAS mm):
    the inverse of the known deformation, ``y`` with ``y + u(y) = x``, by fixed-point iteration (the field is smooth
    and small, so it converges in a few steps)."""
    field = nib.load(str(field_path))
    u = np.moveaxis(np.asarray(field.dataobj, dtype=np.float64), -1, 0)
    world = world_grid(affine, shape)
    displacement = np.zeros_like(world)
    for _ in range(steps):
        at = world_to_voxel(field.affine, world + displacement)
        displacement = -np.stack([map_coordinates(c, at, order=1, mode="nearest") for c in u])
    return world + displacement


def field_error_mm(points: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean and 95th percentile (mm) inside ``mask`` of the distance between where a registration sends each fixed
    voxel (``points``, ``[3, *shape]`` RAS mm) and where it should (``truth``)."""
    error = np.linalg.norm(points - truth, axis=0)[mask]
    return float(error.mean()), float(np.percentile(error, 95))


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
    original = implant_lesion(source, data_dir) if case == "t2_lesion" else np.asanyarray(source.dataobj)
    image = map_coordinates(original.astype(np.float32), world_to_voxel(source.affine, moved), order=1, cval=0)
    labels = np.rint(np.asanyarray(atlas.dataobj)).astype(np.int16)
    moving_label = map_coordinates(labels, world_to_voxel(atlas.affine, moved), order=0, cval=0)
    fixed_grid = world_to_voxel(atlas.affine, world_grid(fixed.affine, fixed.shape[:3]))
    save_nifti(np.asanyarray(fixed.dataobj).astype(np.float32), fixed.affine, files["fixed"])
    save_nifti(map_coordinates(labels, fixed_grid, order=0, cval=0), fixed.affine, files["fixed_label"])
    save_nifti(acquire(np.clip(image, 0, None), rng), affine, files["moving"])
    save_nifti(moving_label.astype(np.int16), affine, files["moving_label"])
    save_nifti(np.moveaxis(field, 0, -1).astype(np.float32), affine, files["known_field"])
    return files

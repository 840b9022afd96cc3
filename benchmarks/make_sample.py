"""Make the embedded sample pair in ``common/sample`` from two SynthSeg training label maps.

Subject A's label map is rendered as a T1-like moving image, subject B's as a T2-like fixed image; both are cropped to
their brain, downsampled to 2 mm, and the fixed pair is stored in LIA orientation (the moving one in RAS), so that the
sample also exercises orientation handling. Everything is seeded: running this again gives the same voxels.

    python -m benchmarks.make_sample [--data ../shared/data] [--output common/sample]

The helpers here are also used by ``run_benchmark.py`` to prepare its rendered pairs.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from common.synthesis import render_contrast

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
MOVING_SUBJECT, FIXED_SUBJECT = 7, 16
MOVING_SEED, FIXED_SEED = 1, 2
FIXED_AXCODES = ("L", "I", "A")


def label_map_path(data_dir: Path, subject: int) -> Path:
    """Path of an affinely aligned SynthSeg training label map (1 mm, RAS, 160x192x160)."""
    return data_dir / "labelmaps_mni" / f"training_seg_{subject:02d}.nii.gz"


def load_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Label map as int16 ``[X, Y, Z]`` and its voxel->RAS affine."""
    image = nib.load(str(path))
    return np.rint(np.asanyarray(image.dataobj)).astype(np.int16), image.affine


def crop_box(labels: np.ndarray, margin: int = 2, multiple: int = 2) -> tuple[slice, ...]:
    """Bounding box of the non-zero labels plus ``margin`` voxels, its sizes grown to a multiple of ``multiple``."""
    nonzero = np.argwhere(labels > 0)
    box = []
    for axis, size in enumerate(labels.shape):
        start = max(int(nonzero[:, axis].min()) - margin, 0)
        stop = min(int(nonzero[:, axis].max()) + 1 + margin, size)
        length = -(-(stop - start) // multiple) * multiple
        start = max(min(start, size - length), 0)
        box.append(slice(start, start + length))
    return tuple(box)


def crop_affine(affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """Affine of the sub-grid starting at ``box``'s first voxel."""
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in box]
    return affine @ shift


def _blocks(array: np.ndarray, factor: int) -> np.ndarray:
    """``[X/f, Y/f, Z/f, f**3]`` view of the non-overlapping ``f``-cubes of ``array`` (sizes cropped to multiples)."""
    x, y, z = (s // factor for s in array.shape)
    array = array[: x * factor, : y * factor, : z * factor]
    return array.reshape(x, factor, y, factor, z, factor).transpose(0, 2, 4, 1, 3, 5).reshape(x, y, z, -1)


def downsample_labels(labels: np.ndarray, factor: int = 2) -> np.ndarray:
    """Most frequent label of each ``factor``-cube; ties go to a non-zero label, then to the first in the cube."""
    blocks = _blocks(labels, factor)
    counts = (blocks[..., :, None] == blocks[..., None, :]).sum(-1) * 2 + (blocks > 0)
    return np.take_along_axis(blocks, counts.argmax(-1)[..., None], -1)[..., 0].astype(labels.dtype)


def downsample_image(image: np.ndarray, factor: int = 2) -> np.ndarray:
    """Mean of each ``factor``-cube (the partial-volume average a coarser acquisition would see)."""
    return _blocks(image, factor).mean(-1).astype(np.float32)


def downsample_affine(affine: np.ndarray, factor: int = 2) -> np.ndarray:
    """Affine of the grid whose voxels are ``factor``-cubes of the original (centres at the cube centres)."""
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2
    return affine @ scale


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute the array axes to orientation ``axcodes`` and adjust the affine: world content is unchanged."""
    image = nib.Nifti1Image(array, affine).as_reoriented(ornt_transform(io_orientation(affine), axcodes2ornt(axcodes)))
    return np.asarray(image.dataobj), image.affine


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` with qform and sform set to ``affine`` (mm); gzip level 9 with no timestamp, so the bytes
    depend on the content only."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=9, mtime=0))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] intensities as 0..255: 8-bit keeps the sample small, and readers return float32 anyway."""
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_subject(data_dir: Path, subject: int, contrast: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one subject at 1 mm, crop it to its brain and downsample to 2 mm: (image, labels, affine)."""
    labels, affine = load_labels(label_map_path(data_dir, subject))
    image = render_contrast(labels, contrast, seed=seed)
    box = crop_box(labels)
    affine = downsample_affine(crop_affine(affine, box))
    return downsample_image(image[box]), downsample_labels(labels[box]), affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the reference data folder")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "common" / "sample", help="output folder")
    args = parser.parse_args()

    moving, moving_labels, moving_affine = make_subject(args.data, MOVING_SUBJECT, "t1", MOVING_SEED)
    fixed, fixed_labels, fixed_affine = make_subject(args.data, FIXED_SUBJECT, "t2", FIXED_SEED)
    fixed, _ = reorient(fixed, fixed_affine, FIXED_AXCODES)
    fixed_labels, fixed_affine = reorient(fixed_labels, fixed_affine, FIXED_AXCODES)

    save_nifti(to_uint8(moving), moving_affine, args.output / "moving_t1.nii.gz")
    save_nifti(moving_labels, moving_affine, args.output / "moving_label.nii.gz")
    save_nifti(to_uint8(fixed), fixed_affine, args.output / "fixed_t2.nii.gz")
    save_nifti(fixed_labels, fixed_affine, args.output / "fixed_label.nii.gz")
    for name in ("moving_t1", "moving_label", "fixed_t2", "fixed_label"):
        path = args.output / f"{name}.nii.gz"
        image = nib.load(str(path))
        print(f"{path}: {image.shape} {''.join(nib.aff2axcodes(image.affine))} {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

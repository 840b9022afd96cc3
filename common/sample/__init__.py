"""The embedded sample pair: a T1-like moving and a T2-like fixed image of two subjects, with label maps.

Rendered from two SynthSeg training label maps (Apache-2.0, see ATTRIBUTION.md) by ``benchmarks/make_sample.py``:
2 mm isotropic, moving in RAS (76x94x80), fixed in LIA (74x80x93), FreeSurfer label values.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["sample_pair"]

_FILES = {
    "fixed": "fixed_t2.nii.gz",
    "moving": "moving_t1.nii.gz",
    "fixed_label": "fixed_label.nii.gz",
    "moving_label": "moving_label.nii.gz",
}


def sample_pair() -> dict[str, str]:
    """Absolute paths of the sample files, keys ``fixed``, ``moving``, ``fixed_label``, ``moving_label``."""
    folder = Path(__file__).resolve().parent
    return {key: str(folder / name) for key, name in _FILES.items()}

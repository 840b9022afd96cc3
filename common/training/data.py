"""The training data of the collection: the SynthSeg label maps and the subjects no trained model may see."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from monai.config import PathLike

__all__ = ["HELD_OUT_SUBJECTS", "label_maps", "select_subjects"]

# subjects kept out of every training run: their pairs are the held-out benchmark sets and the validation sets
HELD_OUT_SUBJECTS = (13, 14, 15, 16)

_SUBJECT = re.compile(r"_(\d+)\.nii(\.gz)?$")


def label_maps(data_dir: PathLike) -> list[str]:
    """The affinely aligned SynthSeg label maps (``labelmaps_mni/training_seg_NN.nii.gz``) under ``data_dir``, sorted."""
    return sorted(str(p) for p in Path(data_dir, "labelmaps_mni").glob("training_seg_*.nii.gz"))


def select_subjects(paths: Sequence[str], subjects: Iterable[int], exclude: bool = False) -> list[str]:
    """The ``paths`` of ``subjects`` (the number ending each file name, ``..._13.nii.gz``), in their order; with
    ``exclude``, the paths of every other subject."""
    chosen = {int(s) for s in subjects}
    selected = []
    for path in paths:
        match = _SUBJECT.search(str(path))
        if (match is not None and int(match.group(1)) in chosen) != exclude:
            selected.append(path)
    return selected

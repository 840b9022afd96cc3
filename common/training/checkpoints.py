"""Finding the checkpoint a training run resumes from."""

from __future__ import annotations

from pathlib import Path

from monai.config import PathLike

__all__ = ["latest_checkpoint"]


def latest_checkpoint(folder: PathLike, pattern: str = "checkpoint*.pt") -> str:
    """Path of the most recently written file matching ``pattern`` in ``folder``, or ``""`` when there is none."""
    candidates = sorted(Path(folder).glob(pattern), key=lambda p: p.stat().st_mtime) if Path(folder).is_dir() else []
    return str(candidates[-1]) if candidates else ""

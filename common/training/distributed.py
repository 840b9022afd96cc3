"""Multi-process training: which handlers each process runs."""

from __future__ import annotations

from collections.abc import Sequence

from monai.handlers import CheckpointSaver

from .checkpoints import BestWeights, TrainingCheckpoint
from .curves import TrainingCurve

__all__ = ["on_rank"]

# handlers that write files: one process writes them, the others would race it
_WRITERS = (CheckpointSaver, TrainingCheckpoint, BestWeights, TrainingCurve)


def on_rank(handlers: Sequence, rank: int) -> list:
    """The ``handlers`` process ``rank`` runs: all of them on rank 0, all but the file writers elsewhere."""
    return list(handlers) if rank == 0 else [h for h in handlers if not isinstance(h, _WRITERS)]

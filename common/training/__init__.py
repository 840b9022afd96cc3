from .checkpoints import latest_checkpoint
from .contrastive import (
    ContrastiveIteration,
    RandContrastViewsd,
    RandShiftedViewsd,
    RetrievalIteration,
    corresponding_parts,
    retrieval_accuracy,
)
from .curves import TrainingCurve

__all__ = [
    "ContrastiveIteration",
    "RandContrastViewsd",
    "RandShiftedViewsd",
    "RetrievalIteration",
    "TrainingCurve",
    "corresponding_parts",
    "latest_checkpoint",
    "retrieval_accuracy",
]

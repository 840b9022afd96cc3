from .checkpoints import BestWeights, TrainingCheckpoint, latest_checkpoint
from .contrastive import (
    ContrastiveIteration,
    RandContrastViewsd,
    RandShiftedViewsd,
    RetrievalIteration,
    corresponding_parts,
    retrieval_accuracy,
)
from .curves import TrainingCurve
from .registration import PairDiceIteration, PairRegistrationIteration, ordered_pairs

__all__ = [
    "BestWeights",
    "ContrastiveIteration",
    "PairDiceIteration",
    "PairRegistrationIteration",
    "RandContrastViewsd",
    "RandShiftedViewsd",
    "RetrievalIteration",
    "TrainingCheckpoint",
    "TrainingCurve",
    "corresponding_parts",
    "latest_checkpoint",
    "ordered_pairs",
    "retrieval_accuracy",
]

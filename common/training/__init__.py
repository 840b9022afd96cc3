from .checkpoints import BestWeights, TrainingCheckpoint, held_in, latest_checkpoint
from .contrastive import (
    ContrastiveIteration,
    RandContrastViewsd,
    RandShiftedViewsd,
    RetrievalIteration,
    corresponding_parts,
    retrieval_accuracy,
)
from .curves import TrainingCurve
from .data import HELD_OUT_SUBJECTS, label_maps, select_subjects
from .distributed import on_rank
from .reference import ReferenceDisplacementd
from .registration import PairDiceIteration, PairRegistrationIteration, TransformedPair, ordered_pairs
from .schedules import EpochStepLearningRate
from .supervised import SupervisedIteration

__all__ = [
    "HELD_OUT_SUBJECTS",
    "BestWeights",
    "ContrastiveIteration",
    "EpochStepLearningRate",
    "PairDiceIteration",
    "PairRegistrationIteration",
    "RandContrastViewsd",
    "RandShiftedViewsd",
    "ReferenceDisplacementd",
    "RetrievalIteration",
    "SupervisedIteration",
    "TrainingCheckpoint",
    "TrainingCurve",
    "TransformedPair",
    "corresponding_parts",
    "held_in",
    "label_maps",
    "latest_checkpoint",
    "on_rank",
    "ordered_pairs",
    "retrieval_accuracy",
    "select_subjects",
]

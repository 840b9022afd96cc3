from .checkpoints import latest_checkpoint
from .contrastive import ContrastiveIteration, RandContrastViewsd, RetrievalIteration, retrieval_accuracy
from .curves import TrainingCurve

__all__ = [
    "ContrastiveIteration",
    "RandContrastViewsd",
    "RetrievalIteration",
    "TrainingCurve",
    "latest_checkpoint",
    "retrieval_accuracy",
]

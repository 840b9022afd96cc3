from .contrastive import VoxelInfoNCELoss, sample_voxels, voxel_similarities
from .correlation import GlobalNormalizedCrossCorrelationLoss
from .mind import MINDSSC, mind_ssc
from .mutual_information import (
    LocalMutualInformationLoss,
    MultiAxisMutualInformationLoss,
    grouped_mutual_information,
    parzen_weights,
    patch_groups,
)
from .pair import PairRegistrationLoss, joint_one_hot
from .regularizers import (
    DisplacementDivergenceLoss,
    DisplacementSmoothnessLoss,
    JacobianBarrierLoss,
    VelocityMagnitudeLoss,
)

__all__ = [
    "MINDSSC",
    "DisplacementDivergenceLoss",
    "DisplacementSmoothnessLoss",
    "GlobalNormalizedCrossCorrelationLoss",
    "JacobianBarrierLoss",
    "LocalMutualInformationLoss",
    "MultiAxisMutualInformationLoss",
    "PairRegistrationLoss",
    "VelocityMagnitudeLoss",
    "VoxelInfoNCELoss",
    "grouped_mutual_information",
    "joint_one_hot",
    "mind_ssc",
    "parzen_weights",
    "patch_groups",
    "sample_voxels",
    "voxel_similarities",
]

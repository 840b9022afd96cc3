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
from .objective import (
    DescriptorSimilarity,
    EndPointErrorLoss,
    EngineTerm,
    ImageSimilarity,
    RegistrationObjective,
    RegistrationTerm,
    StageSimilarity,
    TeacherDistillationLoss,
    WarpedLabelDiceLoss,
    joint_one_hot,
    pair_mask,
)
from .reconstruction import IntensityGradientL1Loss
from .reduction import MaskedVoxelMean
from .regularizers import (
    DisplacementDivergenceLoss,
    DisplacementSmoothnessLoss,
    JacobianBarrierLoss,
    VelocityMagnitudeLoss,
)

__all__ = [
    "MINDSSC",
    "DescriptorSimilarity",
    "DisplacementDivergenceLoss",
    "DisplacementSmoothnessLoss",
    "EndPointErrorLoss",
    "EngineTerm",
    "GlobalNormalizedCrossCorrelationLoss",
    "ImageSimilarity",
    "IntensityGradientL1Loss",
    "JacobianBarrierLoss",
    "LocalMutualInformationLoss",
    "MaskedVoxelMean",
    "MultiAxisMutualInformationLoss",
    "RegistrationObjective",
    "RegistrationTerm",
    "StageSimilarity",
    "TeacherDistillationLoss",
    "VelocityMagnitudeLoss",
    "VoxelInfoNCELoss",
    "WarpedLabelDiceLoss",
    "grouped_mutual_information",
    "joint_one_hot",
    "mind_ssc",
    "pair_mask",
    "parzen_weights",
    "patch_groups",
    "sample_voxels",
    "voxel_similarities",
]

from .contrastive import VoxelInfoNCELoss, sample_voxels, voxel_similarities
from .mind import MINDSSC, MINDSSCLoss, mind_ssc
from .mutual_information import (
    LocalMutualInformationLoss,
    MultiAxisMutualInformationLoss,
    grouped_mutual_information,
    parzen_weights,
    patch_groups,
)
from .regularizers import DisplacementDivergenceLoss, DisplacementSmoothnessLoss, JacobianBarrierLoss, VelocityMagnitudeLoss

__all__ = [
    "DisplacementDivergenceLoss",
    "DisplacementSmoothnessLoss",
    "JacobianBarrierLoss",
    "LocalMutualInformationLoss",
    "MINDSSC",
    "MINDSSCLoss",
    "MultiAxisMutualInformationLoss",
    "VelocityMagnitudeLoss",
    "VoxelInfoNCELoss",
    "grouped_mutual_information",
    "mind_ssc",
    "parzen_weights",
    "patch_groups",
    "sample_voxels",
    "voxel_similarities",
]

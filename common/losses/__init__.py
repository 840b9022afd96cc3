from .mind import MINDSSC, MINDSSCLoss, mind_ssc
from .regularizers import DisplacementSmoothnessLoss, JacobianBarrierLoss, VelocityMagnitudeLoss

__all__ = [
    "DisplacementSmoothnessLoss",
    "JacobianBarrierLoss",
    "MINDSSC",
    "MINDSSCLoss",
    "VelocityMagnitudeLoss",
    "mind_ssc",
]

from .optimizer import BestState, create_pair_engine
from .registration import InstanceOptimizationInferer, downsample_image
from .test_time import TestTimeOptimizationInferer, working_shape

__all__ = [
    "BestState",
    "InstanceOptimizationInferer",
    "TestTimeOptimizationInferer",
    "create_pair_engine",
    "downsample_image",
    "working_shape",
]

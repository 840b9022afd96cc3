from .optimizer import BestState, create_pair_engine
from .registration import InstanceOptimizationInferer, downsample_image

__all__ = ["BestState", "InstanceOptimizationInferer", "create_pair_engine", "downsample_image"]

from .intensity import RandMonotoneBezier, RandMonotoneBezierd, ScaleIntensityRangePercentiles, bezier_remap
from .spatial import ComposeDisplacementd, RandDiffeomorphicWarpd, random_velocity

__all__ = [
    "ComposeDisplacementd",
    "RandDiffeomorphicWarpd",
    "RandMonotoneBezier",
    "RandMonotoneBezierd",
    "ScaleIntensityRangePercentiles",
    "bezier_remap",
    "random_velocity",
]

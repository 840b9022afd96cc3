from .intensity import RandMonotoneBezier, RandMonotoneBezierd, bezier_remap
from .spatial import ComposeDisplacementd, RandDiffeomorphicWarpd, random_velocity

__all__ = [
    "ComposeDisplacementd",
    "RandDiffeomorphicWarpd",
    "RandMonotoneBezier",
    "RandMonotoneBezierd",
    "bezier_remap",
    "random_velocity",
]

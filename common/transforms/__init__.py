from .intensity import RandMonotoneBezier, RandMonotoneBezierd, bezier_remap
from .spatial import RandDiffeomorphicWarpd, random_velocity

__all__ = ["RandDiffeomorphicWarpd", "RandMonotoneBezier", "RandMonotoneBezierd", "bezier_remap", "random_velocity"]

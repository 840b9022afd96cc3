from .intensity import RandMonotoneBezier, RandMonotoneBezierd, bezier_remap

__all__ = ["RandMonotoneBezier", "RandMonotoneBezierd", "bezier_remap"]

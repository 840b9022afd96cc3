from .fields import (
    invert_ddf,
    jacobian_determinant,
    resize_ddf,
    scaling_and_squaring,
    warp,
)
from .grids import identity_grid, scaled_shape
from .sampling import block_points, random_blocks, random_voxels, sample_at, warp_at

__all__ = [
    "block_points",
    "identity_grid",
    "invert_ddf",
    "jacobian_determinant",
    "random_blocks",
    "random_voxels",
    "resize_ddf",
    "sample_at",
    "scaled_shape",
    "scaling_and_squaring",
    "warp",
    "warp_at",
]

from .fields import (
    invert_ddf,
    jacobian_determinant,
    resize_ddf,
    scaling_and_squaring,
    stage_fields,
    warp,
)
from .grids import grid_sample, identity_grid, scaled_shape
from .sampling import (
    block_points,
    mask_tiles,
    random_blocks,
    random_blocks_in,
    random_voxels,
    random_voxels_in,
    sample_at,
    warp_at,
)

__all__ = [
    "block_points",
    "grid_sample",
    "identity_grid",
    "invert_ddf",
    "jacobian_determinant",
    "mask_tiles",
    "random_blocks",
    "random_blocks_in",
    "random_voxels",
    "random_voxels_in",
    "resize_ddf",
    "sample_at",
    "scaled_shape",
    "scaling_and_squaring",
    "stage_fields",
    "warp",
    "warp_at",
]

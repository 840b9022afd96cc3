from .fields import (
    compose_ddf,
    jacobian_determinant,
    resize_ddf,
    scaling_and_squaring,
    warp,
)
from .grids import identity_grid, scaled_shape

__all__ = [
    "compose_ddf",
    "identity_grid",
    "jacobian_determinant",
    "resize_ddf",
    "scaled_shape",
    "scaling_and_squaring",
    "warp",
]

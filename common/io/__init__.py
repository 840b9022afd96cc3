"""Reading, validating, resampling and writing images, labels, landmarks and displacement fields."""

from .errors import RegistrationInputError, RegistrationOutputError, input_error, switch
from .image import (
    available_memory_bytes,
    check_device_memory,
    check_overlap,
    load_image,
    load_label,
    load_mask,
    load_series,
    world_bounds,
)
from .landmarks import load_landmarks
from .resample import resample_to_grid
from .transforms import compose_fixed_to_moving, load_affine_itk, load_ddf_itk
from .writers import atomic_write, save_affine_itk, save_csv, save_ddf_itk, save_image, save_json, save_series

__all__ = [
    "RegistrationInputError",
    "RegistrationOutputError",
    "atomic_write",
    "available_memory_bytes",
    "check_device_memory",
    "check_overlap",
    "compose_fixed_to_moving",
    "input_error",
    "load_affine_itk",
    "load_ddf_itk",
    "load_image",
    "load_label",
    "load_landmarks",
    "load_mask",
    "load_series",
    "resample_to_grid",
    "save_affine_itk",
    "save_csv",
    "save_ddf_itk",
    "save_image",
    "save_json",
    "save_series",
    "switch",
    "world_bounds",
]

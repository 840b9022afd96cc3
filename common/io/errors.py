"""The one error type for bad user input, with a message that names the file and the problem."""

from __future__ import annotations

from monai.config import PathLike


class RegistrationInputError(ValueError):
    """Bad user input (a file, its content or its geometry); the message says which file and what is wrong."""


class RegistrationOutputError(RegistrationInputError):
    """Outputs that cannot be written where asked (unwritable, full disk, over an input or an existing file); reported
    like bad input."""


def input_error(role: str, path: PathLike, problem: str) -> RegistrationInputError:
    """Build ``RegistrationInputError("<role> '<path>': <problem>")``, e.g. ``moving image 'a.nii.gz': ...``."""
    return RegistrationInputError(f"{role} '{path}': {problem}")

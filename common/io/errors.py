"""The one error type for bad user input, with a message that names the file and the problem, and reading a switch."""

from __future__ import annotations

from typing import Any

from monai.config import PathLike

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class RegistrationInputError(ValueError):
    """Bad user input (a file, its content or its geometry); the message says which file and what is wrong."""


class RegistrationOutputError(RegistrationInputError):
    """Outputs that cannot be written where asked (unwritable, full disk, over an input or an existing file); reported
    like bad input."""


def input_error(role: str, path: PathLike, problem: str) -> RegistrationInputError:
    """Build ``RegistrationInputError("<role> '<path>': <problem>")``, e.g. ``moving image 'a.nii.gz': ...``."""
    return RegistrationInputError(f"{role} '{path}': {problem}")


def switch(value: Any, name: str = "switch") -> Any:
    """A boolean setting as given: a bool, or text ``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case), which
    is how a switch arrives from the command line; a list of them (or its text, ``[true,false]``) gives a list of
    bools. Anything else raises a clear error naming ``--name``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        return [switch(v, name) for v in value]
    text = str(value).strip().lower()
    if text.startswith("[") and text.endswith("]"):
        return [switch(v, name) for v in text[1:-1].split(",")]
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise RegistrationInputError(f"--{name} {value}: a switch is true or false")

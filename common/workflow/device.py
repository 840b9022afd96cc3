"""The one place where a device setting becomes a device."""

from __future__ import annotations

import torch

from common.io import RegistrationInputError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): CUDA when available, else CPU; a requested CUDA device must exist.

    Raises :class:`~common.io.RegistrationInputError` for a device name torch does not know or CUDA without CUDA.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RegistrationInputError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RegistrationInputError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RegistrationInputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    return dev

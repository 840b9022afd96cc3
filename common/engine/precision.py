"""Mixed precision for the networks of a registration: bfloat16 where the hardware computes it."""

from __future__ import annotations

import torch

__all__ = ["autocast_bfloat16", "check_amp", "native_bfloat16"]


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA GPU that supports it without emulation, or a CPU with
    AVX-512 BF16, AMX or Arm's BF16 instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.10; before it, assume none
    if device.type == "cpu" and capabilities is not None:
        return any(capabilities().get(flag, False) for flag in ("avx512_bf16", "amx_bf16", "bf16"))
    return False


def check_amp(amp: bool | str) -> bool | str:
    """``amp`` if it is a valid mixed-precision setting (True, False or ``"auto"``), else a clear error."""
    if amp not in (True, False, "auto"):
        raise ValueError(f"amp must be true, false or 'auto', got {amp!r}.")
    return amp


def autocast_bfloat16(device: torch.device, amp: bool | str) -> torch.autocast:
    """``torch.autocast`` in bfloat16 on ``device`` when ``amp`` asks for it: True always, ``"auto"`` only where the
    device computes bfloat16 natively (:func:`native_bfloat16`; emulated, the convolutions would be slower), False
    never. Convolutions then take about half their float32 time; callers return float32 to what follows."""
    enabled = native_bfloat16(device) if check_amp(amp) == "auto" else bool(amp)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

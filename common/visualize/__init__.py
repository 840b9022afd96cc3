"""Pictures for checking a registration at a glance."""

from __future__ import annotations

from .qc import save_qc_figure

__all__ = ["save_qc_figure"]

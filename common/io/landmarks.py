"""Reading landmark points (physical coordinates) from CSV files."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from monai.config import PathLike

from .errors import input_error

_CONVENTIONS = ("AUTO", "LPS", "RAS")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _header_convention(header: list[str]) -> str | None:
    text = " ".join(header).upper()
    found = [c for c in ("LPS", "RAS") if c in text]
    return found[0] if len(found) == 1 else None


def load_landmarks(path: PathLike, convention: str = "auto", role: str = "landmarks") -> torch.Tensor:
    """Read a CSV of physical points, one ``x,y,z`` row (mm) per point, as float64 RAS ``[N, 3]``.

    The first row may be a header (a row without any number). With ``convention="auto"`` a header that
    mentions ``LPS`` or ``RAS`` decides; otherwise the points are taken as LPS, ITK's (and ANTs') convention.
    ``"LPS"``/``"RAS"`` state the convention; a header that says the other one is an error.

    Raises:
        RegistrationInputError: naming ``role`` and ``path``, for a missing file, a row that is not three
            finite numbers, no points, or conflicting conventions.
    """
    wanted = convention.upper()
    if wanted not in _CONVENTIONS:
        raise ValueError(f"convention must be 'auto', 'LPS' or 'RAS', got {convention!r}.")
    file = Path(path)
    if not file.is_file():
        raise input_error(role, path, "file not found")
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:  # tolerate the BOM spreadsheets write
            rows = [(n, [v.strip() for v in row]) for n, row in enumerate(csv.reader(f), start=1)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise input_error(role, path, f"is not a text CSV of x,y,z rows ({type(e).__name__}: {e})") from None
    rows = [(n, row) for n, row in rows if any(row)]

    header_convention = None
    if rows and not any(_is_number(v) for v in rows[0][1]):
        header_convention = _header_convention(rows[0][1])
        rows = rows[1:]
    if wanted == "AUTO":
        wanted = header_convention or "LPS"
    elif header_convention not in (None, wanted):
        raise input_error(role, path, f"header says {header_convention} but {wanted} was requested")

    points = []
    for n, row in rows:
        if len(row) != 3 or not all(_is_number(v) and math.isfinite(float(v)) for v in row):
            raise input_error(role, path, f"row {n} is not three finite numbers x,y,z: {','.join(row)!r}")
        points.append([float(v) for v in row])
    if not points:
        raise input_error(role, path, "holds no points")
    out = torch.tensor(points, dtype=torch.float64)
    if wanted == "LPS":
        out[:, :2] = -out[:, :2]
    return out

"""Motion correction of a 4D series: every frame registered to one reference frame (e.g. DCE-MRI)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.config import PathLike
from monai.data import MetaTensor

from common.engine import PairRegistration
from common.io import input_error, load_label, load_series, save_csv, save_ddf_itk, save_json, save_series
from common.io.writers import atomic_write
from common.metrics import nonpositive_jacobian_percent, percentiles
from common.spatial import jacobian_determinant, warp

from .device import resolve_device

__all__ = ["MotionCorrector", "region_mask"]

logger = logging.getLogger(__name__)


def region_mask(roi: PathLike | Sequence[int] | None, series: MetaTensor, reference: int) -> torch.Tensor:
    """The region whose mean intensity is followed over time, ``[X, Y, Z]`` bool on the series grid (CPU).

    Args:
        roi: a mask file (non-zero inside) on the series grid; or a box of voxel indices ``[x0, x1, y0, y1, z0, z1]``
            (half-open); or None for the head/body: voxels above 10 % of the reference frame's 99th percentile.
        series: the series ``[T, X, Y, Z]`` as loaded by :func:`common.io.load_series`.
        reference: index of the reference frame.
    """
    name = series.meta.get("filename_or_obj", "series")
    frame = series.as_tensor()[reference].cpu()
    shape = tuple(frame.shape)
    if roi is None or roi == "":
        return frame > 0.1 * percentiles(frame, [99.0], max_values=100_000)[0].item()
    if isinstance(roi, (str, Path)):
        mask = load_label(roi, series, role="region of interest")[0] != 0
    else:
        box = [int(v) for v in roi]
        if len(box) != 6 or any(not 0 <= a < b <= n for a, b, n in zip(box[::2], box[1::2], shape)):
            raise input_error("region of interest", name, f"box {box} is not [x0, x1, y0, y1, z0, z1] inside {shape}")
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[box[0] : box[1], box[2] : box[3], box[4] : box[5]] = True
    if not mask.any():
        raise input_error("region of interest", roi if isinstance(roi, (str, Path)) else name, "is empty")
    return mask


def _plot_curves(rows: list[dict[str, float]], reference: int, path: Path, title: str) -> None:
    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    frames = [r["frame"] for r in rows]
    ax.plot(frames, [r["roi_mean_before"] for r in rows], "o--", color="tab:grey", label="before correction")
    ax.plot(frames, [r["roi_mean_after"] for r in rows], "o-", color="tab:red", label="after correction")
    ax.axvline(reference, color="black", lw=0.8, ls=":", label=f"reference frame {reference}")
    ax.set_xlabel("frame")
    ax.set_ylabel("mean intensity in the region")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


class MotionCorrector:
    """Register every frame of a 4D series to a reference frame with a pair ``inferer`` and write:

    ``corrected.nii.gz`` (the series, each frame warped onto the reference), ``fields/ddf_tNNN.nii.gz`` (each frame's
    displacement in ITK's convention, usable with ``antsApplyTransforms`` or ``itk.DisplacementFieldTransform``),
    ``roi_curve.csv`` and ``roi_curve.png`` (mean intensity in a region per frame, before and after correction) and
    ``metrics.json`` (reference, times, % non-positive det J per frame).

    Args:
        inferer: registers one pair (:class:`~common.engine.PairRegistration`), e.g. the trained student with TTO.
        output_dir: where outputs go.
        device: where registration runs.
        reference: the reference frame's index; None: the middle frame (``T // 2``).
        bundle_name: recorded in ``metrics.json``.
    """

    def __init__(
        self,
        inferer: PairRegistration,
        output_dir: PathLike,
        device: str | torch.device | None = None,
        reference: int | None = None,
        bundle_name: str = "",
    ) -> None:
        self.inferer = inferer
        self.output_dir, self.device = Path(output_dir), resolve_device(device)
        self.reference, self.bundle_name = reference, bundle_name

    def run(self, series: PathLike, roi: PathLike | Sequence[int] | None = None) -> dict[str, Any]:
        """Correct ``series`` (4D file); ``roi`` as in :func:`region_mask`. Returns the metrics written."""
        start = time.perf_counter()
        frames = load_series(series)
        affine = frames.affine.double()
        count = frames.shape[0]
        ref = count // 2 if self.reference is None else self.reference
        if not -count <= ref < count:
            raise input_error("series", series, f"has {count} frames; reference frame {ref} does not exist")
        ref %= count
        data = frames.as_tensor().to(self.device)
        spacing = [float(s) for s in torch.linalg.norm(affine[:3, :3], dim=0)]
        mask = region_mask(roi, frames, ref).to(self.device)
        fields = self.output_dir / "fields"
        fields.mkdir(parents=True, exist_ok=True)
        corrected, rows = torch.empty_like(data), []
        for t in range(count):
            tic = time.perf_counter()
            if t == ref:
                ddf = torch.zeros((1, 3, *data.shape[1:]), device=self.device)
                corrected[t] = data[t]
            else:
                logger.info(f"frame {t} -> reference frame {ref} ({t + 1} of {count})")
                ddf = self.inferer(data[ref][None, None], data[t][None, None], spacing).ddf.detach()
                with torch.no_grad():
                    corrected[t] = warp(data[t][None, None], ddf)[0, 0]
            save_ddf_itk(ddf[0].cpu(), affine.numpy(), fields / f"ddf_t{t:03d}.nii.gz")
            rows.append(
                {
                    "frame": t,
                    "roi_mean_before": float(data[t][mask].mean()),
                    "roi_mean_after": float(corrected[t][mask].mean()),
                    "nonpositive_jacobian_percent": nonpositive_jacobian_percent(jacobian_determinant(ddf)[0, 0]),
                    "time_s": time.perf_counter() - tic,
                }
            )
        save_series(corrected.cpu(), affine.numpy(), self.output_dir / "corrected.nii.gz", dtype=np.float32)
        save_csv(rows, self.output_dir / "roi_curve.csv")
        _plot_curves(rows, ref, self.output_dir / "roi_curve.png", f"{self.bundle_name}: {Path(series).name}")
        metrics = {
            "bundle": self.bundle_name,
            "series": str(series),
            "frames": count,
            "reference_frame": ref,
            "roi_voxels": int(mask.sum()),
            "device": str(self.device),
            "per_frame": rows,
            "max_nonpositive_jacobian_percent": max(r["nonpositive_jacobian_percent"] for r in rows),
            "time_s": time.perf_counter() - start,
        }
        save_json(metrics, self.output_dir / "metrics.json")
        logger.info(f"corrected series written to {self.output_dir.resolve()} ({metrics['time_s']:.1f} s)")
        return metrics

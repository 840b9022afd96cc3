"""The loop over pairs: load, pre-align, register, warp, measure and write the contract's outputs."""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine
from monai.data import Dataset

from common.io import (
    RegistrationInputError,
    check_device_memory,
    resample_to_grid,
    save_csv,
    save_ddf_itk,
    save_image,
    save_json,
)
from common.metrics import (
    dice_per_label,
    hd95_per_label,
    mean_dict,
    ndv_percent,
    nonpositive_jacobian_percent,
    tre,
)
from common.spatial import jacobian_determinant
from common.visualize import save_qc_figure

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; a requested CUDA device must exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RegistrationInputError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def input_error_cause(error: BaseException) -> RegistrationInputError | None:
    """The user-input error behind ``error``, which MONAI's transforms and config parser wrap in RuntimeErrors."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, RegistrationInputError):
        cause = cause.__cause__
    return cause


def _input_error_hook(previous: Callable) -> Callable:
    """An excepthook that prints a user-input error as one line instead of a stack trace."""

    def hook(kind: type, error: BaseException, tb: Any) -> None:
        cause = input_error_cause(error)
        if cause is None:
            previous(kind, error, tb)
        else:
            print(f"error: {cause}", file=sys.stderr)

    return hook


def _peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or this process's resident-set high-water mark on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _overlap_scores(pred: torch.Tensor, ref: torch.Tensor, spacing: Sequence[float]) -> dict[str, Any]:
    dice = dice_per_label(pred, ref)
    hd95 = hd95_per_label(pred, ref, spacing, labels=list(dice))
    return {"dice": dice, "dice_mean": mean_dict(dice), "hd95": hd95, "hd95_mean": mean_dict(hd95)}


class RegistrationEvaluator(Engine):
    """Registers every pair of ``dataset`` with ``inferer`` and writes the bundle contract's outputs.

    One engine iteration is one pair. A single pair (id ``""``) writes into ``output_dir``; a datalist writes each
    pair into ``output_dir/<id>/`` plus ``output_dir/summary.csv``, carries on past a pair with bad input, and fails
    at the end if any pair failed.

    Args:
        device: where registration runs.
        dataset: items are pairs loaded by :class:`~common.workflow.LoadRegistrationPaird`.
        inferer: per-pair optimiser, ``inferer(fixed, moving, network, spacing) -> ddf [1, 3, X, Y, Z]``.
        network: passed to the inferer: a callable building the transform model from a flow-grid shape (the Neural
            ODE bundles' ``network_def``) or a trained registration network (tto_kd).
        output_dir: where outputs go.
        bundle_name, bundle_version: recorded in ``metrics.json``.
        memory_per_voxel: bytes per fixed-grid voxel that registration needs, for the memory check.
        save_qc: write ``qc.png``.
    """

    def __init__(
        self,
        device: str | torch.device,
        dataset: Dataset,
        inferer: Callable[..., torch.Tensor],
        network: Callable[..., nn.Module],
        output_dir: str,
        bundle_name: str,
        bundle_version: str,
        memory_per_voxel: int = 400,
        save_qc: bool = True,
    ) -> None:
        super().__init__(self._register_pair)
        self.device = resolve_device(device)
        self.dataset, self.inferer, self.network = dataset, inferer, network
        self.output_dir = Path(output_dir)
        self.bundle_name, self.bundle_version = bundle_name, bundle_version
        self.memory_per_voxel, self.save_qc = memory_per_voxel, save_qc
        self.summary: list[dict[str, Any]] = []

    def run(self) -> None:  # type: ignore[override]
        """Register all pairs; raises :class:`RegistrationInputError` if any failed on bad input."""
        sys.excepthook = _input_error_hook(sys.__excepthook__)
        self.summary = []
        super().run(range(len(self.dataset)), max_epochs=1)
        batch = any(row["id"] for row in self.summary)
        if batch:
            save_csv([{k: v for k, v in row.items() if k != "exception"} for row in self.summary], self.output_dir / "summary.csv")
            logger.info(f"summary of {len(self.summary)} pairs written to {self.output_dir / 'summary.csv'}")
        failed = [row for row in self.summary if row["status"] != "ok"]
        if failed:
            if not batch:
                raise failed[0]["exception"]
            raise RegistrationInputError(
                f"{len(failed)} of {len(self.summary)} pairs failed: "
                + "; ".join(f"{row['id']}: {row['error']}" for row in failed)
            )

    def _register_pair(self, engine: Engine, index: int) -> None:
        pair_id = self.dataset.data[index].get("id", "")
        try:
            row = self.register(index)
        except Exception as e:
            cause = input_error_cause(e)
            if cause is None:
                raise
            logger.error(f"{pair_id or 'pair'}: {cause}")
            row = {"id": pair_id, "status": "failed", "error": str(cause), "exception": cause}
        self.summary.append(row)

    def register(self, index: int) -> dict[str, Any]:
        """Register pair ``index`` and write its outputs; returns its summary row."""
        start = time.perf_counter()
        pair = self.dataset[index]
        pair_id = pair.get("id", "")
        out = self.output_dir / pair_id if pair_id else self.output_dir
        fixed, moving = pair["fixed"], pair["moving"]
        a_fixed, a_moving = fixed.affine.double(), moving.affine.double()
        shape = tuple(fixed.shape[1:])
        spacing = [float(s) for s in torch.linalg.norm(a_fixed[:3, :3], dim=0)]
        check_device_memory(
            shape, self.device, self.memory_per_voxel * math.prod(shape), hint="run with --device cpu"
        )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        logger.info(
            f"registering {pair['moving_path']} -> {pair['fixed_path']} "
            f"(fixed grid {'x'.join(map(str, shape))}, {'x'.join(f'{s:.2g}' for s in spacing)} mm) on {self.device}"
        )
        fixed_t = fixed.as_tensor().float().to(self.device)
        moving_t = moving.as_tensor().float().to(self.device)
        moving_on_fixed = resample_to_grid(moving_t, a_moving, a_fixed, shape)
        loaded = time.perf_counter()

        ddf = self.inferer(fixed_t[None], moving_on_fixed[None], self.network, spacing)
        registered = time.perf_counter()

        with torch.no_grad():
            warped = resample_to_grid(moving_t, a_moving, a_fixed, shape, ddf=ddf[0])
            det = jacobian_determinant(ddf)[0, 0]
        metrics: dict[str, Any] = {
            "bundle": self.bundle_name,
            "version": self.bundle_version,
            "device": str(self.device),
            "fixed": pair["fixed_path"],
            "moving": pair["moving_path"],
            "iterations": sum(self.inferer.stats.get("iterations", [])),
            "iterations_per_stage": self.inferer.stats.get("iterations", []),
            "final_loss": self.inferer.stats.get("final_loss"),
            "nonpositive_jacobian_percent": nonpositive_jacobian_percent(det),
            "ndv_percent": ndv_percent(ddf[0]),
            "jacobian_min": float(det.min()),
        }
        warped_label = None
        if "fixed_label" in pair:
            fixed_label = pair["fixed_label"].as_tensor()[0]
            moving_label = pair["moving_label"].as_tensor().to(self.device)
            before = resample_to_grid(moving_label, a_moving, a_fixed, shape, mode="nearest")[0].cpu()
            warped_label = resample_to_grid(moving_label, a_moving, a_fixed, shape, ddf=ddf[0], mode="nearest")[0]
            scores = {"before": _overlap_scores(before, fixed_label, spacing)}
            scores["after"] = _overlap_scores(warped_label.cpu(), fixed_label, spacing)
            metrics["dice"] = {k: {"mean": v["dice_mean"], "per_label": v["dice"]} for k, v in scores.items()}
            metrics["hd95_mm"] = {k: {"mean": v["hd95_mean"], "per_label": v["hd95"]} for k, v in scores.items()}
        if "fixed_landmarks" in pair:
            fixed_pts, moving_pts = pair["fixed_landmarks"], pair["moving_landmarks"]
            errors = {
                "before": tre(fixed_pts, moving_pts, torch.zeros_like(ddf[0]), a_fixed),
                "after": tre(fixed_pts, moving_pts, ddf[0], a_fixed),
            }
            metrics["tre_mm"] = {k: {"mean": float(v.mean()), "per_point": v.tolist()} for k, v in errors.items()}
        metrics["peak_memory_mb"] = _peak_memory_mb(self.device)

        affine = a_fixed.numpy()
        ddf_cpu = ddf[0].cpu()
        out.mkdir(parents=True, exist_ok=True)
        save_image(warped[0].cpu(), affine, out / "warped.nii.gz", dtype=np.float32)
        save_ddf_itk(ddf_cpu, affine, out / "ddf.nii.gz")
        save_image(det.cpu(), affine, out / "jacobian.nii.gz", dtype=np.float32)
        if warped_label is not None:
            save_image(warped_label.cpu(), affine, out / "warped_label.nii.gz", dtype=np.int32)
        if self.save_qc:
            save_qc_figure(
                fixed_t[0].cpu(),
                moving_on_fixed[0].cpu(),
                warped[0].cpu(),
                det.cpu(),
                spacing,
                out / "qc.png",
                title=f"{self.bundle_name}: {Path(pair['moving_path']).name} -> {Path(pair['fixed_path']).name}",
                affine=affine,
            )
        done = time.perf_counter()
        metrics["time_s"] = {
            "total": done - start,
            "load": loaded - start,
            "register": registered - loaded,
            "stages": self.inferer.stats.get("stage_time_s", []),
            "evaluate_and_write": done - registered,
        }
        save_json(metrics, out / "metrics.json")
        logger.info(f"outputs written to {out.resolve()} ({done - start:.1f} s)")
        return {
            "id": pair_id,
            "status": "ok",
            "error": "",
            "dice_before": metrics.get("dice", {}).get("before", {}).get("mean", ""),
            "dice_after": metrics.get("dice", {}).get("after", {}).get("mean", ""),
            "nonpositive_jacobian_percent": metrics["nonpositive_jacobian_percent"],
            "time_s": metrics["time_s"]["total"],
            "output_dir": str(out),
        }

"""Event handlers of :class:`~common.workflow.RegistrationEvaluator`: the files a registered pair leaves behind.

The writers run at ``IterationEvents.MODEL_COMPLETED``, after the postprocessing, and write into the pair's staging
folder (``output["staging_dir"]``); the evaluator then moves the whole set into place. Each declares the file names
it may write (``filenames``), so that the evaluator can refuse an output that would overwrite an input and remove
files a previous run left under those names.
"""

from __future__ import annotations

import logging
import resource
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from common.io import save_affine_itk, save_csv, save_ddf_itk, save_image, save_json
from common.visualize import save_qc_figure

__all__ = ["ImageWriter", "MetricsWriter", "PairOutputHandler", "PairSummary", "QCFigureWriter"]

logger = logging.getLogger(__name__)


class PairOutputHandler(ABC):
    """Base of the handlers writing files of one registered pair: subclasses implement :meth:`write`."""

    filenames: tuple[str, ...] = ()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        self.write(output, Path(output["staging_dir"]))

    @abstractmethod
    def write(self, output: dict[str, Any], folder: Path) -> None:
        """Write this handler's files for the pair in ``output`` into ``folder``."""


class ImageWriter(PairOutputHandler):
    """``warped.nii.gz``, ``ddf.nii.gz`` (ITK/ANTs convention), ``jacobian.nii.gz`` and, with labels,
    ``warped_label.nii.gz``, all on the fixed grid; ``inverse_ddf.nii.gz`` (same convention) on the moving grid, when
    the engine gave an inverse (:class:`~common.workflow.InverseOnMovingGridd`); ``affine.mat`` (ITK/ANTs), when an
    affine stage ran."""

    filenames = (
        "warped.nii.gz",
        "ddf.nii.gz",
        "affine.mat",
        "jacobian.nii.gz",
        "warped_label.nii.gz",
        "inverse_ddf.nii.gz",
    )

    def write(self, output: dict[str, Any], folder: Path) -> None:
        affine = output["fixed_affine"].numpy()
        save_image(output["warped"][0].cpu(), affine, folder / "warped.nii.gz", dtype=np.float32)
        save_ddf_itk(output["ddf"][0].detach().cpu(), affine, folder / "ddf.nii.gz")
        if "fixed_to_moving" in output:
            save_affine_itk(output["fixed_to_moving"], folder / "affine.mat")
        save_image(output["jacobian"].cpu(), affine, folder / "jacobian.nii.gz", dtype=np.float32, compresslevel=0)
        if "warped_label" in output:
            save_image(output["warped_label"][0].cpu(), affine, folder / "warped_label.nii.gz", dtype=np.int32)
        if "inverse_ddf_moving" in output:
            moving_affine = output["moving_affine"].numpy()
            save_ddf_itk(output["inverse_ddf_moving"][0].cpu(), moving_affine, folder / "inverse_ddf.nii.gz")


class QCFigureWriter(PairOutputHandler):
    """``qc.png``: fixed, moving and warped side by side with the Jacobian determinant (see
    :func:`common.visualize.save_qc_figure`).

    Args:
        title: figure title's prefix, e.g. the bundle's name.
        enabled: False writes nothing (the ``--save_qc false`` switch).
    """

    filenames = ("qc.png",)

    def __init__(self, title: str = "", enabled: bool = True) -> None:
        self.title, self.enabled = title, enabled

    def write(self, output: dict[str, Any], folder: Path) -> None:
        if not self.enabled:
            return
        save_qc_figure(
            output["fixed"][0].cpu(),
            output["moving_on_fixed"][0].cpu(),
            output["warped"][0].cpu(),
            output["jacobian"].cpu(),
            output["spacing"],
            folder / "qc.png",
            title=f"{self.title}: {Path(output['moving_path']).name} -> {Path(output['fixed_path']).name}",
            affine=output["fixed_affine"].numpy(),
            notes=plausibility_notes(output.get("metrics", {}).get("plausibility")),
        )


def plausibility_notes(report: dict[str, Any] | None) -> list[str]:
    """The lines of a :class:`~common.workflow.PlausibilityReportd` report for the QC picture."""
    if not report:
        return []
    det, shift, nmi = report["jacobian_percentiles"], report["displacement_mm_percentiles"], report["nmi"]
    summary = (
        f"NMI {nmi['before']:.3f} -> {nmi['after']:.3f};  det J 1/50/99 %: {det['p1']:.2f} / {det['p50']:.2f} / "
        f"{det['p99']:.2f};  displacement 50/99 %: {shift['p50']:.1f} / {shift['p99']:.1f} mm  ({report['region']})"
    )
    return [summary] + [f"warning: {w}" for w in report["warnings"]]


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or this process's resident-set high-water mark on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsWriter(PairOutputHandler):
    """``metrics.json``: what ran (bundle, version, device, inputs, iterations), the measures of
    :class:`~common.workflow.RegistrationMetricsd`, peak memory, times (s) and the files of this run (``outputs``).
    List it after the other writers: its times include theirs and its ``outputs`` lists what they wrote.

    Args:
        bundle_name, bundle_version: recorded as ``bundle`` and ``version``.
    """

    filenames = ("metrics.json",)

    def __init__(self, bundle_name: str, bundle_version: str) -> None:
        self.bundle_name, self.bundle_version = bundle_name, bundle_version

    def write(self, output: dict[str, Any], folder: Path) -> None:
        stats, times, device = output["stats"], output["time"], output["device"]
        metrics = {
            "bundle": self.bundle_name,
            "version": self.bundle_version,
            "device": str(device),
            "fixed": output["fixed_path"],
            "moving": output["moving_path"],
            **output.get("mask_paths", {}),
            **({"affine": output["affine"].summary()} if "affine" in output else {}),
            "iterations": sum(stats.iterations),
            "iterations_per_stage": stats.iterations,
            "final_loss": stats.final_loss,
            **({"decisions": stats.decisions} if stats.decisions else {}),
            **output["metrics"],
            "peak_memory_mb": peak_memory_mb(device),
        }
        done = time.perf_counter()
        metrics["time_s"] = {
            "total": done - times["start"],
            "load": times["loaded"] - times["start"],
            "register": times["registered"] - times["loaded"],
            "stages": stats.stage_time_s,
            "evaluate_and_write": done - times["registered"],
        }
        metrics["outputs"] = sorted(p.name for p in folder.iterdir()) + ["metrics.json"]
        output["metrics"] = metrics
        save_json(metrics, folder / "metrics.json")


class PairSummary:
    """``summary.csv`` in the output folder of a datalist run: one row per pair (status, error, mean Dice before
    and after, % non-positive det J, time, output folder), written when the run ends, also when it is aborted."""

    def __init__(self, output_dir: str | Path, filename: str = "summary.csv") -> None:
        self.path = Path(output_dir) / filename
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.add_row)
        engine.add_event_handler(Events.COMPLETED, self.save)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.save_and_raise)

    def reset(self, engine: Engine) -> None:
        self.rows = []

    def add_row(self, engine: Engine) -> None:
        output = engine.state.output
        metrics = output.get("metrics", {})
        self.rows.append(
            {
                "id": output["id"],
                "status": output["status"],
                "error": output.get("error", ""),
                "dice_before": metrics.get("dice", {}).get("before", {}).get("mean", ""),
                "dice_after": metrics.get("dice", {}).get("after", {}).get("mean", ""),
                "nonpositive_jacobian_percent": metrics.get("nonpositive_jacobian_percent", ""),
                "time_s": metrics.get("time_s", {}).get("total", ""),
                "output_dir": str(output["output_dir"]),
            }
        )

    def save(self, engine: Engine) -> None:
        if any(row["id"] for row in self.rows):
            save_csv(self.rows, self.path)
            logger.info(f"summary of {len(self.rows)} pairs written to {self.path}")

    def save_and_raise(self, engine: Engine, error: Exception) -> None:
        self.save(engine)
        raise error

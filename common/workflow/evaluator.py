"""The loop over pairs: load, pre-align, register, then postprocessing and handlers write the contract's outputs."""

from __future__ import annotations

import logging
import math
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from monai.data import Dataset
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.transforms import Transform

from common.engine import AffineRegistration, PairRegistration
from common.io import (
    RegistrationInputError,
    RegistrationOutputError,
    check_device_memory,
    check_overlap,
    resample_to_grid,
)

from .cli import input_error_cause, os_error_cause
from .device import resolve_device
from .executors import RayExecutor
from .handlers import PairOutputHandler
from .pairs import PATH_KEYS

__all__ = ["RegistrationEvaluator"]

logger = logging.getLogger(__name__)

_STAGING_PREFIX = ".partial-"


class RegistrationEvaluator(Evaluator):
    """Registers every pair of ``dataset`` with ``inferer``; ``postprocessing`` and ``val_handlers`` (MONAI's
    evaluator arguments) measure the result and write the files.

    One iteration is one pair. Its output (``engine.state.output``) holds the loaded pair on the registration device
    (keys in :mod:`common.workflow.postprocessing`), ``moving_on_fixed``, ``ddf``, the inferer's ``stats``, the
    timestamps ``time``, ``id``, ``status`` and ``output_dir``. After registration the evaluator fires
    ``IterationEvents.MODEL_COMPLETED``: the postprocessing runs, then the writers
    (:class:`~common.workflow.PairOutputHandler`) write into a hidden staging folder, which the evaluator moves into
    place as one set: files an earlier run left under the writers' names go, ``metrics.json`` comes last, so a
    folder with a ``metrics.json`` holds one run's complete outputs. Staging folders of killed runs are removed.

    A single pair (id ``""``) writes into ``output_dir``; a datalist writes pair ``id`` into ``output_dir/<id>/``,
    carries on past a pair with bad input or outputs that cannot be written, and fails at the end if any pair failed.

    Args:
        device: where registration runs (``"auto"``: CUDA when available).
        dataset: items are pairs loaded by :class:`~common.workflow.LoadRegistrationPaird`.
        inferer: registers one pair (:class:`~common.engine.PairRegistration`): ``inferer(fixed, moving, spacing)``
            returns the displacement and its :class:`~common.engine.RegistrationStats`.
        output_dir: where outputs go.
        postprocessing: transform of the per-pair output dict, e.g. warping and measuring.
        val_handlers: the writers and, for a datalist, :class:`~common.workflow.PairSummary`.
        memory_per_voxel: bytes per fixed-grid voxel that registration needs, for the memory check.
        affine: the affine pre-alignment (:class:`~common.engine.AffineRegistration`); when it runs, the moving image
            (and mask) reach the fixed grid through it, and the output gets ``fixed_to_moving``. Without one, or with
            its mode ``"false"``, fixed and moving must overlap in world space through their headers.
        executor: where a datalist's pairs run: None, here one after another; a
            :class:`~common.workflow.RayExecutor`, as Ray tasks (this evaluator gathers their rows for the summary).
    """

    def __init__(
        self,
        device: str | torch.device,
        dataset: Dataset,
        inferer: PairRegistration,
        output_dir: str,
        postprocessing: Transform | None = None,
        val_handlers: Sequence | None = None,
        memory_per_voxel: int = 400,
        affine: AffineRegistration | None = None,
        executor: RayExecutor | None = None,
    ) -> None:
        super().__init__(
            device=resolve_device(device),
            val_data_loader=range(len(dataset)),
            postprocessing=postprocessing,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.dataset, self.inferer = dataset, inferer
        self.output_dir = Path(output_dir)
        self.memory_per_voxel, self.affine, self.executor = memory_per_voxel, affine, executor
        self.pair_postprocessing = postprocessing  # MONAI keeps it only as an event handler; Ray workers need it
        self.writers = [h for h in val_handlers or () if isinstance(h, PairOutputHandler)]
        self.output_names = tuple(name for h in self.writers for name in h.filenames)
        self.failures: list[tuple[str, RegistrationInputError]] = []
        self.pending: list[Any] = []

    def run(self, global_epoch: int = 1) -> None:
        """Register all pairs; raises :class:`~common.io.RegistrationInputError` if any failed on bad input."""
        self.failures = []
        self.pending = []
        items = self.dataset.data
        if self.executor is not None and any(item.get("id") for item in items):
            parts = {
                "device": str(self.state.device),
                "inferer": self.inferer,
                "output_dir": str(self.output_dir),
                "postprocessing": self.pair_postprocessing,
                "val_handlers": self.writers,
                "memory_per_voxel": self.memory_per_voxel,
                "affine": self.affine,
                "transform": self.dataset.transform,
            }
            self.pending = self.executor.submit(parts, items, self.state.device)
        super().run(global_epoch)
        if not self.failures:
            return
        if len(self.dataset) == 1 and not self.failures[0][0]:
            raise self.failures[0][1]
        raise RegistrationInputError(
            f"{len(self.failures)} of {len(self.dataset)} pairs failed: "
            + "; ".join(f"{pair_id}: {error}" for pair_id, error in self.failures)
        )

    def _iteration(self, engine: Engine, index: int) -> dict[str, Any]:  # type: ignore[override]
        if self.pending:
            row = self.executor.result(self.pending[index])
            if row["status"] != "ok":
                logger.error(f"{row['id']}: {row['error']}")
                self.failures.append((row["id"], RegistrationInputError(row["error"])))
            engine.state.output = row
            return row
        item = self.dataset.data[index]
        pair_id = item.get("id", "")
        out = self.output_dir / pair_id if pair_id else self.output_dir
        staging = out / f"{_STAGING_PREFIX}{secrets.token_hex(4)}"
        try:
            self._check_outputs(item, out)
            engine.state.output = self._register(index, pair_id, out)
            _remove_partial_outputs(out)
            staging.mkdir(parents=True)
            engine.state.output["staging_dir"] = staging
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
            self._commit(staging, out)
            logger.info(
                f"outputs written to {out.resolve()} ({engine.state.output['metrics']['time_s']['total']:.1f} s)"
            )
        except Exception as e:
            shutil.rmtree(staging, ignore_errors=True)
            cause = input_error_cause(e)
            if cause is None and (os_cause := os_error_cause(e)) is not None:
                cause = RegistrationOutputError(f"cannot write the outputs in '{out}': {os_cause.strerror or os_cause}")
            if cause is None:
                raise
            logger.error(f"{pair_id or 'pair'}: {cause}")
            self.failures.append((pair_id, cause))
            engine.state.output = {"id": pair_id, "status": "failed", "error": str(cause), "output_dir": out}
        return engine.state.output

    def _register(self, index: int, pair_id: str, out: Path) -> dict[str, Any]:
        start = time.perf_counter()
        pair = self.dataset[index]
        fixed, moving = pair["fixed"], pair["moving"]
        a_fixed, a_moving = fixed.affine.double(), moving.affine.double()
        shape = tuple(fixed.shape[1:])
        spacing = [float(s) for s in torch.linalg.norm(a_fixed[:3, :3], dim=0)]
        hint = "run with --device cpu" if self.state.device.type == "cuda" else "register at a coarser resolution"
        check_device_memory(shape, self.state.device, self.memory_per_voxel * math.prod(shape), hint=hint)
        if self.state.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.state.device)
        logger.info(
            f"registering {pair['moving_path']} -> {pair['fixed_path']} (fixed grid {'x'.join(map(str, shape))}, "
            f"{'x'.join(f'{s:.2g}' for s in spacing)} mm) on {self.state.device}"
        )
        output: dict[str, Any] = {
            "id": pair_id,
            "status": "ok",
            "output_dir": out,
            "device": self.state.device,
            "fixed_path": pair["fixed_path"],
            "moving_path": pair["moving_path"],
            "fixed": fixed.as_tensor().float().to(self.state.device),
            "moving": moving.as_tensor().float().to(self.state.device),
            "fixed_affine": a_fixed,
            "moving_affine": a_moving,
            "spacing": spacing,
        }
        for key in ("fixed_label", "moving_label"):
            if key in pair:
                output[key] = pair[key].as_tensor().to(self.state.device)
        for key in ("fixed_landmarks", "moving_landmarks"):
            if key in pair:
                output[key] = pair[key]
        masks = {
            k: pair[k].as_tensor().float().to(self.state.device) for k in ("fixed_mask", "moving_mask") if k in pair
        }
        a_sample = a_fixed
        if self.affine is None or self.affine.mode == "false":
            check_overlap(fixed, moving)
        else:
            output["affine"] = self.affine(output["fixed"], output["moving"], a_fixed, a_moving, **masks)
            if output["affine"].ran:
                output["fixed_to_moving"] = output["affine"].matrix
                a_sample = output["fixed_to_moving"] @ a_fixed
        output["moving_on_fixed"] = resample_to_grid(output["moving"], a_moving, a_sample, shape)
        if "fixed_mask" in masks:
            masks["fixed_mask"] = masks["fixed_mask"][None]
        if "moving_mask" in masks:
            masks["moving_mask"] = resample_to_grid(masks["moving_mask"], a_moving, a_sample, shape)[None]
        output["mask_paths"] = {k: pair.get(f"{k}_path") for k in ("fixed_mask", "moving_mask")}
        if "fixed_mask" in masks:
            output["fixed_mask"] = masks["fixed_mask"][0]
        loaded = time.perf_counter()
        result = self.inferer(
            output["fixed"][None],
            output["moving_on_fixed"][None],
            spacing,
            fixed_mask=masks.get("fixed_mask"),
            moving_mask=masks.get("moving_mask"),
        )
        output["ddf"], output["stats"] = result.ddf, result.stats
        if result.inverse_ddf is not None:
            output["inverse_ddf"] = result.inverse_ddf
        output["time"] = {"start": start, "loaded": loaded, "registered": time.perf_counter()}
        return output

    def _check_outputs(self, item: dict[str, Any], out: Path) -> None:
        """Refuse a pair whose outputs would overwrite one of its inputs."""
        inputs = {Path(item[k]).resolve(): k for k in PATH_KEYS if item.get(k)}
        for name in self.output_names:
            if (out / name).resolve() in inputs:
                raise RegistrationOutputError(
                    f"--output_dir '{out}' holds the {inputs[(out / name).resolve()].replace('_', ' ')} "
                    f"'{name}', which this run would overwrite; choose another output folder"
                )

    def _commit(self, staging: Path, out: Path) -> None:
        """Move the staged files into ``out`` as one set, ``metrics.json`` last, and drop stale outputs."""
        written = {p.name for p in staging.iterdir()}
        (out / "metrics.json").unlink(missing_ok=True)
        for name in self.output_names:
            if name not in written:
                (out / name).unlink(missing_ok=True)
        for name in sorted(written, key=lambda n: n == "metrics.json"):
            (staging / name).replace(out / name)
        staging.rmdir()


def _remove_partial_outputs(folder: Path) -> None:
    """Staging folders and half-written temporaries of killed runs."""
    if not folder.is_dir():
        return
    for path in folder.glob(f"{_STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in folder.glob(".*.tmp-*"):
        path.unlink(missing_ok=True)

"""A handler that keeps a training run's curve on disk: per-epoch loss and validation metrics, as CSV and PNG."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.config import PathLike

from common.io.writers import atomic_write, save_csv

__all__ = ["TrainingCurve"]


class TrainingCurve:
    """Append one row per training epoch to ``<output_dir>/<name>.csv`` and redraw ``<output_dir>/<name>.png``.

    A row holds the epoch, the iteration, the mean of ``output[loss_key]`` over the epoch, the wall time spent so far
    and the latest metrics of the validator (if one is given). Rows already in the CSV from earlier epochs are kept,
    so a run resumed from a checkpoint continues its curve.

    Args:
        output_dir: folder of the CSV and the picture.
        validator: engine whose ``state.metrics`` are recorded (run it before this handler's event fires, e.g. with
            a ``monai.handlers.ValidationHandler`` attached first).
        loss_key: key of the loss in the trainer's ``state.output``.
        name: file stem.
    """

    def __init__(
        self,
        output_dir: PathLike,
        validator: Engine | None = None,
        loss_key: str = "loss",
        name: str = "training_curve",
    ) -> None:
        self.csv_path = Path(output_dir) / f"{name}.csv"
        self.png_path = Path(output_dir) / f"{name}.png"
        self.validator, self.loss_key = validator, loss_key
        self._losses: list[float] = []
        self._rows: list[dict[str, float]] = []
        self._elapsed, self._loaded = 0.0, False
        self._start = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._restart)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _restart(self, engine: Engine) -> None:
        self._rows, self._loaded, self._losses = [], False, []
        self._start = time.perf_counter()

    def _load(self, epoch: int) -> None:
        """Keep the rows of the epochs before ``epoch`` (written by the run this one resumes)."""
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
            self._rows = [row for row in rows if row["epoch"] < epoch]
        self._elapsed = self._rows[-1].get("time_s", 0.0) if self._rows else 0.0
        self._loaded = True

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        value = output.get(self.loss_key) if isinstance(output, dict) else output
        if value is not None:
            # MONAI's default training step returns the loss still attached to its graph
            self._losses.append(float(value.detach()) if isinstance(value, torch.Tensor) else float(value))

    def _write(self, engine: Engine) -> None:
        if not self._loaded:  # here, after any checkpoint loader has restored the epoch counter
            self._load(engine.state.epoch)
        row = {
            "epoch": float(engine.state.epoch),
            "iteration": float(engine.state.iteration),
            "loss": sum(self._losses) / len(self._losses) if self._losses else math.nan,
            "time_s": self._elapsed + time.perf_counter() - self._start,
        }
        if self.validator is not None and self.validator.state.epoch > 0:
            row.update({k: float(v) for k, v in self.validator.state.metrics.items() if isinstance(v, (int, float))})
        self._losses = []
        self._rows.append(row)
        save_csv(self._rows, self.csv_path)
        self._plot()

    def _plot(self) -> None:
        fig = Figure(figsize=(7, 3.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        x = [r["iteration"] for r in self._rows]
        ax.plot(x, [r["loss"] for r in self._rows], color="tab:blue", label=self.loss_key)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"training {self.loss_key} (epoch mean)", color="tab:blue")
        metrics = sorted({k for r in self._rows for k in r} - {"epoch", "iteration", "loss", "time_s"})
        if metrics:
            twin = ax.twinx()
            for name, colour in zip(metrics, ("tab:orange", "tab:green", "tab:red")):
                points = [(r["iteration"], r[name]) for r in self._rows if name in r]
                twin.plot(*zip(*points), "o-", color=colour, label=name)
            twin.set_ylabel("validation: " + ", ".join(metrics))
            twin.legend(loc="center right")
        fig.tight_layout()
        with atomic_write(self.png_path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)

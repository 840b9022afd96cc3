"""Checkpoints of a training run: the one it resumes from, and the best weights so far."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.config import PathLike

from common.io.writers import atomic_write

__all__ = ["BestWeights", "latest_checkpoint"]


def latest_checkpoint(folder: PathLike, pattern: str = "checkpoint*.pt") -> str:
    """Path of the most recently written file matching ``pattern`` in ``folder``, or ``""`` when there is none."""
    candidates = sorted(Path(folder).glob(pattern), key=lambda p: p.stat().st_mtime) if Path(folder).is_dir() else []
    return str(candidates[-1]) if candidates else ""


class BestWeights:
    """Keep, in one file, the network's state dict at its best validation score so far, across resumed runs.

    MONAI's key-metric :class:`~monai.handlers.CheckpointSaver` forgets its best score when a run is resumed, so the
    first validation after a restart overwrites the best file whatever its score. This handler's best score is part of
    the training checkpoint instead (it has ``state_dict``/``load_state_dict``: list it in the ``load_dict`` of the
    checkpoint saver and loader).

    Args:
        network: the module whose ``state_dict()`` is saved (unwrap ``DistributedDataParallel`` first).
        path: the weights file, written atomically.
        metric: key of the score in the evaluator's ``state.metrics``; higher is better.
    """

    def __init__(self, network: nn.Module, path: PathLike, metric: str = "val_dice") -> None:
        self.network, self.path, self.metric = network, Path(path), metric
        self.best = -math.inf

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        score = float(engine.state.metrics[self.metric])
        if score > self.best:
            self.best = score
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.path) as tmp:
                torch.save(self.network.state_dict(), tmp)

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best = float(state["best"])

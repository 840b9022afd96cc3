"""Checkpoints of a training run: the one it resumes from, and the best weights so far."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.config import PathLike

from common.io.writers import atomic_write

__all__ = ["BestWeights", "TrainingCheckpoint", "held_in", "latest_checkpoint"]

logger = logging.getLogger(__name__)


def _trainer_iteration(path: Path) -> int | None:
    """The trainer iteration stored in a training checkpoint, or None for a file that is not one (or truncated)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return int(state["trainer"]["iteration"])
    except Exception as e:  # a truncated or foreign file must not stop a resume from the others
        logger.warning(f"ignoring {path} when resuming: not a readable training checkpoint ({type(e).__name__})")
        return None


def latest_checkpoint(folder: PathLike, pattern: str = "checkpoint*.pt") -> str:
    """Path of the training checkpoint in ``folder`` (files matching ``pattern``) that reached the furthest trainer
    iteration, or ``""`` when there is none. Files that are not readable checkpoints are skipped with a warning; file
    times play no part, so a copied-in older checkpoint never wins over a newer one."""
    paths = sorted(Path(folder).glob(pattern)) if Path(folder).is_dir() else []
    reached = [(it, str(p)) for p in paths if (it := _trainer_iteration(p)) is not None]
    return max(reached)[1] if reached else ""


def held_in(path: PathLike, load_dict: dict) -> dict:
    """The entries of ``load_dict`` that the checkpoint at ``path`` holds. A state shipped without the optimizer's
    moments (to keep it a few MB) resumes with the optimizer started afresh, which is said in the log, instead of
    failing; without the network or trainer it is no training state at all, a clear error."""
    held = set(torch.load(path, map_location="cpu", weights_only=True))
    missing = [name for name in load_dict if name not in held]
    if "network" in missing or "trainer" in missing:
        raise ValueError(f"{path} is not a training state: it lacks {', '.join(missing)}.")
    if missing:
        logger.warning(f"{path} holds no {', '.join(missing)}: resuming with them started afresh")
    return {name: obj for name, obj in load_dict.items() if name in held}


class TrainingCheckpoint:
    """Save the full training state (``{name: obj.state_dict()}``) to one file every ``interval`` epochs, atomically:
    a run killed while saving leaves the previous checkpoint intact, never a truncated one.

    Args:
        save_dir: folder of the checkpoint.
        save_dict: what to save, e.g. network, optimizer, trainer, :class:`BestWeights`.
        filename: the checkpoint's name; :func:`latest_checkpoint` finds it.
        interval: epochs between saves.
    """

    def __init__(self, save_dir: PathLike, save_dict: dict, filename: str = "checkpoint.pt", interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"interval must be at least 1 epoch, got {interval}.")
        self.path, self.save_dict, self.interval = Path(save_dir) / filename, save_dict, interval

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path) as tmp:
            torch.save({name: obj.state_dict() for name, obj in self.save_dict.items()}, tmp)


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

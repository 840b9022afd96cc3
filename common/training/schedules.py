"""Learning-rate schedules that survive stopping and resuming a training run."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events

__all__ = ["EpochStepLearningRate"]

logger = logging.getLogger(__name__)


class EpochStepLearningRate:
    """Multiply the learning rate by ``gamma`` at each milestone epoch, computed from the trainer's epoch.

    Unlike ``torch.optim.lr_scheduler.MultiStepLR``, the rate is a function of ``engine.state.epoch`` alone, so a run
    resumed from any checkpoint (including one saved before the schedule existed, whose optimizer state holds the
    old rate) trains each epoch at the rate a run from scratch would have used.

    Args:
        optimizer: its parameter groups' rates at construction are the base rates.
        milestones: increasing numbers of completed epochs after which the rate drops by ``gamma``, as in
            ``MultiStepLR``: ``[14]`` trains epochs 1–14 at the base rate and 15 onwards at ``base * gamma``.
        gamma: factor per milestone passed, in (0, 1].
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float = 0.1) -> None:
        milestones = [int(m) for m in milestones]
        if any(m < 0 for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"milestones must be increasing epoch counts >= 0, got {milestones}.")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}.")
        self.optimizer, self.milestones, self.gamma = optimizer, milestones, float(gamma)
        self.base_rates = [float(group["lr"]) for group in optimizer.param_groups]

    def rate_factor(self, epochs_done: int) -> float:
        """The factor on the base rates for the epoch that follows ``epochs_done`` completed ones."""
        return self.gamma ** bisect.bisect_right(self.milestones, epochs_done)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        factor = self.rate_factor(engine.state.epoch - 1)
        for group, base in zip(self.optimizer.param_groups, self.base_rates):
            if group["lr"] != base * factor:
                logger.info(f"epoch {engine.state.epoch}: learning rate {group['lr']:.3g} -> {base * factor:.3g}")
            group["lr"] = base * factor

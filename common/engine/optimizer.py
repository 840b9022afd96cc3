"""An ignite engine for per-pair (instance) optimisation: one iteration per optimiser step."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping, ProgressBar, TimeLimit

logger = logging.getLogger(__name__)


def adam(params: Iterable[torch.Tensor], lr: float, **kwargs) -> torch.optim.Adam:
    """Adam over ``params`` (tensors), with PyTorch's fused kernel where their device has one (CPU, CUDA).

    The fused kernel makes one pass over every parameter per step where the default makes a dozen per tensor: on one
    CPU thread, 10 ms instead of 51 ms a step for a Neural ODE velocity network (3.7 M parameters, AMSGrad), a
    fifth of the time of its whole coarse-level iteration. ``kwargs`` go to :class:`torch.optim.Adam`.
    """
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None, **kwargs)


class BestState:
    """Remembers a module's parameters at the lowest loss seen, to restore them when the optimisation ends.

    Call :meth:`update` with the loss of the *current* parameters, before the optimiser changes them.
    """

    def __init__(self) -> None:
        self.loss = math.inf
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, loss: float, module: nn.Module) -> None:
        if loss < self.loss:
            self.loss = loss
            self.state = copy.deepcopy(module.state_dict())

    def restore(self, module: nn.Module) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)


def create_pair_engine(
    step: Callable[[], dict[str, float]],
    num_iterations: int,
    time_limit_s: float | None = None,
    patience: int = 0,
    tolerance: float = 1e-3,
    smoothing: float = 0.9,
    progress: bool = True,
    description: str = "",
) -> Engine:
    """Engine that calls ``step()`` up to ``num_iterations`` times (run it on ``range(num_iterations)``).

    ``step`` makes one optimiser step and returns a dict of floats with at least ``"loss"``.

    Args:
        time_limit_s: stop once this many seconds have passed (None: no limit).
        patience: stop when the smoothed loss has not improved by ``tolerance`` (relative to its first value) for
            this many iterations; 0 disables convergence stopping.
        smoothing: factor of the exponential moving average of the loss used for convergence.
        progress: show a progress bar with the loss and the estimated time left.
        description: label of the progress bar and the log lines.
    """
    engine = Engine(lambda e, _: step())

    @engine.on(Events.ITERATION_COMPLETED)
    def _smooth(e: Engine) -> None:
        loss = float(e.state.output["loss"])
        if e.state.iteration == 1:
            e.state.ema, e.state.ema_scale, e.state.started = loss, max(abs(loss), 1e-12), time.perf_counter()
        else:
            e.state.ema = smoothing * e.state.ema + (1 - smoothing) * loss
        if e.state.iteration == 4:
            per_it = (time.perf_counter() - e.state.started) / 3
            left = per_it * (num_iterations - 4)
            if time_limit_s is not None:
                left = min(left, time_limit_s)
            logger.info(f"{description}: {per_it:.2f} s per iteration, about {left:.0f} s left for this stage")

    if patience > 0:
        stopper = EarlyStopping(
            patience=patience,
            score_function=lambda e: -e.state.ema / e.state.ema_scale,
            trainer=engine,
            threshold=tolerance,
        )
        stopper.logger.setLevel(logging.WARNING)
        engine.add_event_handler(Events.ITERATION_COMPLETED, stopper)
    if time_limit_s is not None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, TimeLimit(max(1, math.ceil(time_limit_s))))
    if progress:
        ProgressBar(persist=True, desc=description).attach(engine, output_transform=lambda out: {"loss": out["loss"]})
    return engine

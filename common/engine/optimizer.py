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
from torch.optim.adam import adam as functional_adam

logger = logging.getLogger(__name__)


class PairAdam:
    """Adam (optionally AMSGrad) over a fixed list of tensors, for one pair's optimisation: PyTorch's functional Adam
    (:func:`torch.optim.adam.adam`), with its fused kernel where every tensor's device has one (CPU, CUDA).

    The fused kernel makes one pass over every parameter per step where the default makes a dozen per tensor: on one
    CPU thread, 10 ms instead of 51 ms a step for a Neural ODE velocity network (3.7 M parameters, AMSGrad), a fifth
    of the time of its whole coarse-level iteration. It is not a :class:`torch.optim.Optimizer`, whose first
    construction in a process imports ``torch._dynamo`` (0.6-1.1 s on a CPU, a twentieth of a quick 2 mm
    registration).

    Args:
        params: the tensors to optimise (leaf tensors that require grad).
        lr: step size.
        betas: decay rates of the first and second moment estimates.
        eps: added to the denominator.
        amsgrad: use the maximum of the second moment estimates so far.
        warmup: the step size rises linearly to ``lr`` over this many steps (0 or 1: none).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        amsgrad: bool = False,
        warmup: int = 0,
    ) -> None:
        self.params = list(params)
        if lr <= 0 or eps <= 0 or warmup < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"need lr > 0, eps > 0, warmup >= 0 and betas in [0, 1), got {lr}, {eps}, {warmup} and {betas}."
            )
        self.warmup, self.taken = warmup, 0
        self.lr, self.betas, self.eps, self.amsgrad = float(lr), (float(betas[0]), float(betas[1])), eps, amsgrad
        self.fused = bool(self.params) and all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in self.params
        )
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.max_exp_avg_sqs = [torch.zeros_like(p) for p in self.params] if amsgrad else []
        # the fused kernel reads the step count from a float tensor on the parameter's device
        self.steps = [torch.zeros((), device=p.device if self.fused else "cpu") for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step of every tensor that has a gradient."""
        self.taken += 1
        index = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not index:
            return
        functional_adam(
            [self.params[i] for i in index],
            [self.params[i].grad for i in index],
            [self.exp_avgs[i] for i in index],
            [self.exp_avg_sqs[i] for i in index],
            [self.max_exp_avg_sqs[i] for i in index] if self.amsgrad else [],
            [self.steps[i] for i in index],
            foreach=False,
            fused=self.fused,
            amsgrad=self.amsgrad,
            beta1=self.betas[0],
            beta2=self.betas[1],
            lr=self.lr * min(1.0, self.taken / max(self.warmup, 1)),
            weight_decay=0.0,
            eps=self.eps,
            maximize=False,
        )


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

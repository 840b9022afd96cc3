"""A supervised training step whose network may run in bfloat16 on any device."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from ignite.engine import Engine

from common.engine.precision import autocast_bfloat16, check_amp

__all__ = ["SupervisedIteration"]


class SupervisedIteration:
    """One step of a :class:`monai.engines.SupervisedTrainer`: ``loss(network(image), label)``, backward, optimiser
    step. MONAI's own ``amp`` autocasts only on CUDA; here ``amp`` (True, False or ``"auto"``:
    :func:`common.engine.autocast_bfloat16`) runs the network in bfloat16 on a CPU too, while the loss, the gradients'
    accumulation and the optimiser stay in float32 (the prediction is cast back before the loss).

    Returns ignite's usual supervised output: ``{"image", "label", "pred", "loss"}``.
    """

    def __init__(self, amp: bool | str = False) -> None:
        self.amp = check_amp(amp)

    def __call__(self, engine: Engine, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, label = engine.prepare_batch(batch, engine.state.device, engine.non_blocking, **engine.to_kwargs)[:2]
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with autocast_bfloat16(image.device, self.amp):
            pred = engine.network(image)
        loss = engine.loss_function(pred.float(), label)
        loss.backward()
        engine.optimizer.step()
        return {"image": image, "label": label, "pred": pred.detach().float(), "loss": loss.detach()}

"""Training a registration network on synthetic pairs: the pair list, the training step and the validation step."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from ignite.engine import Engine

from common.engine.finetuning import network_fields
from common.engine.precision import check_amp
from common.metrics.overlap import dice_per_label, mean_dict
from common.spatial.fields import warp

__all__ = ["PairDiceIteration", "PairRegistrationIteration", "TransformedPair", "ordered_pairs"]


def ordered_pairs(label_maps: Sequence[str]) -> list[dict[str, str]]:
    """Every ordered pair of two different label maps, as ``{"moving_label": a, "fixed_label": b}`` items."""
    return [{"moving_label": a, "fixed_label": b} for a, b in itertools.permutations(label_maps, 2)]


def _pair(engine: Engine, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(network input [B, 2, X, Y, Z] = (moving, fixed), fixed, moving)`` on the engine's device."""
    moving, fixed = (batch[k].to(engine.state.device, non_blocking=engine.non_blocking) for k in ("moving", "fixed"))
    return torch.cat([moving, fixed], dim=1), fixed, moving


class TransformedPair(nn.Module):
    """A pair network ``[B, 2, X, Y, Z] (moving, fixed) -> ddf`` called on the pair after ``pair_transform`` ``(fixed,
    moving, spacing) -> (fixed, moving, decisions)`` (e.g. :class:`~common.engine.GatedStyleTransfer`), one pair at a
    time: the network trains on what it sees at inference, while the training objective still compares the
    original images (the batch's). Only ``network`` is saved by a training config (``network_def``); the transform is
    rebuilt from its own weights.

    Args:
        network: the network trained.
        pair_transform: the transform, frozen (its modules' parameters are left out of the gradient).
        spacing_mm: the voxel size of the training grid (mm), which the transform is told.
    """

    def __init__(self, network: nn.Module, pair_transform: nn.Module, spacing_mm: float) -> None:
        super().__init__()
        if spacing_mm <= 0:
            raise ValueError(f"spacing_mm must be positive, got {spacing_mm}.")
        self.network, self.pair_transform = network, pair_transform.requires_grad_(False)
        self.spacing = [float(spacing_mm)] * 3

    def forward(self, pair: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        transformed = []
        for item in pair.split(1):
            fixed, moving, _ = self.pair_transform(item[:, 1:], item[:, :1], self.spacing)
            transformed.append(torch.cat([moving, fixed], dim=1))
        return self.network(torch.cat(transformed))


class PairRegistrationIteration:
    """One training step of a network ``[B, 2, X, Y, Z] (moving, fixed) -> ddf [B, 3, X, Y, Z]`` (voxels), or a list of
    such fields, one per refinement stage (coarse to fine; the objective gets them as ``stage_ddfs``, the last as
    ``ddf``).

    The loss is ``engine.loss_function(ddf=..., fixed=..., moving=..., teacher_ddf=..., **known)``
    (a :class:`common.losses.RegistrationObjective`); with a ``teacher`` (a trained network, frozen by
    :func:`common.networks.frozen` and on the training device) its displacement for the same pair is passed on for
    distillation, else None; ``known`` holds what the batch knows of the pair among :attr:`known_keys` (the label maps
    of a synthetic pair, the displacement it was made with).

    With ``amp`` (True, False or ``"auto"``: :func:`common.engine.network_fields`) the networks run in bfloat16, the
    loss and the optimiser in float32: on a CPU with native bfloat16 a U-Net's step takes about 40 % of its float32 time.
    """

    known_keys = ("fixed_label", "moving_label", "target_ddf")

    def __init__(self, teacher: nn.Module | None = None, amp: bool | str = False) -> None:
        self.teacher, self.amp = teacher, check_amp(amp)

    def __call__(self, engine: Engine, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        pair, fixed, moving = _pair(engine, batch)
        teacher_ddf = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_ddf = network_fields(self.teacher, pair, self.amp)[-1]
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        known = {k: batch[k].to(fixed.device) for k in self.known_keys if k in batch}
        stages = network_fields(engine.network, pair, self.amp)
        loss = engine.loss_function(
            ddf=stages[-1], stage_ddfs=stages, fixed=fixed, moving=moving, teacher_ddf=teacher_ddf, **known
        )
        loss.backward()
        engine.optimizer.step()
        return {"loss": loss.item(), **engine.loss_function.values}


class PairDiceIteration:
    """One validation step: mean Dice between the fixed label map and the moving one warped (nearest neighbour) by the
    network's displacement (the last stage's, for a network of several), over the labels present in both; also the Dice
    before registration. ``amp`` as in :class:`PairRegistrationIteration`."""

    def __init__(self, amp: bool | str = False) -> None:
        self.amp = check_amp(amp)

    def __call__(self, engine: Engine, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        pair, _, _ = _pair(engine, batch)
        engine.network.eval()
        with torch.no_grad():
            ddf = network_fields(engine.network, pair, self.amp)[-1]
            moving_label = batch["moving_label"].to(ddf.device).float()
            warped = warp(moving_label, ddf, mode="nearest")
        fixed_label = batch["fixed_label"]
        scores = [
            (mean_dict(dice_per_label(w[0].cpu(), f[0])), mean_dict(dice_per_label(m[0].cpu(), f[0])))
            for w, m, f in zip(warped, moving_label, fixed_label)
        ]
        return {"dice": sum(s[0] for s in scores) / len(scores), "dice_before": sum(s[1] for s in scores) / len(scores)}

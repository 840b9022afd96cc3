"""Test-time optimisation: fine-tune a trained registration network on the one pair it registers."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from common.losses.objective import RegistrationObjective
from common.spatial.fields import invert_ddf, resize_ddf, stage_fields
from common.transforms import ScaleIntensityRangePercentiles

from .optimizer import BestState, PairAdam, create_pair_engine
from .precision import autocast_bfloat16, check_amp
from .protocols import MultiStartModel, RegistrationResult, RegistrationStats
from .registration import downsample_image

if TYPE_CHECKING:
    from .gate import AnatomyGate


def network_fields(network: nn.Module, pair: torch.Tensor, amp: bool | str = False) -> list[torch.Tensor]:
    """The displacements ``[B, 3, X, Y, Z]`` of ``network`` for ``pair``, one per stage (one for a single-stage
    network), in float32. With ``amp`` the network runs in bfloat16 (:func:`~common.engine.autocast_bfloat16`);
    whatever consumes the fields (losses, optimiser) stays in float32."""
    with autocast_bfloat16(pair.device, amp):
        fields = network(pair)
    return [f.float() for f in stage_fields(fields)]


def working_shape(
    shape: Sequence[int], spacing: Sequence[float], spacing_mm: float | None, multiple: int
) -> tuple[int, ...]:
    """The grid a network works on: the field of view of ``shape`` at ``spacing`` mm, at ``spacing_mm`` (None: the
    image's own voxel size), each side rounded up to a multiple of ``multiple`` voxels."""
    sides = [n if spacing_mm is None else n * s / spacing_mm for n, s in zip(shape, spacing)]
    return tuple(max(multiple, multiple * math.ceil(side / multiple - 1e-6)) for side in sides)


class TestTimeOptimizationInferer(Inferer):
    """Register a pair with a trained network ``[B, 2, X, Y, Z] (moving, fixed) -> ddf [B, 3, X, Y, Z]``, first
    fine-tuned on that pair alone (the TTO of TTO-KD).

    Both images are scaled to ``[0, 1]`` (0.5 and 99.5 percentiles) and resampled, field of view matched corner to
    corner, onto :func:`working_shape`; a copy of the network is optimised with ``objective`` by Adam for at most
    ``iterations`` steps or ``time_budget_s`` seconds, whichever comes first; the parameters at the lowest loss give
    the displacement, resampled onto the image grid. The network given is left unchanged.

    A network may return a list of fields, one per refinement stage, coarse to fine: the last is the displacement, and
    the objective also gets the list as ``stage_ddfs``.

    Args:
        network: the trained network; it is copied, never changed.
        objective: the :class:`~common.losses.RegistrationObjective` minimised, given ``ddf``, ``fixed`` and ``moving``
            on the working grid (and ``stage_ddfs``, above).
        iterations: optimisation steps; 0 uses the network as trained (no TTO).
        time_budget_s: stop after this many seconds (None: no limit).
        learning_rate: Adam learning rate.
        warmup_steps: the learning rate rises linearly from ``learning_rate / warmup_steps`` to ``learning_rate`` over
            these first steps (0: constant).
        spacing_mm: voxel size of the working grid (the one the network was trained at); None keeps the image's.
        multiple: the working grid's sides are multiples of this (16 for a U-Net with four poolings).
        progress: show a progress bar.
        normalize: intensity transform of each image; None: the 0.5 and 99.5 percentiles mapped to 0 and 1, clipped.
        pair_transform: ``(fixed, moving, spacing) -> (fixed, moving, decisions)`` applied once to the pair on the
            working grid before anything else sees it (e.g. :class:`~common.engine.GatedStyleTransfer`); the network
            and the objective get its output, the decisions go to the result's stats.
        objective_pair: what the objective compares: the ``"transformed"`` pair (as the network sees it) or the
            ``"original"`` one (the network alone sees the transform's output: e.g. a frozen backbone gets a
            style-transferred pair while the similarity keeps every detail of the images themselves).
        amp: run the network in bfloat16 (True, False or ``"auto"``: see :func:`network_fields`).
        select_start: a network with several starts (:class:`~common.engine.MultiStartModel`) begins the pair from the
            one whose field (its last stage's) has the lowest objective before any step (its ``decisions``: ``start``
            and each start's loss): e.g. the identity for two scans of one anatomy, whose small differences a backbone
            trained across subjects would exaggerate; False: from the network's own ``start``.
        start_objectives: the objective optimised from a given start (by name) instead of ``objective``, e.g. a
            stronger regulariser from the identity, where a pair that starts there holds one anatomy; the choice of
            start always compares ``objective``.
        start_margins: a start (by name) preferred by this fraction of its loss's magnitude: it is chosen unless
            another start's loss is lower than its own by more than that (e.g. ``{"identity": 0.2}``: the identity
            unless the backbone's field fits at least 20 % better; a backbone that aligns two subjects far better
            beats it, while on scans of one anatomy a few percent are what it gains by explaining noise).
        anatomy_gate: an :class:`~common.engine.AnatomyGate`: a pair it finds to show one anatomy (as it arrives)
            starts from ``same_anatomy_start`` without trying the others (no backbone to run for a start it would not
            take); other pairs as ``select_start`` says. Its decisions: ``same_anatomy``, ``anatomy_nmi``.
        same_anatomy_start: the start of such a pair.
        iteration_rules: ``{"when": {decision: value, ...}, "iterations": n}`` items: the first whose ``when`` the pair's
            decisions (the pair transform's and the chosen ``start``) all match sets its number of steps instead of
            ``iterations``; e.g. ``{"when": {"start": "backbone", "style_transfer": true}, "iterations": 0}`` leaves
            a cross-contrast pair that the backbone aligns as the backbone registered it.
    """

    def __init__(
        self,
        network: nn.Module,
        objective: RegistrationObjective,
        iterations: int = 100,
        time_budget_s: float | None = 60.0,
        learning_rate: float = 1e-3,
        warmup_steps: int = 0,
        spacing_mm: float | None = None,
        multiple: int = 16,
        progress: bool = True,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
        pair_transform: nn.Module | None = None,
        objective_pair: str = "transformed",
        amp: bool | str = False,
        select_start: bool = False,
        start_objectives: Mapping[str, RegistrationObjective] | None = None,
        start_margins: Mapping[str, float] | None = None,
        anatomy_gate: AnatomyGate | None = None,
        same_anatomy_start: str = "identity",
        iteration_rules: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__()
        if anatomy_gate is not None and same_anatomy_start not in getattr(network, "starts", ()):
            raise ValueError(
                f"anatomy_gate needs a network with the start {same_anatomy_start!r}, got {type(network).__name__}."
            )
        self.anatomy_gate, self.same_anatomy_start = anatomy_gate, same_anatomy_start
        if (select_start or start_objectives or start_margins) and not isinstance(network, MultiStartModel):
            raise ValueError(
                "select_start, start_objectives and start_margins need a network with several starts, got "
                f"{type(network).__name__}."
            )
        for name, named in (("start_objectives", start_objectives), ("start_margins", start_margins)):
            unknown = set(named or {}) - set(getattr(network, "starts", ()))
            if unknown:
                raise ValueError(f"{name} names starts the network lacks: {sorted(unknown)}.")
        if any(margin < 0 for margin in (start_margins or {}).values()):
            raise ValueError(f"start_margins must not be negative, got {dict(start_margins)}.")
        for rule in iteration_rules:
            if set(rule) != {"when", "iterations"} or not isinstance(rule["when"], Mapping) or rule["iterations"] < 0:
                raise ValueError(f"an iteration rule is {{'when': {{...}}, 'iterations': n >= 0}}, got {rule}.")
        if iterations < 0:
            raise ValueError(f"iterations must not be negative, got {iterations}.")
        self.iteration_rules = [{"when": dict(r["when"]), "iterations": int(r["iterations"])} for r in iteration_rules]
        self.select_start, self.start_objectives = select_start, dict(start_objectives or {})
        self.start_margins = {name: float(margin) for name, margin in (start_margins or {}).items()}
        if objective_pair not in ("transformed", "original"):
            raise ValueError(f"objective_pair must be transformed or original, got {objective_pair!r}.")
        self.objective_pair = objective_pair
        self.network = network
        self.objective, self.iterations, self.time_budget_s = objective, iterations, time_budget_s
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must not be negative, got {warmup_steps}.")
        self.learning_rate, self.spacing_mm, self.multiple = learning_rate, spacing_mm, multiple
        self.warmup_steps = warmup_steps
        self.progress = progress
        self.normalize = normalize or ScaleIntensityRangePercentiles(0.5, 99.5, b_min=0.0, b_max=1.0, clip=True)
        self.pair_transform = pair_transform
        self.amp = check_amp(amp)

    def __call__(  # type: ignore[override]
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        spacing: Sequence[float],
        fixed_mask: torch.Tensor | None = None,
        moving_mask: torch.Tensor | None = None,
    ) -> RegistrationResult:
        """Register ``moving`` to ``fixed``, both ``[1, 1, X, Y, Z]`` on one grid of voxel size ``spacing`` mm, the
        fine-tuning comparing them only inside the masks given (``[1, 1, X, Y, Z]``, 1 inside, on that grid; the
        moving one before warping); the result's grid is the working grid."""
        shape = tuple(fixed.shape[2:])
        grid = working_shape(shape, spacing, self.spacing_mm, self.multiple)
        fixed_w, moving_w = (
            downsample_image(convert_to_tensor(self.normalize(x.float()), track_meta=False), grid)
            for x in (fixed, moving)
        )
        masks = {
            key: downsample_image(mask.float(), grid)
            for key, mask in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask))
            if mask is not None
        }
        stats = RegistrationStats(iterations=[0], grid=list(grid))
        images = {"fixed": fixed_w, "moving": moving_w}
        if self.pair_transform is not None:
            working_spacing = [s * n / g for s, n, g in zip(spacing, shape, grid)]
            self.pair_transform.to(fixed.device)
            fixed_w, moving_w, stats.decisions = self.pair_transform(fixed_w, moving_w, working_spacing)
        if self.objective_pair == "transformed":
            images = {"fixed": fixed_w, "moving": moving_w}
        pair = torch.cat([moving_w, fixed_w], dim=1)
        model = copy.deepcopy(self.network).to(fixed.device).train()
        start = time.perf_counter()
        one_anatomy = False
        if self.anatomy_gate is not None:
            one_anatomy, nmi = self.anatomy_gate(fixed.float(), moving.float(), fixed_mask)
            stats.decisions.update({"same_anatomy": one_anatomy, "anatomy_nmi": round(nmi, 4)})
        if one_anatomy:
            model.start = stats.decisions["start"] = self.same_anatomy_start
        elif self.select_start:
            stats.decisions.update(self._select_start(model, pair, images, masks))
        objective = self.start_objectives.get(getattr(model, "start", None), self.objective)
        iterations = self._iterations(stats.decisions)
        if iterations > 0:
            optimizer = PairAdam(
                [p for p in model.parameters() if p.requires_grad], lr=self.learning_rate, warmup=self.warmup_steps
            )
            best = BestState()

            def step() -> dict[str, float]:
                optimizer.zero_grad()
                fields = network_fields(model, pair, self.amp)
                loss = objective(ddf=fields[-1], stage_ddfs=fields, **images, **masks)
                loss.backward()
                best.update(loss.item(), model)
                optimizer.step()
                return {"loss": loss.item()}

            engine = create_pair_engine(
                step,
                iterations,
                time_limit_s=self.time_budget_s,
                progress=self.progress,
                description=f"test-time optimisation ({'x'.join(map(str, grid))})",
            )
            engine.run(range(iterations), max_epochs=1)
            best.restore(model)
            stats.iterations, stats.final_loss = [engine.state.iteration], best.loss
        stats.stage_time_s = [time.perf_counter() - start]
        with torch.no_grad():
            ddf = network_fields(model.eval(), pair, self.amp)[-1]
            return RegistrationResult(resize_ddf(ddf, shape), stats, resize_ddf(invert_ddf(ddf), shape))

    def _iterations(self, decisions: Mapping[str, Any]) -> int:
        """The number of steps for a pair with these decisions: the first matching rule's, else ``iterations``."""
        for rule in self.iteration_rules:
            if all(name in decisions and decisions[name] == value for name, value in rule["when"].items()):
                return rule["iterations"]
        return self.iterations

    def _select_start(
        self, model: nn.Module, pair: torch.Tensor, images: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
    ) -> dict[str, float | str]:
        """Set ``model.start`` to the start with the lowest objective on this pair, less its margin; the losses, for the
        report."""
        losses = {}
        with torch.no_grad():
            for name in model.starts:
                model.start = name
                fields = network_fields(model, pair, self.amp)
                # the result is the last stage's field: starts that run different numbers of stages compare alike
                losses[name] = float(self.objective(ddf=fields[-1], stage_ddfs=fields[-1:], **images, **masks))
        model.start = min(losses, key=lambda name: losses[name] - self.start_margins.get(name, 0.0) * abs(losses[name]))
        return {"start": model.start} | {f"start_loss_{name}": loss for name, loss in losses.items()}

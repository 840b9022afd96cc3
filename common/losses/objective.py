"""One registration objective for every engine: named loss terms with weights, each reading the inputs it names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.layers import GaussianFilter

from common.spatial.fields import warp

from .reduction import MaskedVoxelMean

__all__ = [
    "DescriptorSimilarity",
    "EndPointErrorLoss",
    "EngineTerm",
    "ImageSimilarity",
    "RegistrationObjective",
    "RegistrationTerm",
    "StageSimilarity",
    "TeacherDistillationLoss",
    "WarpedLabelDiceLoss",
    "joint_one_hot",
    "pair_mask",
]


@runtime_checkable
class RegistrationTerm(Protocol):
    """A loss term: a module whose ``forward`` takes, in order, the objective's inputs named by ``inputs``."""

    inputs: tuple[str, ...]

    def __call__(self, *args: torch.Tensor) -> torch.Tensor: ...


class EngineTerm(nn.Module):
    """A term its engine computes itself and passes in by name (e.g. a similarity of randomly sampled voxels)."""

    def __init__(self, name: str = "similarity") -> None:
        super().__init__()
        self.inputs = (name,)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value


class ImageSimilarity(nn.Module):
    """``similarity(warped, fixed)``: a similarity loss of the warped moving image and the fixed image; given the
    objective's ``mask`` (the pair's masks), ``similarity(warped, fixed, mask=mask)``, inside it only."""

    inputs = ("warped", "fixed")
    optional_inputs = ("mask",)

    def __init__(self, similarity: nn.Module) -> None:
        super().__init__()
        self.similarity = similarity

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return self.similarity(warped, fixed)
        return self.similarity(warped, fixed, mask=mask)


class DescriptorSimilarity(nn.Module):
    """Mean squared difference of local descriptors (e.g. MIND-SSC, ``[B, C, X, Y, Z]``) of the fixed image and of the
    moving image, the moving one's descriptor warped by ``ddf``; given the objective's ``mask``, inside it only.

    Descriptors compare local self-similarity rather than intensities, so their squared difference is a dense,
    contrast-independent similarity (``node_mind``'s); warping the moving descriptor instead of recomputing it on the
    warped image is equal for smooth fields and costs one warp. The images carry no gradient, so both descriptors are
    computed without one, and kept while the same, unchanged image tensors come back (an optimiser's iterations on one
    pair).

    Args:
        descriptor: module ``[B, 1, X, Y, Z] -> [B, C, X, Y, Z]``.
    """

    inputs = ("ddf", "moving", "fixed")
    optional_inputs = ("mask",)

    def __init__(self, descriptor: nn.Module) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.mean = MaskedVoxelMean(nn.MSELoss(reduction="none"))
        self._described: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def _describe(self, name: str, image: torch.Tensor) -> torch.Tensor:
        kept = self._described.get(name)
        if kept is None or kept[0] is not image or kept[1] != image._version:
            with torch.no_grad():
                kept = (image, image._version, self.descriptor(image))
            self._described[name] = kept
        return kept[2]

    def forward(
        self, ddf: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        moving_d, fixed_d = self._describe("moving", moving), self._describe("fixed", fixed)
        return self.mean(warp(moving_d, ddf), fixed_d, mask=mask)


def pair_mask(
    ddf: torch.Tensor, fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Where a similarity compares the pair: ``fixed_mask`` times ``moving_mask`` warped by ``ddf`` (``[B, 1, X, Y,
    Z]``, 1 inside; the moving one before warping), either alone when the other is None. No gradient: the field is not
    rewarded for moving the mask."""
    if fixed_mask is None and moving_mask is None:
        raise ValueError("pair_mask needs fixed_mask, moving_mask or both.")
    with torch.no_grad():
        mask = None if fixed_mask is None else fixed_mask.float()
        if moving_mask is not None:
            warped = warp(moving_mask.float(), ddf, padding_mode="zeros")
            mask = warped if mask is None else mask * warped
        return mask


class StageSimilarity(nn.Module):
    """``sum_s similarity(m∘u_s, f)`` over the fields ``stage_ddfs`` of a multi-stage network (coarse to fine): every
    stage's field is held to the images, not only the last (the adapter's refiners). Given the pair's masks, each
    stage compares the images inside :func:`pair_mask` of its own field (the similarity then takes ``mask=``)."""

    inputs = ("stage_ddfs", "moving", "fixed")
    optional_inputs = ("fixed_mask", "moving_mask")

    def __init__(self, similarity: nn.Module) -> None:
        super().__init__()
        self.similarity = similarity

    def forward(
        self,
        stage_ddfs: list[torch.Tensor],
        moving: torch.Tensor,
        fixed: torch.Tensor,
        fixed_mask: torch.Tensor | None = None,
        moving_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        values = []
        for ddf in stage_ddfs:
            if fixed_mask is None and moving_mask is None:
                values.append(self.similarity(warp(moving, ddf), fixed))
            else:
                mask = pair_mask(ddf, fixed_mask, moving_mask)
                values.append(self.similarity(warp(moving, ddf), fixed, mask=mask))
        return torch.stack(values).sum()


class TeacherDistillationLoss(nn.Module):
    """``similarity(m∘u, m∘u_T)``: how far the moving image warped by ``ddf`` is from it warped by a teacher's
    displacement ``teacher_ddf`` (TTO-KD's distillation; no gradient reaches the teacher)."""

    inputs = ("warped", "moving", "teacher_ddf")

    def __init__(self, similarity: nn.Module) -> None:
        super().__init__()
        self.similarity = similarity

    def forward(self, warped: torch.Tensor, moving: torch.Tensor, teacher_ddf: torch.Tensor) -> torch.Tensor:
        return self.similarity(warped, warp(moving, teacher_ddf.detach()))


def joint_one_hot(*label_maps: torch.Tensor) -> list[torch.Tensor]:
    """One-hot encodings ``[B, L, X, Y, Z]`` of label maps ``[B, 1, X, Y, Z]`` (any label values) over the ``L`` values
    present in any of them, in one channel order, background (the smallest value) first; on the maps' device."""
    values = torch.unique(torch.cat([m.flatten() for m in label_maps]))
    encoded = []
    for m in label_maps:
        index = torch.searchsorted(values, m[:, 0].contiguous())
        encoded.append(torch.movedim(F.one_hot(index, len(values)), -1, 1).float())
    return encoded


class WarpedLabelDiceLoss(nn.Module):
    """One minus the soft Dice of the fixed label map and the one-hot moving label map warped (trilinearly) by
    ``ddf``, over the foreground labels of either map (SynthMorph's training loss on synthetic pairs)."""

    inputs = ("ddf", "fixed_label", "moving_label")

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(include_background=False)

    def forward(self, ddf: torch.Tensor, fixed_label: torch.Tensor, moving_label: torch.Tensor) -> torch.Tensor:
        fixed_onehot, moving_onehot = joint_one_hot(fixed_label, moving_label)
        return self.dice(warp(moving_onehot, ddf), fixed_onehot)


class EndPointErrorLoss(nn.Module):
    """Mean end-point error (voxels) of ``ddf`` against a reference displacement (no gradient reaches it).

    Args:
        target: the input holding the reference: ``"target_ddf"`` (a known displacement) or ``"teacher_ddf"`` (a
            teacher's, to distil its field directly).
    """

    def __init__(self, target: str = "target_ddf") -> None:
        super().__init__()
        self.inputs = ("ddf", target)

    def forward(self, ddf: torch.Tensor, target_ddf: torch.Tensor) -> torch.Tensor:
        # the small constant keeps the gradient of the norm finite where the error is exactly 0
        return ((ddf - target_ddf.detach()).pow(2).sum(1) + 1e-6).sqrt().mean()


class RegistrationObjective(nn.Module):
    """``sum_k w_k term_k(inputs)``: the loss every engine minimises (instance optimisation, test-time optimisation,
    training), its terms and weights declared in the bundle's config.

    Each term (:class:`RegistrationTerm`) reads the inputs it names (and, when present, its ``optional_inputs``, by
    keyword) from those the engine passes, e.g. ``ddf``
    ``[B, 3, X, Y, Z]`` (voxels, pull-back), ``fixed`` and ``moving`` ``[B, 1, X, Y, Z]``, ``velocity``, a teacher's
    ``teacher_ddf``, label maps, a known ``target_ddf``, or a value the engine computed itself (:class:`EngineTerm`).
    Given ``fixed``, ``moving`` and ``ddf``, the objective smooths both images (``image_sigma``) and derives ``warped``
    (``moving`` warped by ``ddf``) when a term reads it and the engine did not pass it; given ``fixed_mask`` and/or
    ``moving_mask`` ``[B, 1, X, Y, Z]`` (1 inside; the moving one before warping), it derives ``mask``, their product
    after warping the moving one by ``ddf`` (no gradient: the field is not rewarded for moving the mask). Terms weighted 0 are not
    computed. The last value of each term is kept in :attr:`values`, for logging.

    Args:
        terms: name -> term, in the order they are summed.
        weights: name -> weight, one per term.
        image_sigma: Gaussian smoothing (voxels) of ``fixed`` and ``moving`` before warping and comparing; 0 disables
            it. Without it, interpolation blurs noise away and MI rewards sub-voxel shifts that align nothing.
    """

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float], image_sigma: float = 0.0) -> None:
        super().__init__()
        if set(terms) != set(weights):
            raise ValueError(f"one weight per term: terms {sorted(terms)}, weights {sorted(weights)}.")
        for name, term in terms.items():
            if not isinstance(term, RegistrationTerm):
                raise TypeError(f"term {name!r} ({type(term).__name__}) does not say which inputs it reads (inputs).")
        if not any(weights.values()):
            raise ValueError("at least one weight of the objective must be non-zero.")
        self.terms = nn.ModuleDict(terms)
        self.weights = {name: float(weights[name]) for name in terms}
        self.smooth_images = GaussianFilter(3, image_sigma) if image_sigma > 0 else None
        self.values: dict[str, float] = {}

    def needs(self, name: str) -> bool:
        """Whether a term weighted above 0 reads input ``name``."""
        return any(self.weights[k] and name in term.inputs for k, term in self.terms.items())

    def forward(self, **inputs: torch.Tensor | None) -> torch.Tensor:
        active = {name: term for name, term in self.terms.items() if self.weights[name]}
        available = {k: v for k, v in inputs.items() if v is not None}
        if self.smooth_images is not None and "fixed" in available and "moving" in available:
            available["fixed"] = self.smooth_images(available["fixed"])
            available["moving"] = self.smooth_images(available["moving"])
        if "warped" not in available and "moving" in available and "ddf" in available and self.needs("warped"):
            available["warped"] = warp(available["moving"], available["ddf"])
        reads_mask = any("mask" in getattr(term, "optional_inputs", ()) for term in active.values())
        if reads_mask and ("fixed_mask" in available or "moving_mask" in available):
            available["mask"] = pair_mask(available["ddf"], available.get("fixed_mask"), available.get("moving_mask"))
        values = {}
        for name, term in active.items():
            missing = [k for k in term.inputs if k not in available]
            if missing:
                raise ValueError(f"the objective's term {name!r} needs {', '.join(missing)}, which this engine lacks.")
            optional = {k: available[k] for k in getattr(term, "optional_inputs", ()) if k in available}
            values[name] = term(*(available[k] for k in term.inputs), **optional)
        self.values = {name: float(value.detach()) for name, value in values.items()}
        return torch.stack([self.weights[name] * value for name, value in values.items()]).sum()

"""The parts of vfa_brainid_adapter: the VFA and Brain-ID networks (official layouts, safe loading of official-style
checkpoint files, forward contracts), the progressive refiner and the contrast gate."""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.engine import ContrastGate
from common.io import RegistrationInputError, load_image, load_label, resample_to_grid
from common.networks import VFA, BrainIDSynthesizer, DisplacementUNet, ProgressiveRefiner, checkpoint_state_dict
from common.sample import sample_pair
from common.spatial import warp
from common.synthesis import render_contrast


def test_vfa_has_the_official_layout_and_size():
    """The official configuration (4 downsamples, 8 start and matching channels, 64 at most): 2,014,827 parameters,
    103 state-dict keys, and the sample keys' shapes of the public checkpoints."""
    state = VFA().state_dict()
    assert sum(v.numel() for v in state.values()) == 2_014_827 and len(state) == 103
    expected = {
        "encoder.in_conv.weight": (8, 1, 3, 3, 3),
        "encoder.encoder_conv.0.conv1.weight": (16, 8, 3, 3, 3),
        "encoder.decoder_conv.3.conv1.weight": (64, 128, 3, 3, 3),
        "decoder.project.0.weight": (8, 16, 3, 3, 3),
        "decoder.beta": (1,),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert float(state["decoder.beta"]) == pytest.approx(0.1)


def test_brainid_has_the_official_layout_and_size():
    """``f_maps=64``, five levels: 65,870,051 parameters; backbone and T1 head under the official names."""
    state = BrainIDSynthesizer().state_dict()
    assert sum(v.numel() for v in state.values()) == 65_870_051
    assert tuple(state["backbone.encoders.0.basic_module.SingleConv1.conv.weight"].shape) == (32, 1, 3, 3, 3)
    assert tuple(state["backbone.decoders.0.basic_module.SingleConv1.conv.weight"].shape) == (512, 1536, 3, 3, 3)
    assert tuple(state["head.final_conv_image.weight"].shape) == (1, 64, 1, 1, 1)


def test_forward_shapes_and_a_zero_beta_gives_the_identity():
    torch.manual_seed(0)
    net = VFA(downsamples=2, start_channels=4, max_channels=8, matching_channels=4)
    fixed, moving = torch.rand(1, 1, 16, 12, 8), torch.rand(1, 1, 16, 12, 8)
    field = net(fixed, moving)
    assert field.shape == (1, 3, 16, 12, 8) and field.abs().max() <= 1.5 * 0.1 * 3  # three levels of |beta d| < 0.1√3
    with torch.no_grad():
        net.decoder.beta.zero_()
    assert net(fixed, moving).abs().max() < 1e-5
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.rand(1, 1, 10, 12, 8), torch.rand(1, 1, 10, 12, 8))
    synth = BrainIDSynthesizer(f_maps=4, levels=3)
    assert synth(torch.rand(2, 1, 8, 12, 16)).shape == (2, 1, 8, 12, 16)


def test_official_style_checkpoints_load_safely(tmp_path):
    """VFA's ``{epoch, model_state_dict, optimizer_state_dict}`` and Brain-ID's ``{model, args: Namespace, epoch}``
    load with ``weights_only=True``; the Namespace needs the allow-list (plain safe loading refuses it); a file without
    weights gets a clear error."""
    vfa, synth = VFA(downsamples=2, start_channels=4, max_channels=8), BrainIDSynthesizer(f_maps=4, levels=3)
    torch.save({"epoch": 3, "model_state_dict": vfa.state_dict(), "optimizer_state_dict": {}}, tmp_path / "vfa.pth")
    args = argparse.Namespace(lr=1e-4, f_maps=4)
    torch.save({"model": synth.state_dict(), "args": args, "epoch": 7}, tmp_path / "brainid.pth")
    with pytest.raises(Exception, match="Namespace"):
        torch.load(tmp_path / "brainid.pth", weights_only=True)
    for net, name in ((vfa, "vfa.pth"), (synth, "brainid.pth")):
        fresh = type(net)(
            **(
                {"downsamples": 2, "start_channels": 4, "max_channels": 8}
                if name == "vfa.pth"
                else {"f_maps": 4, "levels": 3}
            )
        )
        fresh.load_state_dict(checkpoint_state_dict(str(tmp_path / name)))
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    torch.save({"epoch": 1}, tmp_path / "empty.pth")
    with pytest.raises(RegistrationInputError, match=r"empty\.pth.*no state dict"):
        checkpoint_state_dict(str(tmp_path / "empty.pth"))


def test_an_untrained_refiner_keeps_its_field_and_a_trained_step_moves_it():
    """Output layers near zero: the refined field starts at the given one; the stages are coarse to fine and one
    optimiser step on a similarity changes the field (gradients reach every stage)."""
    torch.manual_seed(0)
    refiner = ProgressiveRefiner(scales=(4, 2, 1), channels=(8, 16))
    fixed, moving = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    start = 0.5 * torch.randn(1, 3, 16, 16, 16)
    fields = refiner(fixed, moving, start)
    assert len(fields) == 3 and (fields[-1] - start).abs().max() < 0.05
    loss = sum((warp(moving, f) - fixed).pow(2).mean() for f in fields)
    loss.backward()
    assert all(
        unet.model[-1].conv.weight.grad.abs().sum() > 0 for unet in refiner.stages if hasattr(unet.model[-1], "conv")
    )
    with pytest.raises(ValueError, match="multiples of 8"):
        refiner(torch.rand(1, 1, 12, 16, 16), torch.rand(1, 1, 12, 16, 16), torch.zeros(1, 3, 12, 16, 16))


def test_the_contrast_gate_transfers_a_t2_against_a_t1_and_not_a_t1():
    """The sample's two label maps (two subjects, 2 mm) rendered T1-like and T2-like: the signed local correlation at
    4 mm is high for T1/T1 and low for T1/T2, so ``auto`` transfers only the second; ``always``/``never`` override
    it."""
    sample = sample_pair()
    fixed = load_image(sample["fixed"])
    moving_label = load_label(sample["moving_label"], load_image(sample["moving"]))
    maps = [
        resample_to_grid(moving_label, moving_label.affine, fixed.affine, fixed.shape[1:], mode="nearest")[0].numpy(),
        load_label(sample["fixed_label"], fixed)[0].numpy(),
    ]
    t1, other_t1, t2 = (
        torch.as_tensor(render_contrast(maps[i], c, seed=s))[None, None].clamp(0, 1)
        for i, c, s in ((0, "t1", 1), (1, "t1", 2), (1, "t2", 3))
    )
    gate = ContrastGate()
    same, cross = gate(other_t1, t1, (2.0, 2.0, 2.0)), gate(t2, t1, (2.0, 2.0, 2.0))
    assert same[0] is False and cross[0] is True and same[1] > 0.6 > cross[1]
    assert ContrastGate("always")(other_t1, t1, (2.0, 2.0, 2.0))[0] is True
    assert ContrastGate("never")(t2, t1, (2.0, 2.0, 2.0))[0] is False
    with pytest.raises(ValueError, match="auto, always or never"):
        ContrastGate("sometimes")


def test_the_refiners_similarity_compares_each_stage_only_inside_the_masks():
    """With a moving mask, what the moving image holds outside it (a bright artefact) changes neither stage's LNCC;
    without masks it does; the masked voxel mean is MONAI's LNCC where the mask is everywhere; a loss that already
    reduces its voxel map is refused."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss
    from monai.networks.layers import GaussianFilter

    from common.losses import MaskedVoxelMean, StageSimilarity

    torch.manual_seed(0)
    moving = GaussianFilter(3, 1.5)(torch.rand(1, 1, 32, 32, 32))
    fixed = moving + 0.01 * torch.rand_like(moving)
    stages = [torch.zeros(1, 3, 32, 32, 32), torch.full((1, 3, 32, 32, 32), 0.4)]
    moving_mask = torch.ones_like(moving)
    moving_mask[..., 2:20, 2:20, 2:20] = 0
    artefact = moving.clone()
    # a textured blob well inside the hole: no window of a voxel inside the mask reaches it, even after the shift
    artefact[..., 7:15, 7:15, 7:15] = 5.0 * torch.rand(8, 8, 8)
    lncc = MaskedVoxelMean(LocalNormalizedCrossCorrelationLoss(kernel_size=5, kernel_type="gaussian", reduction="none"))
    term = StageSimilarity(lncc)
    masked = [term(stages, m, fixed, moving_mask=moving_mask) for m in (moving, artefact)]
    unmasked = [term(stages, m, fixed) for m in (moving, artefact)]
    assert abs(float(masked[0] - masked[1])) < 1e-3 * abs(float(masked[0]))
    assert abs(float(unmasked[0] - unmasked[1])) > 0.03 * abs(float(unmasked[0]))
    reference = LocalNormalizedCrossCorrelationLoss(kernel_size=5, kernel_type="gaussian")
    torch.testing.assert_close(lncc(moving, fixed, mask=torch.ones_like(fixed)), reference(moving, fixed))
    with pytest.raises(ValueError, match="reduction='none'"):
        MaskedVoxelMean(reference)


@pytest.mark.parametrize("amp, with_backbone", [(False, True), (True, True), (False, False)])
def test_the_adapter_refines_a_frozen_backbone_per_pair_and_improves_the_overlap(amp, with_backbone):
    """A tiny untrained VFA, frozen, gives the first field once per pair; 40 steps of the per-pair optimisation of the
    refiners (LNCC with a Gaussian window at every stage + diffusion, 10-step warm-up) raise Dice on a phantom pair
    with a known smooth deformation, and leave the backbone's weights as they were; so do they with the networks in
    bfloat16 (``amp``), and from the identity without a backbone (the longitudinal preset)."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    from common.engine import TestTimeOptimizationInferer
    from common.losses import DisplacementSmoothnessLoss, RegistrationObjective, StageSimilarity
    from common.metrics import dice_per_label, mean_dict
    from common.networks import FrozenBackboneAdapter

    from .conftest import phantom_labels, smooth_field

    torch.manual_seed(0)
    labels = phantom_labels((32, 32, 32))
    moved = warp(labels[None, None].float(), smooth_field(labels.shape, 2.5, seed=3), mode="nearest")[0, 0]
    fixed = torch.as_tensor(render_contrast(labels.numpy(), "t1", seed=1))[None, None]
    moving = torch.as_tensor(render_contrast(moved.numpy(), "t1", seed=2))[None, None]
    backbone = VFA(downsamples=2, start_channels=4, max_channels=8, matching_channels=4)
    calls = []
    backbone.register_forward_hook(lambda *args: calls.append(1))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    refiner = ProgressiveRefiner(scales=(4, 2, 1), channels=(8, 16))
    adapter = FrozenBackboneAdapter(backbone if with_backbone else None, refiner)
    similarity = LocalNormalizedCrossCorrelationLoss(kernel_size=7, kernel_type="gaussian")
    objective = RegistrationObjective(
        {"lncc": StageSimilarity(similarity), "diffusion": DisplacementSmoothnessLoss()},
        {"lncc": 1.0, "diffusion": 1.0},
    )
    inferer = TestTimeOptimizationInferer(
        adapter,
        objective,
        iterations=40,
        time_budget_s=None,
        learning_rate=5e-3,
        warmup_steps=10,
        multiple=16,
        progress=False,
        amp=amp,
    )
    result = inferer(fixed, moving, (1.0, 1.0, 1.0))
    assert result.ddf.dtype == torch.float32
    warped = warp(moved[None, None].float(), result.ddf, mode="nearest")[0, 0]
    dice_before, dice_after = (mean_dict(dice_per_label(x, labels)) for x in (moved, warped))
    assert dice_after > dice_before + 0.02, (dice_before, dice_after)
    assert len(calls) == int(with_backbone)  # once per pair: the optimisation and the final field reuse it
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


class _Invert(torch.nn.Module):
    """A stand-in synthesizer that maps a T2-like image to a T1-like one by inverting it (for a known outcome)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.scale * (1 - image)


def test_the_gated_style_transfer_changes_only_cross_contrast_pairs_and_the_engine_optimises_on_its_output():
    """The gate routes a T1/T2 pair through the synthesizer (frozen: its parameter gets no gradient) and leaves a
    T1/T1 pair alone; the test-time engine gives the network and the objective the transferred pair and writes the
    decision into its stats."""
    from common.engine import GatedStyleTransfer, TestTimeOptimizationInferer
    from common.losses import DisplacementSmoothnessLoss, RegistrationObjective

    labels = torch.as_tensor(load_label(sample_pair()["fixed_label"], load_image(sample_pair()["fixed"]))[0])
    t1, t2 = (torch.as_tensor(render_contrast(labels.numpy(), c, seed=1))[None, None].clamp(0, 1) for c in ("t1", "t2"))
    synth = _Invert()
    transfer = GatedStyleTransfer(synth, ContrastGate())
    fixed, moving, decisions = transfer(t1, t2, (2.0, 2.0, 2.0))
    assert decisions["style_transfer"] is True and decisions["contrast_correlation"] < 0.6 and synth.calls == 2
    assert not synth.scale.requires_grad and torch.allclose(fixed, 1 - t1) and torch.allclose(moving, 1 - t2)
    _, kept, decisions = transfer(t1, t1.clone(), (2.0, 2.0, 2.0))
    assert decisions["style_transfer"] is False and torch.equal(kept, t1) and synth.calls == 2

    class Oracle(torch.nn.Module):
        """Returns the T1 rendering whatever it is given: a perfect synthesizer for this anatomy."""

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return t1

    auto = GatedStyleTransfer(Oracle(), ContrastGate(), transfer="auto")
    kept, _, decisions = auto(t1, t2, (2.0, 2.0, 2.0))
    assert decisions["transferred"] == "moving" and torch.equal(kept, t1), decisions
    assert decisions["fixed_t1_correlation"] > 0.6 > decisions["moving_t1_correlation"]
    _, _, decisions = auto(t2, 1 - t1, (2.0, 2.0, 2.0))  # neither is T1-like
    assert decisions["transferred"] == "both", decisions
    with pytest.raises(ValueError, match="needs a gate"):
        GatedStyleTransfer(Oracle(), None, transfer="auto")
    # the synthesizer in bfloat16 returns float32 images close to its float32 run (mean difference)
    torch.manual_seed(0)
    network, crop = BrainIDSynthesizer(f_maps=4, levels=3), (..., slice(72), slice(80), slice(92))
    exact, half = (
        GatedStyleTransfer(network, ContrastGate(), amp=amp)(t1[crop], t2[crop], (2.0, 2.0, 2.0))
        for amp in (False, True)
    )
    assert half[0].dtype == half[1].dtype == torch.float32 and half[2]["transferred"] == exact[2]["transferred"]
    assert 0 < max(float((h - e).abs().mean()) for h, e in zip(half[:2], exact[:2])) < 0.01
    with pytest.raises(ValueError, match="amp"):
        GatedStyleTransfer(network, ContrastGate(), amp="half")

    seen = {}

    class Record(torch.nn.Module):
        inputs = ("fixed", "moving")

        def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
            seen["pair"] = (fixed.detach(), moving.detach())
            return (fixed - moving).abs().mean()

    network = DisplacementUNet(channels=(4, 4, 4, 4, 4, 4, 4, 4), norm="instance")
    objective = RegistrationObjective(
        {"record": Record(), "smooth": DisplacementSmoothnessLoss()}, {"record": 1.0, "smooth": 1.0}
    )
    inferer = TestTimeOptimizationInferer(
        network, objective, iterations=1, time_budget_s=None, multiple=16, progress=False, pair_transform=transfer
    )
    result = inferer(t1 * 100, t2 * 100, (1.0, 1.0, 1.0))
    assert result.stats.decisions["style_transfer"] is True
    fixed_seen, moving_seen = seen["pair"]
    assert torch.corrcoef(torch.stack([fixed_seen.flatten(), moving_seen.flatten()]))[0, 1] > 0.5  # now alike
    # with objective_pair="original" only the network sees the transferred pair; the objective, the images themselves
    TestTimeOptimizationInferer(
        network,
        objective,
        iterations=1,
        time_budget_s=None,
        multiple=16,
        progress=False,
        pair_transform=transfer,
        objective_pair="original",
    )(t1 * 100, t2 * 100, (1.0, 1.0, 1.0))
    assert torch.allclose(seen["pair"][0], 1 - fixed_seen, atol=1e-6)
    assert torch.allclose(seen["pair"][1], 1 - moving_seen, atol=1e-6)


def test_the_bundle_registers_the_sample_with_untrained_networks_and_says_what_it_decided(tmp_path):
    """The bundle's inference config end to end on the embedded sample (untrained backbone, no synthesizer, three
    refinement steps, a brain mask on the fixed image): the contract's outputs, the decisions (style transfer, start)
    in metrics.json; and without its trained backbone file the user is told how to get one."""
    import json

    from monai.bundle import ConfigWorkflow

    from common.workflow import input_error_cause

    config = str(Path(__file__).resolve().parents[1] / "bundles" / "vfa_brainid_adapter" / "configs" / "inference.json")
    quick = {"synth_weights": "", "inferer#iterations": 3, "progress": False, "save_qc": False, "device": "cpu"}
    sample = sample_pair()
    label = nib.load(sample["fixed_label"])
    fixed_mask = str(tmp_path / "fixed_mask.nii.gz")
    nib.save(nib.Nifti1Image((np.asarray(label.dataobj) > 0).astype(np.uint8), label.affine), fixed_mask)
    workflow = ConfigWorkflow(
        config_file=config,
        workflow_type="infer",
        output_dir=str(tmp_path),
        backbone_weights="",
        fixed=sample["fixed"],
        moving=sample["moving"],
        fixed_mask=fixed_mask,
        **quick,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    decisions = metrics["decisions"]
    assert metrics["bundle"] == "vfa_brainid_adapter" and decisions["style_transfer"] is False
    assert decisions["start"] in ("backbone", "identity") and "start_loss_identity" in decisions
    assert metrics["fixed_mask"] == fixed_mask
    for name in ("warped.nii.gz", "ddf.nii.gz", "inverse_ddf.nii.gz", "jacobian.nii.gz"):
        assert (tmp_path / name).is_file(), name
    missing = ConfigWorkflow(
        config_file=config,
        workflow_type="infer",
        output_dir=str(tmp_path / "b"),
        backbone_weights=str(tmp_path / "x.pt"),
        **quick,
    )
    with pytest.raises(Exception) as error:
        missing.initialize()
        missing.run()
    assert "train them with the bundle's training config" in str(input_error_cause(error.value))


def test_weights_that_do_not_fit_get_a_clear_error_and_extra_heads_are_left_out(tmp_path):
    """A file of another network (or another size) is refused naming what is missing or reshaped; a Brain-ID-style
    checkpoint with one more head than our synthesizer loads, the extra tensors left out."""
    from common.networks import load_weights

    torch.save(BrainIDSynthesizer(f_maps=4, levels=3).state_dict(), tmp_path / "brainid.pt")
    with pytest.raises(RegistrationInputError, match=r"does not fit VFA: 103 of its 103 tensors missing"):
        load_weights(VFA(), str(tmp_path / "brainid.pt"))
    with pytest.raises(RegistrationInputError, match=r"of another shape .* in the file"):
        load_weights(BrainIDSynthesizer(f_maps=8, levels=3), str(tmp_path / "brainid.pt"))
    source = BrainIDSynthesizer(f_maps=4, levels=3)
    state = {**source.state_dict(), "head.final_conv_seg.weight": torch.zeros(3, 4, 1, 1, 1)}
    torch.save({"model": state, "args": argparse.Namespace(f_maps=4)}, tmp_path / "official_style.pth")
    loaded = load_weights(BrainIDSynthesizer(f_maps=4, levels=3), str(tmp_path / "official_style.pth"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))


class _Shift(torch.nn.Module):
    """A stand-in frozen backbone that predicts one constant displacement, whatever the pair (a known start)."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return torch.full((fixed.shape[0], 3, *fixed.shape[2:]), self.shift)


def _shifted_pair_engine(true_shift: float, **options):
    """Phantom labels, a T1-like pair of them ``true_shift`` voxels apart along every axis, and an engine whose adapter
    starts from a stand-in backbone that moves everything by 2 voxels."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    from common.engine import TestTimeOptimizationInferer
    from common.losses import DisplacementSmoothnessLoss, RegistrationObjective, StageSimilarity
    from common.networks import FrozenBackboneAdapter

    from .conftest import phantom_labels

    labels = phantom_labels((32, 32, 32))
    true_ddf = torch.full((1, 3, 32, 32, 32), true_shift)
    moved = warp(labels[None, None].float(), -true_ddf, mode="nearest")[0, 0]
    fixed = torch.as_tensor(render_contrast(labels.numpy(), "t1", seed=1))[None, None]
    moving = torch.as_tensor(render_contrast(moved.numpy(), "t1", seed=2))[None, None]
    adapter = FrozenBackboneAdapter(_Shift(2.0), ProgressiveRefiner(scales=(4, 2, 1), channels=(8, 16)))
    similarity = LocalNormalizedCrossCorrelationLoss(kernel_size=7, kernel_type="gaussian")
    objective = RegistrationObjective(
        {"lncc": StageSimilarity(similarity), "diffusion": DisplacementSmoothnessLoss()},
        {"lncc": 1.0, "diffusion": 1.0},
    )
    inferer = TestTimeOptimizationInferer(
        adapter, objective, time_budget_s=None, multiple=16, progress=False, select_start=True, **options
    )
    return labels, true_ddf, fixed, moving, adapter, objective, inferer


@pytest.mark.parametrize("true_shift, expected", [(0.0, "identity"), (2.0, "backbone")])
def test_the_refiners_start_from_whichever_of_backbone_and_identity_fits_the_pair_better(true_shift, expected):
    """With ``select_start`` the engine compares the objective at the backbone's field and at the identity before
    any step: two renderings of one anatomy start from the identity (a backbone that moves everything by 2 voxels
    would add that error), a pair that really is 2 voxels apart from the backbone; the choice and both losses are in
    the stats, and the field found is near the true one."""
    from common.engine import TestTimeOptimizationInferer

    labels, true_ddf, fixed, moving, adapter, objective, inferer = _shifted_pair_engine(true_shift, iterations=5)
    result = inferer(fixed, moving, (1.0, 1.0, 1.0))
    decisions = result.stats.decisions
    assert decisions["start"] == expected and adapter.start == "backbone"  # the engine's copy changed, not the network
    assert set(decisions) >= {"start_loss_backbone", "start_loss_identity"}
    inside = labels > 0
    error = (result.ddf - true_ddf).norm(dim=1)[0][inside].mean()
    assert error < 0.5, float(error)
    with pytest.raises(ValueError, match="several starts"):
        TestTimeOptimizationInferer(ProgressiveRefiner(), objective, select_start=True)


def test_a_margin_keeps_the_identity_unless_the_backbone_fits_clearly_better():
    """``start_margins``: the identity is preferred by a fraction of its loss. On a pair 2 voxels apart the
    backbone's field fits far better than the identity, so a margin of 20 % still starts from it; a margin larger
    than that gain keeps the identity. Margins for starts the network lacks, or below zero, are refused."""
    from common.engine import TestTimeOptimizationInferer

    _, _, fixed, moving, _, objective, inferer = _shifted_pair_engine(
        2.0, iterations=0, start_margins={"identity": 0.2}
    )
    decisions = inferer(fixed, moving, (1.0, 1.0, 1.0)).stats.decisions
    backbone, identity = decisions["start_loss_backbone"], decisions["start_loss_identity"]
    assert decisions["start"] == "backbone" and backbone < identity - 0.2 * abs(identity)
    gain = (identity - backbone) / abs(identity)
    inferer.start_margins = {"identity": 1.5 * gain}
    assert inferer(fixed, moving, (1.0, 1.0, 1.0)).stats.decisions["start"] == "identity"
    adapter = inferer.network
    with pytest.raises(ValueError, match="start_margins names starts the network lacks"):
        TestTimeOptimizationInferer(adapter, objective, select_start=True, start_margins={"convex": 0.1})
    with pytest.raises(ValueError, match="must not be negative"):
        TestTimeOptimizationInferer(adapter, objective, select_start=True, start_margins={"identity": -0.1})


def test_iteration_rules_leave_a_cross_contrast_backbone_start_as_the_backbone_registered_it():
    """``iteration_rules``: a pair that starts from the backbone and was style-transferred takes no step (its field is
    the backbone's, 2 voxels everywhere); the same pair without that decision, and a pair of one anatomy (identity
    start), are still refined for ``iterations``. Malformed rules and negative counts are refused."""
    from common.engine import TestTimeOptimizationInferer

    rules = [{"when": {"start": "backbone", "style_transfer": True}, "iterations": 0}]
    for true_shift, transferred, start, steps in (
        (2.0, True, "backbone", 0),
        (2.0, False, "backbone", 4),
        (0.0, True, "identity", 4),
    ):
        *_, fixed, moving, adapter, objective, inferer = _shifted_pair_engine(
            true_shift, iterations=4, iteration_rules=rules, pair_transform=_Decide(style_transfer=transferred)
        )
        result = inferer(fixed, moving, (1.0, 1.0, 1.0))
        assert result.stats.decisions["start"] == start and result.stats.iterations == [steps]
        if steps == 0:
            torch.testing.assert_close(result.ddf, torch.full_like(result.ddf, 2.0), atol=1e-2, rtol=0)
    for bad in ({"when": {"start": "backbone"}, "iterations": -1}, {"start": "backbone", "iterations": 0}):
        with pytest.raises(ValueError, match="an iteration rule is"):
            TestTimeOptimizationInferer(adapter, objective, iteration_rules=[bad])


def test_the_identity_start_can_leave_out_the_finest_refiner():
    """``start_stages``: from the identity the adapter runs only the two coarser refiners (the finest gets no
    gradient, the second is the last and its residual is scaled as the finest's; the same field as from a zero
    one), from the backbone all three; a pair
    of one anatomy is still registered near its true (zero) field. Counts outside 1..3 or unknown starts are refused."""
    from common.networks import FrozenBackboneAdapter

    labels, true_ddf, fixed, moving, _, _, inferer = _shifted_pair_engine(0.0, iterations=5)
    adapter = FrozenBackboneAdapter(_Shift(2.0), inferer.network.refiner, start_stages={"identity": 2})
    pair = torch.cat([moving, fixed], dim=1)
    assert len(adapter(pair)) == 3
    adapter.start = "identity"
    fields = adapter(pair)
    assert len(fields) == 2 and fields[-1].abs().max() < 0.05
    zero = adapter.refiner(fixed, moving, torch.zeros(1, 3, *fixed.shape[2:]), 2)
    torch.testing.assert_close(fields[-1], zero[-1])  # the identity's shortcut is exact
    fields[-1].pow(2).sum().backward()
    grads = [
        sum(p.grad.abs().sum() for p in unet.parameters() if p.grad is not None) for unet in adapter.refiner.stages
    ]
    assert grads[0] > 0 and grads[1] > 0 and grads[2] == 0
    inferer.network = adapter
    result = inferer(fixed, moving, (1.0, 1.0, 1.0))
    assert result.stats.decisions["start"] == "identity"
    assert (result.ddf - true_ddf).norm(dim=1)[0][labels > 0].mean() < 0.5
    for bad in ({"identity": 0}, {"identity": 4}, {"convex": 2}):
        with pytest.raises(ValueError, match="start_stages maps"):
            FrozenBackboneAdapter(_Shift(2.0), adapter.refiner, start_stages=bad)


def test_a_pair_of_one_anatomy_starts_from_the_identity_without_running_the_backbone():
    """``anatomy_gate``: two renderings of one phantom (NMI far above 0.16) start from the identity and the backbone is
    never run; with the gate off the engine compares both starts (running it once). A network without the identity
    start is refused."""
    from common.engine import AnatomyGate, TestTimeOptimizationInferer

    calls = []

    class _CountingShift(_Shift):
        def forward(self, fixed, moving):
            calls.append(1)
            return super().forward(fixed, moving)

    *_, fixed, moving, adapter, objective, inferer = _shifted_pair_engine(0.0, iterations=0)
    adapter.backbone = _CountingShift(2.0)
    for mode, backbone_runs in (("auto", 0), ("never", 1)):
        calls.clear()
        inferer.anatomy_gate = AnatomyGate(mode)
        decisions = inferer(fixed, moving, (1.0, 1.0, 1.0)).stats.decisions
        assert decisions["same_anatomy"] == (mode == "auto") and decisions["anatomy_nmi"] > 0.3
        assert decisions["start"] == "identity" and len(calls) == backbone_runs
    with pytest.raises(ValueError, match="anatomy_gate needs a network with the start"):
        TestTimeOptimizationInferer(adapter.refiner, objective, anatomy_gate=AnatomyGate())


class _Decide(torch.nn.Module):
    """A pair transform that changes nothing and reports the given decisions."""

    def __init__(self, **decisions) -> None:
        super().__init__()
        self.decisions = decisions

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, spacing) -> tuple:
        return fixed, moving, dict(self.decisions)

"""The VFA and Brain-ID networks: the official layouts (names, shapes, sizes), safe loading of official-style
checkpoint files, and the forward contracts."""

from __future__ import annotations

import argparse

import pytest
import torch

from common.io import RegistrationInputError
from common.networks import VFA, BrainIDSynthesizer, checkpoint_state_dict


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

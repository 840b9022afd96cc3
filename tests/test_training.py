"""The training configs run end to end on tiny data: one process, resumed, and two gloo processes (the descriptor of
node_contrastive, the teacher and the distilled student of tto_kd)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from common.losses import MINDSSC
from common.metrics.overlap import dice_per_label, mean_dict
from common.networks import DisplacementUNet
from common.sample import sample_pair
from common.spatial.fields import warp
from common.training import BestWeights, EpochStepLearningRate, TrainingCheckpoint, label_maps, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "node_contrastive" / "configs"
TTO_KD = REPO / "bundles" / "tto_kd" / "configs"


def _descriptor_values(output: Path, epochs: int) -> dict:
    sample = sample_pair()
    return {
        "output_dir": str(output),
        "ckpt_dir": str(output / "models"),
        "train_label_maps": [sample["moving_label"]],
        "val_label_maps": [sample["fixed_label"]],
        "real_t1": [],
        "max_epochs": epochs,
        "epoch_length": 2,
        "val_interval": 1,
        "patch_size": [24, 24, 24],
    }


def _run(config: str, output: Path, epochs: int, launcher: list[str], values: dict | None = None) -> None:
    """Run a training config with the tiny-data overrides (``values``; default: the descriptor's)."""
    values = _descriptor_values(output, epochs) if values is None else values
    overrides = [arg for key, value in values.items() for arg in (f"--{key}", json.dumps(value))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [*launcher, "-m", "monai.bundle", "run", "--config_file", config, *overrides]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _curve(output: Path) -> list[dict[str, str]]:
    with open(output / "training_curve.csv", newline="") as f:
        return list(csv.DictReader(f))


def _trained_network(output: Path) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(output / "models" / "descriptor.pt", map_location="cpu", weights_only=True))
    return net


def test_training_writes_weights_and_curve_and_resumes(tmp_path):
    _run(str(CONFIGS / "train.json"), tmp_path, 2, [sys.executable])
    rows = _curve(tmp_path)
    assert [r["epoch"] for r in rows] == ["1.0", "2.0"] and all(r["val_retrieval"] for r in rows)
    assert (tmp_path / "training_curve.png").stat().st_size > 0
    first = _trained_network(tmp_path).state_dict()

    _run(str(CONFIGS / "train.json"), tmp_path, 3, [sys.executable])  # resumes from the epoch-2 checkpoint
    rows = _curve(tmp_path)
    assert [r["epoch"] for r in rows] == ["1.0", "2.0", "3.0"] and rows[-1]["iteration"] == "6.0"
    assert float(rows[-1]["time_s"]) > float(rows[1]["time_s"])
    resumed = _trained_network(tmp_path).state_dict()
    assert any(not torch.equal(first[k], resumed[k]) for k in first)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_multi_gpu_config_trains_with_two_gloo_processes(tmp_path):
    config = json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run(config, tmp_path, 1, launcher)
    assert len(_curve(tmp_path)) == 1  # written once, by rank 0
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["descriptor.pt"]
    _trained_network(tmp_path)  # plain (unwrapped) state dict, loadable without DistributedDataParallel


def _validate(handler: BestWeights, score: float) -> None:
    """One evaluator run that scores ``score``, with ``handler`` attached as a validation handler."""
    evaluator = Engine(lambda engine, batch: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: engine.state.metrics.update(val_dice=score))
    handler.attach(evaluator)
    evaluator.run([0], max_epochs=1)


def test_best_weights_survive_a_resumed_run(tmp_path):
    """The best score is part of the training checkpoint: after a restart, a worse validation leaves the best file."""
    network, path = torch.nn.Linear(2, 1), tmp_path / "models" / "teacher.pt"
    best = BestWeights(network, path)
    _validate(best, 0.5)
    saved = {k: v.clone() for k, v in network.state_dict().items()}
    resumed = BestWeights(network, path)
    resumed.load_state_dict(best.state_dict())  # what CheckpointLoader does with the run's checkpoint
    torch.nn.init.zeros_(network.weight)
    _validate(resumed, 0.4)
    assert all(torch.equal(v, saved[k]) for k, v in torch.load(path, weights_only=True).items())
    _validate(resumed, 0.6)
    assert torch.equal(torch.load(path, weights_only=True)["weight"], torch.zeros(1, 2))


def _checkpoint_at(iteration: int, network: torch.nn.Module, folder: Path) -> TrainingCheckpoint:
    trainer = Engine(lambda e, b: None)
    trainer.state.iteration = iteration
    return TrainingCheckpoint(folder, {"network": network, "trainer": trainer})


def test_resume_takes_the_furthest_checkpoint_and_survives_a_kill_while_saving(tmp_path, monkeypatch):
    """Resuming picks the checkpoint that reached the furthest iteration, whatever the file times, and skips a
    truncated file; a save interrupted half-way leaves the previous checkpoint whole."""
    network = torch.nn.Linear(2, 1)
    _checkpoint_at(300, network, tmp_path)(None)
    (tmp_path / "checkpoint_shipped.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes())
    _checkpoint_at(100, network, tmp_path / "old")(None)
    (tmp_path / "old" / "checkpoint.pt").replace(
        tmp_path / "checkpoint_zz_copied_later.pt"
    )  # newest file, oldest state
    (tmp_path / "checkpoint_truncated.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes()[:1000])
    assert Path(latest_checkpoint(tmp_path)).name in {"checkpoint.pt", "checkpoint_shipped.pt"}

    def killed(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _checkpoint_at(400, network, tmp_path)(None)
    monkeypatch.undo()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 300 and not list(tmp_path.glob(".*tmp*"))


def _rates_by_epoch(start_epoch: int, epochs: int, stale_rate: float) -> dict[int, float]:
    """Learning rates a run uses per epoch when resumed after ``start_epoch`` epochs from an optimizer holding
    ``stale_rate`` (what a checkpoint saved under another rate restores)."""
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1e-3)
    schedule = EpochStepLearningRate(optimizer, milestones=[2, 4], gamma=0.5)
    optimizer.param_groups[0]["lr"] = stale_rate
    rates = {}
    trainer = Engine(lambda engine, batch: rates.setdefault(engine.state.epoch, optimizer.param_groups[0]["lr"]))
    schedule.attach(trainer)
    trainer.load_state_dict({"epoch_length": 1, "iteration": start_epoch, "max_epochs": epochs})
    trainer.run([0], max_epochs=epochs)
    return rates


def test_the_learning_rate_schedule_is_the_same_from_scratch_and_resumed():
    """Epochs 1-2 at the base rate, 3-4 halved, 5 on quartered; a run resumed at epoch 3 from an optimizer that
    holds another rate (its checkpoint's) trains each epoch at the rate of the run from scratch."""
    scratch = _rates_by_epoch(0, 6, stale_rate=1e-3)
    assert scratch == pytest.approx({1: 1e-3, 2: 1e-3, 3: 5e-4, 4: 5e-4, 5: 2.5e-4, 6: 2.5e-4})
    assert _rates_by_epoch(3, 6, stale_rate=7e-3) == pytest.approx({e: scratch[e] for e in (4, 5, 6)})
    with pytest.raises(ValueError, match="increasing"):
        EpochStepLearningRate(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0), milestones=[4, 2])


def _tto_kd_values(output: Path, epochs: int, **extra: object) -> dict:
    sample = sample_pair()
    maps = [sample["moving_label"], sample["fixed_label"]]  # two subjects: two ordered pairs
    return {
        "output_dir": str(output),
        "ckpt_dir": str(output / "models"),
        "train_label_maps": maps,
        "val_label_maps": maps,
        "training_shape": [32, 32, 32],
        "max_epochs": epochs,
        "epoch_length": 2,
        "val_interval": 1,
        **extra,
    }


def _tto_kd_network(weights: Path, channels: list[int]) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(TTO_KD / "train.json"))
    parser["network_def#channels"] = channels
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net


def test_tto_kd_teacher_trains_resumes_and_distils_into_the_student(tmp_path):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    _run(str(TTO_KD / "train.json"), teacher_dir, 1, [sys.executable], _tto_kd_values(teacher_dir, 1))
    first = _tto_kd_network(teacher_dir / "models" / "teacher.pt", [16, 32, 32, 32, 32, 64, 64, 64]).state_dict()
    _run(str(TTO_KD / "train.json"), teacher_dir, 2, [sys.executable], _tto_kd_values(teacher_dir, 2))
    rows = _curve(teacher_dir)
    assert [r["epoch"] for r in rows] == ["1.0", "2.0"] and rows[-1]["iteration"] == "4.0"
    assert all(0.0 <= float(r["val_dice"]) <= 1.0 and r["val_dice_before"] for r in rows)
    teacher = _tto_kd_network(teacher_dir / "models" / "teacher.pt", [16, 32, 32, 32, 32, 64, 64, 64])
    assert any(not torch.equal(first[k], v) for k, v in teacher.state_dict().items())
    # the paper's teacher and student: 0.6 M and 0.23 M parameters
    assert sum(p.numel() for p in teacher.parameters()) == 610_819

    kd = json.dumps([str(TTO_KD / "train.json"), str(TTO_KD / "train_kd.json")])
    values = _tto_kd_values(student_dir, 1, teacher_weights=str(teacher_dir / "models" / "teacher.pt"))
    _run(kd, student_dir, 1, [sys.executable], values)
    student = _tto_kd_network(student_dir / "models" / "student.pt", [16, 24, 24, 24, 24, 32, 32, 32])
    assert sum(p.numel() for p in student.parameters()) == 237_443
    assert len(_curve(student_dir)) == 1


@pytest.mark.parametrize("norm", [None, "instance"])
def test_an_untrained_teacher_predicts_near_identity_fields_that_depend_on_the_pair(norm):
    """He-normal hidden layers keep the pair's signal through the dozen layers (PyTorch's default initialisation left the
    input-dependent part of the field at 0.13 of its size: nearly one field for every pair); the output layer alone
    carries no normalisation, so the field starts near zero, and instance norm adds no parameter."""
    torch.manual_seed(0)
    net = DisplacementUNet([16, 32, 32, 32, 32, 64, 64, 64], norm=norm)
    assert sum(p.numel() for p in net.parameters()) == 610_819
    with torch.no_grad():
        a, b = (net(torch.rand(1, 2, 32, 32, 32)) for _ in range(2))
    assert a.abs().max() < 1e-3  # voxels: the identity, near enough
    assert (a - b).std() > 0.5 * a.std()


@pytest.mark.parametrize("view", [{"edge_sigma": 1.0}, {"descriptor": MINDSSC()}])
def test_a_contrast_agnostic_view_gives_one_field_whatever_the_contrast_of_either_image(view):
    """With ``edge_sigma`` the network sees each image's normalised gradient magnitude, with a ``descriptor`` its
    MIND-SSC maps: an inverted and rescaled contrast of the moving image, and a brighter fixed one, give the same field;
    the raw view does not."""
    torch.manual_seed(0)
    pair = torch.rand(1, 2, 24, 24, 24)
    recontrasted = torch.stack([0.7 * (1.0 - pair[:, 0]), 3.0 * pair[:, 1]], dim=1)
    for options, same in ((view, True), ({}, False)):
        net = DisplacementUNet(
            [8, 8, 8, 8], unet_out_channels=8, final_conv_channels=(8,), output_std=1.0, norm="instance", **options
        )
        with torch.no_grad():
            field, other = net(pair), net(recontrasted)
        assert bool((field - other).abs().max() < 1e-3 * field.abs().max()) == same


def test_the_input_views_reject_bad_options():
    with pytest.raises(ValueError, match="edge_sigma"):
        DisplacementUNet([8, 8, 8, 8], edge_sigma=-1.0)
    with pytest.raises(ValueError, match="give one of them"):
        DisplacementUNet([8, 8, 8, 8], edge_sigma=1.0, descriptor=MINDSSC())
    with pytest.raises(ValueError, match="descriptor_channels"):
        DisplacementUNet([8, 8, 8, 8], descriptor=MINDSSC(), descriptor_channels=0)


def test_known_field_pairs_carry_the_displacement_that_aligns_them(tmp_path):
    """``configs/known_fields.json``: one label map rendered twice, the fixed copy deformed once more; warping the
    moving labels by the stored ``target_ddf`` gives the fixed labels, and the loss is its end-point error."""
    parser = ConfigParser()
    parser.read_config([str(TTO_KD / "train.json"), str(TTO_KD / "known_fields.json")])
    for key, value in {**_tto_kd_values(tmp_path, 1), "device": "$torch.device('cpu')"}.items():
        parser[key] = value
    item = parser.get_parsed_content("train#dataset")[0]
    target = item["target_ddf"][None]
    assert 0.5 < target.norm(dim=1).mean() < 5.0  # voxels: a deformation worth learning
    warped = warp(item["moving_label"][None].float(), target, mode="nearest")[0]
    brain = item["fixed_label"] > 0
    assert (warped == item["fixed_label"])[brain].float().mean() > 0.999
    assert (item["moving_label"] == item["fixed_label"])[brain].float().mean() < 0.9
    assert set(parser.get_parsed_content("loss").weights.items()) >= {("field", 1.0), ("mi", 0.0)}


def test_teacher_pairs_carry_a_reference_field_that_aligns_them_computed_once(tmp_path, shared_data):
    """``configs/train_reference.json``: each pair's target is node_mind's field between two subjects' maps rendered
    alike, kept on disk, and it follows the fixed map's own random deformation: warping the moving labels by it raises
    their overlap with the fixed labels far above the identity's."""
    parser = ConfigParser()
    parser.read_config([str(TTO_KD / "train.json"), str(TTO_KD / "train_reference.json")])
    maps = label_maps(str(shared_data))[:2]
    values = {"train_label_maps": maps, "spacing_mm": 4.0, "training_shape": [40, 48, 40]}
    for key, value in {**_tto_kd_values(tmp_path, 1), **values, "device": "$torch.device('cpu')"}.items():
        parser[key] = value
    item = parser.get_parsed_content("train#dataset")[0]
    assert len(list((tmp_path / "reference_fields").iterdir())) == 1

    def overlap(field: torch.Tensor) -> float:
        warped = warp(item["moving_label"][None].float(), field[None], mode="nearest")[0]
        return mean_dict(dice_per_label(warped[0], item["fixed_label"][0]))

    assert overlap(item["target_ddf"]) > overlap(torch.zeros_like(item["target_ddf"])) + 0.1
    assert set(parser.get_parsed_content("loss").weights.items()) >= {("field", 1.0), ("mi", 1.0)}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_tto_kd_multi_gpu_config_trains_with_two_gloo_processes(tmp_path):
    config = json.dumps([str(TTO_KD / "train.json"), str(TTO_KD / "multi_gpu_train.json")])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run(config, tmp_path, 1, launcher, _tto_kd_values(tmp_path, 1))
    assert len(_curve(tmp_path)) == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["teacher.pt"]
    _tto_kd_network(tmp_path / "models" / "teacher.pt", [16, 32, 32, 32, 32, 64, 64, 64])


VFA_ADAPTER = REPO / "bundles" / "vfa_brainid_adapter" / "configs"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("config, weights", [("train_backbone", "backbone.pt"), ("train_refiners", "refiners.pt")])
def test_adapter_multi_gpu_configs_train_what_one_process_trains(tmp_path, config, weights):
    """With ``multi_gpu_train.json`` the adapter's trainer still calls its network through the wrapper that feeds it
    (the backbone a pair, the refiners a pair through the frozen adapter), now inside DistributedDataParallel."""
    files = json.dumps([str(VFA_ADAPTER / f"{config}.json"), str(VFA_ADAPTER / "multi_gpu_train.json")])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run(files, tmp_path, 1, launcher, {**_tto_kd_values(tmp_path, 1), "gate#mode": "always"})
    assert len(_curve(tmp_path)) == 1 and float(_curve(tmp_path)[0]["val_dice"]) > 0
    parser = ConfigParser()
    parser.read_config(str(VFA_ADAPTER / f"{config}.json"))
    state = torch.load(tmp_path / "models" / weights, map_location="cpu", weights_only=True)
    parser.get_parsed_content("network_def").load_state_dict(state)


def test_the_adapter_networks_train_resume_and_load_into_the_inference_config(tmp_path):
    """Two tiny runs of each of vfa_brainid_adapter's training configs: the VFA backbone on T1-like pairs (val_dice
    on the curve) and the Brain-ID style network in bfloat16 (PSNR against the T1 rendering, and the input's own
    error beside it); each resumes (the backbone also from a state without the optimizer's), and its weights load into the
    inference config's network of the official layout. Then the refiners' pretraining on the pairs as the adapter
    sees them (through those two networks): only the refiners change, and they load into the inference config."""
    backbone_dir, synth_dir = tmp_path / "backbone", tmp_path / "synth"
    for epochs in (1, 2):
        _run(
            str(VFA_ADAPTER / "train_backbone.json"),
            backbone_dir,
            epochs,
            [sys.executable],
            _tto_kd_values(backbone_dir, epochs),
        )
        # the style network's step in bfloat16 where the CPU has it (MONAI's trainer autocasts only on CUDA)
        synth_values = {
            **_tto_kd_values(synth_dir, epochs),
            "training_shape": [32, 32, 32],
            "train#trainer#iteration_update#amp": "auto",
        }
        _run(str(VFA_ADAPTER / "train_synth.json"), synth_dir, epochs, [sys.executable], synth_values)
    backbone_rows, synth_rows = _curve(backbone_dir), _curve(synth_dir)
    assert [r["iteration"] for r in backbone_rows] == ["2.0", "4.0"] and float(backbone_rows[-1]["val_dice_before"]) > 0
    assert [r["iteration"] for r in synth_rows] == ["2.0", "4.0"]
    assert all(float(r["val_psnr"]) > 0 and float(r["val_mae_input"]) > 0 for r in synth_rows)
    # a state shipped without Adam's moments (to keep models/ small) continues the run in another folder
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    state = torch.load(backbone_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    del state["optimizer"]
    torch.save(state, shipped / "checkpoint_shipped.pt")
    _run(str(VFA_ADAPTER / "train_backbone.json"), shipped, 3, [sys.executable], _tto_kd_values(shipped, 3))
    assert [r["iteration"] for r in _curve(shipped)] == ["6.0"]
    parser = ConfigParser()
    parser.read_config(str(VFA_ADAPTER / "inference.json"))
    parser["backbone_weights"] = str(backbone_dir / "models" / "backbone.pt")
    parser["synth_weights"] = str(synth_dir / "models" / "synth.pt")
    backbone = parser.get_parsed_content("network_def").backbone
    assert sum(p.numel() for p in backbone.parameters()) == 2_014_827  # the official VFA size
    assert parser.get_parsed_content("style_transfer").synthesizer is not None

    refiner_dir, refined = tmp_path / "refiners", []
    weights = {k: parser[k] for k in ("backbone_weights", "synth_weights")}
    for epochs in (1, 2):
        values = {**_tto_kd_values(refiner_dir, epochs), **weights, "gate#mode": "always"}
        _run(str(VFA_ADAPTER / "train_refiners.json"), refiner_dir, epochs, [sys.executable], values)
        refined.append(torch.load(refiner_dir / "models" / "refiners.pt", map_location="cpu", weights_only=True))
    assert [r["iteration"] for r in _curve(refiner_dir)] == ["2.0", "4.0"]
    assert all(float(r["val_dice"]) > 0 for r in _curve(refiner_dir))
    assert any(not torch.equal(refined[0][k], refined[1][k]) for k in refined[0])
    parser["refiner_weights"] = str(refiner_dir / "models" / "refiners.pt")
    loaded = parser.get_parsed_content("network_def").refiner.state_dict()
    assert loaded.keys() == refined[1].keys() and all(torch.equal(loaded[k], refined[1][k]) for k in loaded)


class _FieldLoss(torch.nn.Module):
    """Squared distance of the predicted field to a known one; records the dtype the loss saw."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, float] = {}

    def forward(self, ddf: torch.Tensor, target_ddf: torch.Tensor, **_) -> torch.Tensor:
        self.values = {"dtype_is_float32": float(ddf.dtype == torch.float32)}
        return (ddf - target_ddf).square().mean()


def test_a_training_step_in_bfloat16_gives_float32_fields_and_learns_like_float32():
    """``amp=True``: the network runs in bfloat16, the loss and Adam in float32; after the same steps on a known field
    the weights moved the same way as in float32 (cosine of the two updates > 0.9) and the loss fell as much."""
    from ignite.engine import Engine

    from common.training import PairRegistrationIteration

    torch.manual_seed(0)
    batch = {"moving": torch.rand(1, 1, 16, 16, 16), "fixed": torch.rand(1, 1, 16, 16, 16)}
    batch["target_ddf"] = torch.full((1, 3, 16, 16, 16), 0.5)
    start = DisplacementUNet([8, 8, 8, 8], unet_out_channels=8, final_conv_channels=(8,), norm="instance").state_dict()
    losses, weights = {}, {}
    for amp in (False, True):
        network = DisplacementUNet([8, 8, 8, 8], unet_out_channels=8, final_conv_channels=(8,), norm="instance")
        network.load_state_dict(start)
        engine = Engine(lambda e, b: None)
        engine.state.device, engine.non_blocking = torch.device("cpu"), False
        engine.network, engine.loss_function = network, _FieldLoss()
        engine.optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        step = PairRegistrationIteration(amp=amp)
        outputs = [step(engine, batch) for _ in range(5)]
        assert all(o["dtype_is_float32"] == 1.0 for o in outputs)
        assert all(p.dtype == torch.float32 for p in network.parameters())
        losses[amp], weights[amp] = [o["loss"] for o in outputs], network.state_dict()
    assert losses[True][-1] < losses[True][0]
    assert losses[True] == pytest.approx(losses[False], rel=0.05)
    moved = [torch.cat([(w[k] - start[k]).flatten() for k in start]) for w in (weights[False], weights[True])]
    assert torch.nn.functional.cosine_similarity(*moved, dim=0) > 0.9
    with pytest.raises(ValueError, match="amp must be"):
        PairRegistrationIteration(amp="bf16")

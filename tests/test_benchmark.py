"""The benchmark's pair lists and options: hyperparameters are chosen on maps that the held-out sets never use."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from benchmarks import peers, run_benchmark


def test_tuning_and_held_out_pairs_share_no_label_map():
    tuning = run_benchmark.subject_pairs(200, 0, run_benchmark.TUNING)
    held_out = run_benchmark.subject_pairs(200, 0, run_benchmark.HELD_OUT)
    assert len(tuning) == 12 * 11 and len(held_out) == 4 * 3
    used_in_tuning = {s for pair in tuning for s in pair}
    assert used_in_tuning.isdisjoint({s for pair in held_out for s in pair})
    assert all(m != f for m, f in tuning + held_out)
    # a smaller count is a prefix of the same seeded order, so a short tuning run is part of a longer one
    assert run_benchmark.subject_pairs(3, 0, run_benchmark.TUNING) == tuning[:3]


def test_override_is_parsed_as_json_and_bad_ones_are_refused():
    assert peers._parse_override("inferer#iterations=[50, 150]") == ("inferer#iterations", [50, 150])
    assert peers._parse_override('descriptor_weights=""') == ("descriptor_weights", "")
    for bad in ("inferer#iterations", "=3", "similarity#num_bins=sixteen"):
        with pytest.raises(ValueError, match="override"):
            peers._parse_override(bad)


def test_overrides_reach_the_bundles_only(monkeypatch, tmp_path):
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        raise run_benchmark.subprocess.TimeoutExpired(command, 0)

    monkeypatch.setattr(run_benchmark.subprocess, "run", fake_run)
    pair = run_benchmark.Pair("tuning_t2", "s01_to_s02", *(tmp_path / f"{k}.nii.gz" for k in "abcd"), groups={})
    for method in ("ants_strong", "node_lmi"):
        run_benchmark.run_method(
            pair, method, tmp_path / method, 1, 1.0, overrides=["similarity#num_bins=8"], device="cuda"
        )
    assert "--override" not in commands[0] and "--device" not in commands[0]
    at = commands[1].index("--override")
    assert commands[1][at : at + 2] == ["--override", "similarity#num_bins=8"]
    assert commands[1][-2:] == ["--device", "cuda"]


@pytest.mark.parametrize("contrast", ["flair", "pd"])
def test_tuning_pairs_at_1mm_are_the_renderings_behind_the_2mm_tuning_set(monkeypatch, tmp_path, contrast):
    rendered = []

    def fake_rendered(data_dir, cache, moving, fixed, seed, contrast="t2", dataset="mm_1mm"):
        rendered.append((moving, fixed, contrast))
        return run_benchmark.Pair(dataset, f"s{moving:02d}_to_s{fixed:02d}", *(tmp_path,) * 4, groups={})

    def fake_downsampled(pair, cache, seed, dataset="mm_2mm"):
        return run_benchmark.Pair(dataset, pair.name, *(tmp_path,) * 4, groups={})

    monkeypatch.setattr(run_benchmark, "rendered_pair", fake_rendered)
    monkeypatch.setattr(run_benchmark, "downsampled_pair", fake_downsampled)
    name = f"tuning_{contrast}"
    pairs = run_benchmark.prepare_pairs([name, f"{name}_1mm"], 3, tmp_path, tmp_path, 7)
    at_1mm = [p.name for p in pairs if p.dataset == f"{name}_1mm"]
    at_2mm = [p.name for p in pairs if p.dataset == name]
    assert len(at_1mm) == 3 and at_1mm == at_2mm
    # each pair is rendered once, from the tuning maps only, with the requested fixed contrast
    assert len(rendered) == 3 and all(c == contrast and {m, f} <= set(run_benchmark.TUNING) for m, f, c in rendered)


def test_scores_reward_the_aligned_result_and_tolerate_a_run_without_a_warped_image(tmp_path):
    """Dice and PMM of a method's outputs: a perfect result scores 1 and a higher PMM than no registration."""
    rng = np.random.default_rng(0)
    labels = np.zeros((32, 32, 32), np.int16)
    labels[4:28, 4:28, 4:28] = 2
    labels[10:22, 8:20, 12:24] = 41
    fixed = (labels == 2) * 0.4 + (labels == 41) * 0.9 + rng.normal(0, 0.05, labels.shape)
    moving_labels = np.roll(labels, 3, axis=0)
    moving = 1.0 - np.roll(fixed, 3, axis=0)  # another contrast, shifted
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = {}
    for name, array in (("fixed", fixed), ("moving", moving), ("fixed_label", labels), ("moving_label", moving_labels)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array.astype(np.float32), affine), paths[name])
    pair = run_benchmark.Pair("tuning_t2", "s01_to_s02", **paths, groups={"white_matter": (2, 41)})
    out = tmp_path / "method"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"wall_s": 1.0, "peak_rss_mb": 10.0}))
    for name, array in (("warped_label", labels), ("jacobian", np.ones_like(fixed)), ("warped", 1.0 - fixed)):
        nib.save(nib.Nifti1Image(array.astype(np.float32), affine), out / f"{name}.nii.gz")

    before, after = run_benchmark.before_registration(pair), run_benchmark.score_outputs(pair, out)
    assert after["status"] == "ok" and after["dice"] == pytest.approx(1.0) and before["dice"] < 0.9
    assert after["pmm"] > before["pmm"] + 0.1 and after["nonpositive_jacobian_pct"] == 0.0
    (out / "warped.nii.gz").unlink()
    assert math.isnan(run_benchmark.score_outputs(pair, out)["pmm"])


def test_a_method_runs_in_its_own_process_from_any_folder(tmp_path, monkeypatch):
    """``run_method`` starts ``python -m benchmarks.peers`` (a real process, from another working folder) and scores
    what it wrote: here node_mind, a few iterations, on a tiny phantom pair."""
    from common.synthesis import render_contrast

    from .conftest import phantom_labels

    labels = phantom_labels((24, 28, 22)).numpy().astype(np.int16)
    moved = np.roll(labels, 2, axis=0)
    paths = {}
    for key, data in [
        ("fixed", 1000 * render_contrast(labels, "t2", seed=1)),
        ("moving", 800 * render_contrast(moved, "t1", seed=2)),
        ("fixed_label", labels),
        ("moving_label", moved),
    ]:
        paths[key] = tmp_path / f"{key}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.eye(4)), paths[key])
    files = (paths[k] for k in ("fixed", "moving", "fixed_label", "moving_label"))
    pair = run_benchmark.Pair("tiny", "a_to_b", *files, groups={"phantom": tuple(range(1, int(labels.max()) + 1))})
    monkeypatch.chdir(tmp_path)
    overrides = ["inferer#levels=[1]", "inferer#iterations=[5]", "save_qc=false", "progress=false"]
    row = run_benchmark.run_method(pair, "node_mind", tmp_path / "out", 1, 300.0, overrides=overrides)
    before = run_benchmark.score(pair, moved.astype(np.int32), None, None)["dice"]
    assert row["status"] == "ok" and row["dice"] > before + 0.02 and row["time_s"] > 0, (row, before)
    # the benchmark scores the outputs itself: the bundle's time must not include scoring them too
    assert "dice" not in json.loads((tmp_path / "out" / "metrics.json").read_text())


def test_real_known_pairs_are_undone_by_their_known_field_and_identity_pairs_need_nothing(tmp_path, shared_data):
    """The real-contrast set's ground truth holds: without deformation the moving atlas labels sit on the fixed ones
    through the headers; with the known deformation they do not, and pulling them back through the deformation's
    inverse brings them back. The scorer's field error is ~0 for a method that writes that inverse (as a field in ITK's
    convention) and the known field's size for no registration."""
    from nibabel.processing import resample_from_to
    from scipy.ndimage import map_coordinates

    from benchmarks.real_data import (
        REAL_CASES,
        implant_lesion,
        real_pair_files,
        true_fixed_to_moving,
        world_grid,
        world_to_voxel,
    )
    from common.io import save_ddf_itk
    from common.metrics import dice_per_label, mean_dict

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return mean_dict(dice_per_label(a.astype(np.int64), b.astype(np.int64)))

    # the patient's lesion lands inside the template's brain, brighter than the tissue it replaces (T2: stroke)
    template = nib.load(shared_data / REAL_CASES["t2_lesion"][0])
    original = np.asanyarray(template.dataobj).astype(np.float32)
    lesioned = implant_lesion(template, shared_data)
    brighter = lesioned > 1.5 * original
    atlas = nib.load(shared_data / "templates" / "spm12" / "tpm_labels_Neuromorphometrics.nii.gz")
    in_brain = resample_from_to(atlas, template, order=0).get_fdata()[brighter] > 0
    assert 1000 < brighter.sum() < 10000 and in_brain.mean() > 0.9, (brighter.sum(), in_brain.mean())

    identity = real_pair_files(shared_data, tmp_path / "identity", "t2", 0, deformed=False)
    known = real_pair_files(shared_data, tmp_path / "known", "t2_lesion", 0, deformed=True)
    fixed_label = nib.load(identity["fixed_label"])
    truth = np.asarray(fixed_label.dataobj)
    through_headers = resample_from_to(nib.load(identity["moving_label"]), fixed_label, order=0)
    assert dice(np.asarray(through_headers.dataobj), truth) > 0.99

    moving_label = nib.load(known["moving_label"])
    before = dice(np.asarray(resample_from_to(moving_label, fixed_label, order=0).dataobj), truth)
    points = true_fixed_to_moving(known["known_field"], fixed_label.affine, fixed_label.shape)
    pulled = map_coordinates(np.asarray(moving_label.dataobj), world_to_voxel(moving_label.affine, points), order=0)
    # nearest-neighbour label maps resampled twice at 2 mm lose the edges of the atlas's small cortical regions: the
    # exact inverse reaches 0.85 from 0.79 (on the t2 case: 0.85 from 0.74; the inverse of the wrong sign: 0.57)
    assert before < 0.8 and dice(pulled, truth) > before + 0.04, (before, dice(pulled, truth))

    files = {k: v for k, v in known.items()}
    pair = run_benchmark.Pair("real_known", "t2_lesion_to_t1", groups={"brain": tuple(range(1, 256))}, **files)
    out = tmp_path / "method"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"wall_s": 1.0, "peak_rss_mb": 10.0}))
    nib.save(nib.Nifti1Image(pulled.astype(np.int16), fixed_label.affine), out / "warped_label.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(truth.shape, np.float32), fixed_label.affine), out / "jacobian.nii.gz")
    voxels = world_to_voxel(fixed_label.affine, points) - np.indices(truth.shape)
    save_ddf_itk(voxels, fixed_label.affine, out / "ddf.nii.gz")
    scored, unregistered = run_benchmark.score_outputs(pair, out), run_benchmark.before_registration(pair)
    assert scored["field_error_p95_mm"] < 0.01 and unregistered["field_error_mm"] > 1.0, (scored, unregistered)
    assert np.allclose(
        world_grid(fixed_label.affine, truth.shape),
        true_fixed_to_moving(identity["known_field"], fixed_label.affine, truth.shape),
    )


def test_moved_pair_keeps_the_whole_head_in_view_and_the_exact_inverse_brings_it_back(tmp_path):
    # a head filling its 1 mm field of view to within 4 mm: moved by up to 10 mm and 10 % without a margin, it
    # would leave the grid
    shape = (48, 48, 48)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    radius = np.linalg.norm(grid, axis=0)
    labels = np.where(radius < 20, np.where(grid[0] > 0, 2, 3), 0).astype(np.int16)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-23.5, -30.0, -10.0]
    files = {}
    for key, data in (("fixed", labels * 100.0), ("moving", labels * 100.0), ("fixed_label", labels)):
        files[key] = tmp_path / f"{key}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(files[key]))
    files["moving_label"] = files["fixed_label"]
    pair = run_benchmark.Pair("heldout_t2_1mm", "s13_to_s14", groups={"all": (2, 3)}, **files)

    moved = run_benchmark.moved_pair(pair, tmp_path / "cache", 0, "heldout_t2_moved_1mm")
    image = nib.load(str(moved.moving_label))
    moved_labels = np.asanyarray(image.dataobj)
    rng = np.random.default_rng([0, 1, 3, 1, 4])
    matrix = run_benchmark.random_affine(rng)
    # every voxel of the head is still in view: its volume changes by the map's determinant only
    assert (moved_labels > 0).sum() == pytest.approx((labels > 0).sum() * abs(np.linalg.det(matrix[:3, :3])), rel=0.02)
    assert np.all(moved_labels[0] == 0) and np.all(moved_labels[-1] == 0)
    # the fixed image keeps its grid; the moving one lies on its own grid widened by the margin
    assert nib.load(str(moved.fixed)).shape == shape
    assert image.shape == tuple(n + 32 for n in shape)

    # the exact inverse, applied with the headers, brings the labels back onto the original grid
    from scipy.ndimage import affine_transform

    centre = affine @ np.append((np.array(shape) - 1) / 2, 1.0)
    about = np.eye(4)
    about[:3, 3] = centre[:3]
    world = about @ matrix @ np.linalg.inv(about)
    pull = np.linalg.inv(image.affine) @ world @ affine
    back = affine_transform(moved_labels, pull[:3, :3], pull[:3, 3], shape, order=0)
    assert (
        np.mean([2 * ((back == k) & (labels == k)).sum() / ((back == k).sum() + (labels == k).sum()) for k in (2, 3)])
        > 0.97
    )


def test_style_evaluation_compares_each_output_voxel_with_the_same_target_voxel(shared_data):
    """The style-network evaluation pads, runs and crops without shifting the image: a network that returns its input
    scores after exactly as before (a T1-like input near the target, a T2-like one anti-correlated), and a network
    that returns one smooth brain for every contrast scores worse than a T1-like input in correlation."""
    import torch

    from benchmarks.style_transfer import evaluate

    class Identity(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            if any(s % 8 for s in image.shape[2:]):
                raise ValueError("not padded")
            return image

    class Blob(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool3d((image > 0.05).float(), 9, stride=1, padding=4) * 0.7

    rows = {r["contrast"]: r for r in evaluate(Identity(), shared_data, ["t1", "t2"], (13,), 8)}
    for row in rows.values():
        assert row["l1_after"] == pytest.approx(row["l1_before"], abs=1e-6)
        assert row["correlation_after"] == pytest.approx(row["correlation_before"], abs=1e-6)
    assert rows["t1"]["correlation_before"] > 0.95 and rows["t2"]["correlation_before"] < -0.5
    blob = evaluate(Blob(), shared_data, ["t1"], (13,), 8)[0]
    assert blob["correlation_after"] < rows["t1"]["correlation_before"] - 0.2

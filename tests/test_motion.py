"""Motion correction of a 4D series: a series built from a real T1 image with known smooth per-frame deformations and
intensity changes (a global rise and an enhancing region, as in DCE-MRI) is brought back onto its reference frame."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigWorkflow

from common.spatial import warp
from common.workflow import input_error_cause

from .conftest import invert_field, smooth_field

REPO = Path(__file__).resolve().parents[1]
MOTION = REPO / "bundles" / "tto_kd" / "configs" / "motion_correction.json"
BOX = [16, 28, 20, 32, 18, 30]  # the enhancing region, voxels [x0, x1, y0, y1, z0, z1]
INNER = (slice(4, -4),) * 3


def _series(shared_data: Path, folder: Path) -> dict:
    """Three 2 mm frames (48^3) of the real T1 image A: frame t = (A (1 + 0.1 t) + enhancement t) moved by field t;
    frame 1, the reference (the middle one), does not move."""
    img = nib.load(shared_data / "t1_pairs" / "oasis_lapirn" / "image_A_160x192x144.nii.gz")
    a = F.avg_pool3d(torch.as_tensor(np.asarray(img.dataobj, dtype=np.float32))[None, None], 2)[0, 0]
    c = [n // 2 for n in a.shape]
    a = a[c[0] - 24 : c[0] + 24, c[1] - 24 : c[1] + 24, c[2] - 24 : c[2] + 24].contiguous()
    affine = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    frames, still, fields = [], [], []
    for t in range(3):
        enhancement = torch.zeros_like(a)
        enhancement[BOX[0] : BOX[1], BOX[2] : BOX[3], BOX[4] : BOX[5]] = 0.4 * t * a.mean()
        clean = a * (1 + 0.1 * t) + enhancement
        field = torch.zeros(1, 3, *a.shape) if t == 1 else smooth_field(a.shape, 2.5, seed=10 + t)
        frames.append(warp(clean[None, None], field)[0, 0])
        still.append(clean)
        fields.append(field)
    path = folder / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(torch.stack(frames).numpy(), 0, -1), affine), path)
    return {"path": str(path), "affine": affine, "frames": frames, "still": still, "fields": fields}


def _field_in_voxels(path: Path, affine: np.ndarray) -> torch.Tensor:
    """An ITK-convention displacement file (LPS mm) back to our voxel displacement ``[3, X, Y, Z]``."""
    lps = np.asarray(nib.load(path).dataobj, dtype=np.float64).squeeze(3)
    ras = lps * np.array([-1.0, -1.0, 1.0])
    voxels = np.linalg.solve(affine[:3, :3], ras.reshape(-1, 3).T).T.reshape(ras.shape)
    return torch.as_tensor(voxels, dtype=torch.float32).permute(3, 0, 1, 2)


def _workflow(config: str, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=[config, str(MOTION)], workflow_type="infer", device="cpu", progress=False, **overrides
    )
    workflow.initialize()
    return workflow


def test_motion_correction_recovers_known_frame_motion(shared_data, tmp_path):
    """The series corrected with node_mind's registration (the corrector takes any bundle's inferer): each moved
    frame's field is found to well within the motion, the reference is untouched, and the region's mean intensity per
    frame is written before and after correction."""
    series = _series(shared_data, tmp_path)
    config = str(REPO / "bundles" / "node_mind" / "configs" / "inference.json")
    workflow = _workflow(config, series=series["path"], roi=BOX, output_dir=str(tmp_path / "out"))
    workflow.run()
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference_frame"] == 1 and metrics["frames"] == 3
    assert metrics["max_nonpositive_jacobian_percent"] < 0.1
    corrected = np.asarray(nib.load(out / "corrected.nii.gz").dataobj)
    assert corrected.shape == (48, 48, 48, 3)
    np.testing.assert_array_equal(corrected[..., 1], series["frames"][1].numpy())
    for t in (0, 2):
        truth = invert_field(series["fields"][t])[0]
        found = _field_in_voxels(out / "fields" / f"ddf_t{t:03d}.nii.gz", series["affine"])
        error = float((found - truth)[(slice(None), *INNER)].norm(dim=0).mean())
        motion = float(truth[(slice(None), *INNER)].norm(dim=0).mean())
        assert error < 0.55 * motion, (t, error, motion)  # measured: 0.27 vs 0.62 and 0.26 vs 0.59 voxels
    with open(out / "roi_curve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    box = (slice(BOX[0], BOX[1]), slice(BOX[2], BOX[3]), slice(BOX[4], BOX[5]))
    assert [int(r["frame"]) for r in rows] == [0, 1, 2]
    means = [float(f[box].mean()) for f in series["frames"]]
    assert [float(r["roi_mean_before"]) for r in rows] == pytest.approx(means, rel=1e-5)
    assert float(rows[1]["roi_mean_after"]) == pytest.approx(float(rows[1]["roi_mean_before"]))
    assert (out / "roi_curve.png").stat().st_size > 0


def test_tto_kd_motion_config_writes_every_output_and_rejects_a_bad_region(tmp_path):
    """The tto_kd bundle's own network and test-time optimisation in the motion workflow (untrained weights, two
    iterations: the plumbing, not the accuracy), on a 4-frame series; the default reference is the middle frame."""
    rng = np.random.default_rng(0)
    frames = np.stack([rng.random((32, 32, 32), dtype=np.float32) + t for t in range(4)], axis=-1)
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(frames, np.diag([1.5, 1.5, 2.0, 1.0])), path)
    config = str(REPO / "bundles" / "tto_kd" / "configs" / "inference.json")
    overrides = {"weights": "", "inferer#iterations": 2, "inferer#spacing_mm": None, "series": str(path)}
    _workflow(config, output_dir=str(tmp_path / "out"), **overrides).run()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["bundle"] == "tto_kd" and metrics["reference_frame"] == 2
    assert sorted(p.name for p in (tmp_path / "out" / "fields").iterdir()) == [f"ddf_t{t:03d}.nii.gz" for t in range(4)]
    assert nib.load(tmp_path / "out" / "corrected.nii.gz").shape == (32, 32, 32, 4)
    with pytest.raises(Exception) as error:
        _workflow(config, output_dir=str(tmp_path / "bad"), roi=[0, 40, 0, 8, 0, 8], **overrides).run()
    cause = input_error_cause(error.value)
    assert cause is not None and "region of interest" in str(cause) and "[0, 40, 0, 8, 0, 8]" in str(cause)

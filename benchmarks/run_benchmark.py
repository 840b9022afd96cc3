"""Benchmark registration methods on the same pairs, in one run, with metrics computed one way for all.

    python -m benchmarks.run_benchmark [--datasets t1_real,mm_1mm,mm_2mm] [--pairs 10]
        [--methods ants_default,ants_strong,convexadam,node_mind,...] [--data ../shared/data] [--output benchmarks/results]

Datasets:
    t1_real      the real inter-subject T1 pair of ``t1_pairs/oasis_lapirn`` (A moving, B fixed; labels 1 GM, 2 WM), 1 mm;
    mm_1mm       inter-subject pairs rendered from the aligned SynthSeg label maps: T1-like moving, T2-like fixed, 1 mm;
    mm_2mm       the same pairs downsampled to 2 mm (images by 2x2x2 averaging, labels by the most frequent value);
    heldout_t2   ordered pairs (up to all 12) of the four label maps that no trained model of the collection sees in
                 training (``HELD_OUT``), T1-like moving vs T2-like fixed, at 2 mm;
    heldout_flair, heldout_pd  the same pairs, T1-like moving vs FLAIR-like or PD-like fixed, at 2 mm;
    heldout_t2_moved  the heldout_t2 pairs with the moving scan moved in world space by a random affine map about its
                 centre (rotation up to 10 degrees about each axis, translation up to 10 mm, scaling up to 10 %,
                 shear up to 0.05; seeded per pair): what an affine stage must undo;
    real_known   real contrasts of one anatomy (the SPM12 T2 and PD templates, and the T2 template with a real patient's
                 stroke lesion) moved by a known smooth deformation and acquired unlike the fixed SPM12 T1 template
                 (thick slices, bias, noise, one on another voxel size), labelled by the Neuromorphometrics atlas
                 carried along (``benchmarks/real_data.py``);
    real_identity  the same acquisitions without deformation: the identity is the answer;
    tuning_t2, tuning_flair, tuning_pd  the same renderings of pairs of the other twelve label maps (the training
                 maps), at 2 mm: where hyperparameters are chosen, so that the held-out sets stay untouched;
    tuning_t2_1mm, tuning_flair_1mm, tuning_pd_1mm  the same tuning pairs at 1 mm, for settings that matter at full
                 resolution only.

``--override KEY=VALUE`` (repeatable, VALUE in JSON) changes a config key of the collection's bundles for the run,
e.g. ``--override 'inferer#iterations=[50, 150]'``; give each setting its own ``--output``.

Each method-pair runs in its own process (``peers.py``) with a fixed number of threads and reports its wall time and
peak memory. Metrics are computed here from each method's warped moving image, label map and Jacobian determinant on the
fixed grid: Dice over the anatomical structures present in both label maps (mean and per structure group), HD95
(mean over structures), % of voxels with a non-positive Jacobian determinant, and PMM (the mean patch-wise normalised
mutual information between the fixed and the warped moving image, ``common.metrics.patchwise_mi_map``, over the 16^3
patches centred in the fixed brain); on the real sets, whose answer is known, also the field error: the distance (mm,
mean and 95th percentile inside the fixed brain) between where the method's transform (``ddf.nii.gz`` after
``affine.mat``) sends each fixed voxel and where the known deformation says it should, and the 1st and 99th
percentiles of the Jacobian determinant inside the fixed brain (volume change that two scans of one brain do not
have). Writes into the output folder
``results.csv`` and ``results.json`` (every pair), ``table.md`` (means per dataset and method, also printed) and
``dice.png``; rendered pairs are cached as NIfTI under ``cache/`` so that every method reads the same files.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.make_sample import (
    DEFAULT_DATA,
    REPO_ROOT,
    downsample_affine,
    downsample_image,
    downsample_labels,
    label_map_path,
    load_labels,
    save_nifti,
)
from benchmarks.peers import METHODS, PEERS, thread_env
from benchmarks.real_data import (
    NEUROMORPHOMETRICS_GROUPS,
    REAL_CASES,
    field_error_mm,
    real_pair_files,
    true_fixed_to_moving,
    world_grid,
)
from common.io import compose_fixed_to_moving
from common.metrics import (
    dice_per_label,
    hd95_per_label,
    nonpositive_jacobian_percent,
    patchwise_mi_map,
)
from common.synthesis import render_contrast
from common.training import HELD_OUT_SUBJECTS

# fixed-image contrasts of the held-out and tuning sets (the moving image is always T1-like)
FIXED_CONTRASTS = ("t2", "flair", "pd")
DATASETS = (
    ("t1_real", "mm_1mm", "mm_2mm")
    + tuple(f"heldout_{c}" for c in FIXED_CONTRASTS)
    + ("heldout_t2_moved", "real_known", "real_identity")
    + tuple(f"tuning_{c}" for c in FIXED_CONTRASTS)
    + tuple(f"tuning_{c}_1mm" for c in FIXED_CONTRASTS)
)
SUBJECTS = tuple(range(1, 17))
# label maps kept out of every training config (their ``validation_maps``)
HELD_OUT = HELD_OUT_SUBJECTS
TUNING = tuple(s for s in SUBJECTS if s not in HELD_OUT)

# FreeSurfer label values of the anatomical structures, per group; the real T1 pair has its own two labels
FREESURFER_GROUPS: dict[str, tuple[int, ...]] = {
    "cortex": (3, 42),
    "white_matter": (2, 41),
    "subcortical_gm": (10, 11, 12, 13, 17, 18, 26, 28, 49, 50, 51, 52, 53, 54, 58, 60),
    "ventricles_csf": (4, 5, 14, 15, 24, 43, 44),
    "cerebellum": (7, 8, 46, 47),
    "brainstem": (16,),
}
T1_REAL_GROUPS: dict[str, tuple[int, ...]] = {"cortex": (1,), "white_matter": (2,)}
GROUP_TITLES = {
    "cortex": "cortex/GM",
    "white_matter": "WM",
    "subcortical_gm": "subcort. GM",
    "ventricles_csf": "ventr./CSF",
    "cerebellum": "cerebellum",
    "brainstem": "brainstem",
}


@dataclass
class Pair:
    """One fixed/moving pair with label maps, and the structure groups its labels stand for."""

    dataset: str
    name: str
    fixed: Path
    moving: Path
    fixed_label: Path
    moving_label: Path
    groups: dict[str, tuple[int, ...]]
    known_field: Path | None = None


def pair_files(folder: Path) -> dict[str, Path]:
    """Paths of a cached pair's four files."""
    return {key: folder / f"{key}.nii.gz" for key in ("fixed", "moving", "fixed_label", "moving_label")}


def real_t1_pair(data_dir: Path) -> Pair:
    """The real T1 pair, read in place."""
    folder = data_dir / "t1_pairs" / "oasis_lapirn"
    return Pair(
        "t1_real",
        "oasis_A_to_B",
        fixed=folder / "image_B_160x192x144.nii.gz",
        moving=folder / "image_A_160x192x144.nii.gz",
        fixed_label=folder / "image_B_160x192x144_seg.nii.gz",
        moving_label=folder / "image_A_160x192x144_seg.nii.gz",
        groups=T1_REAL_GROUPS,
    )


def subject_pairs(count: int, seed: int, subjects: tuple[int, ...] = SUBJECTS) -> list[tuple[int, int]]:
    """``count`` (moving, fixed) pairs of different ``subjects``; a prefix of the same seeded order for every count."""
    ordered = [(m, f) for m in subjects for f in subjects if m != f]
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))[:count]]


def rendered_pair(
    data_dir: Path,
    cache: Path,
    moving_subject: int,
    fixed_subject: int,
    seed: int,
    fixed_contrast: str = "t2",
    dataset: str = "mm_1mm",
) -> Pair:
    """T1-like moving and ``fixed_contrast``-like fixed rendering of two subjects at 1 mm, written once into ``cache``,
    as a pair of ``dataset``."""
    name = f"s{moving_subject:02d}_to_s{fixed_subject:02d}"
    folder = "mm_1mm" if fixed_contrast == "t2" else f"mm_{fixed_contrast}_1mm"
    files = pair_files(cache / folder / f"seed{seed}" / name)
    if not all(path.exists() for path in files.values()):
        moving_seed, fixed_seed = np.random.SeedSequence([seed, moving_subject, fixed_subject]).generate_state(2)
        for role, subject, contrast, render_seed in (
            ("moving", moving_subject, "t1", moving_seed),
            ("fixed", fixed_subject, fixed_contrast, fixed_seed),
        ):
            labels, affine = load_labels(label_map_path(data_dir, subject))
            save_nifti(render_contrast(labels, contrast, seed=int(render_seed)), affine, files[role])
            save_nifti(labels, affine, files[f"{role}_label"])
    return Pair(dataset, name, groups=FREESURFER_GROUPS, **files)


def downsampled_pair(pair: Pair, cache: Path, seed: int, dataset: str = "mm_2mm") -> Pair:
    """``pair`` at 2 mm, written once into ``cache``, as a pair of ``dataset``."""
    files = pair_files(cache / dataset / f"seed{seed}" / pair.name)
    if not all(path.exists() for path in files.values()):
        for key, path in files.items():
            image = nib.load(str(getattr(pair, key)))
            data = np.asanyarray(image.dataobj)
            data = downsample_labels(data) if key.endswith("label") else downsample_image(data)
            save_nifti(data, downsample_affine(image.affine), path)
    return Pair(dataset, pair.name, groups=FREESURFER_GROUPS, **files)


def random_affine(rng: np.random.Generator) -> np.ndarray:
    """A 4x4 map about the origin: rotations up to 10 degrees, translation up to 10 mm, scaling up to 10 %, shear up to
    0.05, each uniform."""
    from scipy.spatial.transform import Rotation

    rotation = Rotation.from_euler("xyz", rng.uniform(-10, 10, 3), degrees=True).as_matrix()
    shear = np.eye(3)
    shear[np.triu_indices(3, 1)] = rng.uniform(-0.05, 0.05, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(rng.uniform(0.9, 1.1, 3)) @ shear
    matrix[:3, 3] = rng.uniform(-10, 10, 3)
    return matrix


def moved_pair(pair: Pair, cache: Path, seed: int, dataset: str, margin_mm: float = 16.0) -> Pair:
    """``pair`` with its moving image and labels moved in world space by :func:`random_affine` about the moving image's
    centre, as a scan of the subject lying elsewhere in the scanner: resampled at ``pair``'s own resolution (linear for
    the image, nearest for the labels; a sheared map cannot live in an ITK header) onto its grid widened by
    ``margin_mm`` on every side, so that no anatomy leaves the field of view, written once into ``cache``, as a pair of
    ``dataset``. Give it the 1 mm pair and downsample the result: moving the 2 mm pair itself, without the margin, left
    1-2 % of the brain off the grid and resampled the labels twice, which cost ``node_mind`` 0.018 and ANTs ``SyN``
    0.012 of mean Dice on the held-out pairs that no affine stage can bring back."""
    from scipy.ndimage import affine_transform

    files = pair_files(cache / dataset / f"seed{seed}" / pair.name)
    if not all(path.exists() for path in files.values()):
        moving = nib.load(str(pair.moving))
        centre = moving.affine @ np.append((np.array(moving.shape) - 1) / 2, 1.0)
        about = np.eye(4)
        about[:3, 3] = centre[:3]
        rng = np.random.default_rng([seed, *(int(c) for c in pair.name if c.isdigit())])
        matrix = about @ random_affine(rng) @ np.linalg.inv(about)
        spacing = np.linalg.norm(moving.affine[:3, :3], axis=0)
        pad = np.ceil(margin_mm / spacing).astype(int)
        widened = moving.affine.copy()
        widened[:3, 3] = moving.affine[:3, :3] @ -pad + moving.affine[:3, 3]
        shape = tuple(np.array(moving.shape[:3]) + 2 * pad)
        # output voxel v shows what the unmoved image has at world point M^-1 W v
        pull = np.linalg.inv(moving.affine) @ np.linalg.inv(matrix) @ widened
        for key, path in files.items():
            image = nib.load(str(getattr(pair, key)))
            data, affine = np.asanyarray(image.dataobj), image.affine
            if key.startswith("moving"):
                order = 0 if key.endswith("label") else 1
                data = affine_transform(data, pull[:3, :3], pull[:3, 3], shape, order=order, mode="constant", cval=0)
                affine = widened
            save_nifti(data, affine, path)
    return Pair(dataset, pair.name, groups=pair.groups, **files)


def load_label_map(path: Path) -> nib.Nifti1Image:
    """Label map with integer voxels (some files store labels as floats)."""
    image = nib.load(str(path))
    return nib.Nifti1Image(np.rint(np.asanyarray(image.dataobj)).astype(np.int32), image.affine)


def scored_labels(pair: Pair, fixed_label: np.ndarray, moving_label: np.ndarray) -> list[int]:
    """The anatomical labels present in both input label maps."""
    anatomical = {label for labels in pair.groups.values() for label in labels}
    return sorted(anatomical & set(np.unique(fixed_label).tolist()) & set(np.unique(moving_label).tolist()))


def score(
    pair: Pair, warped_label: np.ndarray, jacobian: np.ndarray | None, warped: np.ndarray | None
) -> dict[str, object]:
    """Dice (mean, per group, per label), mean HD95, % non-positive Jacobian and PMM of one result on the fixed grid."""
    fixed = load_label_map(pair.fixed_label)
    labels = scored_labels(pair, np.asarray(fixed.dataobj), np.asarray(load_label_map(pair.moving_label).dataobj))
    dice = dice_per_label(warped_label, np.asarray(fixed.dataobj), labels=labels)
    hd95 = hd95_per_label(warped_label, np.asarray(fixed.dataobj), spacing=fixed.header.get_zooms()[:3], labels=labels)
    row: dict[str, object] = {"dice": float(np.mean(list(dice.values())))}
    for group, members in pair.groups.items():
        values = [dice[label] for label in members if label in dice]
        row[f"dice_{group}"] = float(np.mean(values)) if values else math.nan
    row["hd95"] = float(np.nanmean(list(hd95.values())))
    row["nonpositive_jacobian_pct"] = math.nan if jacobian is None else nonpositive_jacobian_percent(jacobian)
    # volume change inside the brain: between two scans of one brain, anything far from 1 is an error
    brain = np.asarray(fixed.dataobj) > 0
    row["jacobian_p1"], row["jacobian_p99"] = (
        (math.nan, math.nan) if jacobian is None else (float(q) for q in np.percentile(jacobian[brain], [1, 99]))
    )
    # the paper's PMM: 16^3 patches at a stride of 4 voxels, averaged over the patches centred in the fixed brain
    row["pmm"] = math.nan
    if warped is not None:
        fixed_image = nib.load(str(pair.fixed)).get_fdata(dtype=np.float32)
        row["pmm"] = patchwise_mi_map(fixed_image, warped, patch=16, stride=4, mask=np.asarray(fixed.dataobj) > 0)[1]
    row["dice_per_label"] = {str(k): v for k, v in dice.items()}
    return row


@functools.lru_cache(maxsize=4)
def _truth(field: Path, fixed: Path, fixed_label: Path) -> tuple[np.ndarray, np.ndarray]:
    """Where each fixed voxel belongs in the moving image, and the fixed brain: once per pair, not per method."""
    image = nib.load(str(fixed))
    brain = np.asarray(load_label_map(fixed_label).dataobj) > 0
    return true_fixed_to_moving(field, image.affine, image.shape[:3]), brain


def field_error(pair: Pair, points: np.ndarray) -> dict[str, float]:
    """Mean and 95th percentile (mm) inside the fixed brain of the distance between where a result sends each fixed
    voxel (``points``, ``[3, X, Y, Z]`` RAS mm) and where the pair's known deformation says it should; empty for
    pairs without one."""
    if pair.known_field is None:
        return {}
    mean, p95 = field_error_mm(points, *_truth(pair.known_field, pair.fixed, pair.fixed_label))
    return {"field_error_mm": mean, "field_error_p95_mm": p95}


def before_registration(pair: Pair) -> dict[str, object]:
    """Scores of the moving image and label map brought onto the fixed grid through the headers only."""
    fixed, fixed_label = nib.load(str(pair.fixed)), load_label_map(pair.fixed_label)
    moving_label = resample_from_to(load_label_map(pair.moving_label), fixed_label, order=0)
    moving = resample_from_to(nib.load(str(pair.moving)), fixed, order=1).get_fdata(dtype=np.float32)
    row = score(pair, np.asarray(moving_label.dataobj).astype(np.int32), None, moving)
    return {**row, **field_error(pair, world_grid(fixed.affine, fixed.shape[:3]))}


def on_fixed_grid(path: Path, fixed: nib.Nifti1Image) -> np.ndarray:
    """Array of a method's output, checked to lie on the fixed grid."""
    image = nib.load(str(path))
    if image.shape[:3] != fixed.shape[:3] or not np.allclose(image.affine, fixed.affine, atol=1e-3):
        raise ValueError(f"{path} is not on the fixed image's grid")
    return np.asanyarray(image.dataobj).reshape(fixed.shape[:3])


def run_method(
    pair: Pair,
    method: str,
    out_dir: Path,
    threads: int,
    timeout: float,
    resume: bool = False,
    overrides: Sequence[str] = (),
    device: str = "cpu",
) -> dict[str, object]:
    """Run ``method`` on ``pair`` in its own process and score its outputs (``resume``: reuse a finished run;
    ``overrides``: ``KEY=JSON`` config changes, and ``device``: the torch device, both for the collection's bundles
    only)."""
    if resume and (out_dir / "run.json").is_file():
        return score_outputs(pair, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "benchmarks.peers", method, "--output_dir", str(out_dir.resolve())]
    for key in ("fixed", "moving", "fixed_label", "moving_label"):
        command += [f"--{key}", str(Path(getattr(pair, key)).resolve())]
    command += ["--threads", str(threads)]
    if method not in PEERS:
        command += [arg for override in overrides for arg in ("--override", override)] + ["--device", device]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, env=thread_env(threads), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    (out_dir / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed ({done.returncode}): {last}"}
    row = score_outputs(pair, out_dir)
    row["process_s"] = time.perf_counter() - start
    return row


def score_outputs(pair: Pair, out_dir: Path) -> dict[str, object]:
    """Scores of the outputs a method left in ``out_dir``, with its own wall time and peak memory."""
    try:
        report = json.loads((out_dir / "run.json").read_text())
        fixed = nib.load(str(pair.fixed))
        warped_label = np.rint(on_fixed_grid(out_dir / "warped_label.nii.gz", fixed)).astype(np.int32)
        jacobian = on_fixed_grid(out_dir / "jacobian.nii.gz", fixed).astype(np.float32)
        # runs made before the benchmark scored images have no warped image: PMM is then left empty
        warped_path = out_dir / "warped.nii.gz"
        warped = on_fixed_grid(warped_path, fixed).astype(np.float32) if warped_path.is_file() else None
    except (OSError, ValueError, KeyError) as error:  # missing or malformed outputs: report, go on with the rest
        return {"status": f"bad output: {error}"}
    row = score(pair, warped_label, jacobian, warped)
    ddf, affine = out_dir / "ddf.nii.gz", out_dir / "affine.mat"
    if pair.known_field is not None and ddf.is_file():
        points, grid = compose_fixed_to_moving(ddf, affine if affine.is_file() else None)
        if not np.allclose(grid, fixed.affine, atol=1e-3):
            return {"status": f"bad output: {ddf} is not on the fixed image's grid"}
        row.update(field_error(pair, points))
    row.update(status="ok", time_s=report["wall_s"], memory_mb=report["peak_rss_mb"])
    return row


def prepare_pairs(datasets: list[str], count: int, data_dir: Path, cache: Path, seed: int) -> list[Pair]:
    """Every pair of the requested datasets, rendering into ``cache`` what is not there yet."""
    pairs = [real_t1_pair(data_dir)] if "t1_real" in datasets else []
    if "mm_1mm" in datasets or "mm_2mm" in datasets:
        rendered = [rendered_pair(data_dir, cache, m, f, seed) for m, f in subject_pairs(count, seed)]
        pairs += rendered if "mm_1mm" in datasets else []
        pairs += [downsampled_pair(pair, cache, seed) for pair in rendered] if "mm_2mm" in datasets else []
    for subset, subjects in (("heldout", HELD_OUT), ("tuning", TUNING)):
        chosen = subject_pairs(count, seed, subjects)
        for contrast in FIXED_CONTRASTS:
            name = f"{subset}_{contrast}"
            if {name, f"{name}_1mm", f"{name}_moved"} & set(datasets):
                rendered = [rendered_pair(data_dir, cache, m, f, seed, contrast, f"{name}_1mm") for m, f in chosen]
                pairs += rendered if f"{name}_1mm" in datasets else []
                pairs += [downsampled_pair(pair, cache, seed, name) for pair in rendered] if name in datasets else []
                if f"{name}_moved" in datasets:
                    moved = [moved_pair(pair, cache, seed, f"{name}_moved_1mm") for pair in rendered]
                    pairs += [downsampled_pair(pair, cache, seed, f"{name}_moved") for pair in moved]
    for dataset in ("real_known", "real_identity"):
        if dataset in datasets:
            for case in list(REAL_CASES)[:count]:
                folder = cache / dataset / f"seed{seed}" / f"{case}_to_t1"
                files = real_pair_files(data_dir, folder, case, seed, deformed=dataset == "real_known")
                pairs.append(Pair(dataset, f"{case}_to_t1", groups=NEUROMORPHOMETRICS_GROUPS, **files))
    return pairs


def mean_cell(rows: list[dict[str, object]], key: str, digits: int) -> str:
    """Mean of the finite values of ``key`` over ``rows``, formatted; ``-`` when there are none."""
    values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return f"{np.mean(values):.{digits}f}" if values else "-"


def summarise(rows: list[dict[str, object]], datasets: list[str], methods: list[str]) -> str:
    """Markdown table: one row per (dataset, method), means over that dataset's pairs (std of Dice after ±)."""
    columns = [(f"dice_{g}", title, 3) for g, title in GROUP_TITLES.items()]
    columns += [("hd95", "HD95 (mm)", 2), ("nonpositive_jacobian_pct", "% det J <= 0", 3), ("pmm", "PMM", 3)]
    if any("field_error_mm" in r for r in rows):
        columns += [("field_error_mm", "field error (mm)", 2), ("field_error_p95_mm", "p95 (mm)", 2)]
        columns += [("jacobian_p1", "det J p1", 2), ("jacobian_p99", "det J p99", 2)]
    columns += [("time_s", "time (s)", 1), ("memory_mb", "memory (MB)", 0)]
    header = ["dataset", "method", "pairs ok", "Dice"] + [title for _, title, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for dataset in datasets:
        for method in ["before"] + methods:
            selected = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            if not selected:
                continue
            done = [r for r in selected if r["status"] == "ok"]
            dice = [float(r["dice"]) for r in done]
            cells = [dataset, method, f"{len(done)}/{len(selected)}"]
            cells.append(f"{np.mean(dice):.3f} ± {np.std(dice):.3f}" if dice else "-")
            cells += [mean_cell(done, key, digits) for key, _, digits in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, object]], datasets: list[str], methods: list[str], path: Path) -> None:
    """Mean Dice per pair: one panel per dataset, a box and the pairs' points per method."""
    names = ["before"] + methods
    fig, axes = plt.subplots(1, len(datasets), figsize=(1.2 + 1.1 * len(names) * len(datasets), 4), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, dataset in zip(axes[0], datasets):
        values = [
            [float(r["dice"]) for r in rows if r["dataset"] == dataset and r["method"] == m and r["status"] == "ok"]
            for m in names
        ]
        ax.boxplot([v if v else [math.nan] for v in values], widths=0.5, showfliers=False)
        for i, v in enumerate(values, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=12, alpha=0.7, zorder=3)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
        ax.set_title(dataset)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("mean Dice over structures")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: list[dict[str, object]], output: Path) -> None:
    """All rows as JSON (with per-label Dice) and as CSV (without)."""
    (output / "results.json").write_text(json.dumps(rows, indent=1))
    columns = [k for k in rows[0] if k != "dice_per_label"]
    columns += sorted({k for r in rows for k in r if k not in columns and k != "dice_per_label"})
    with open(output / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluation = ",".join(d for d in DATASETS if not d.startswith("tuning"))
    parser.add_argument(
        "--datasets",
        default=evaluation,
        help=f"comma-separated subset of {DATASETS} (default: all but the tuning sets)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=10,
        help="rendered pairs per dataset (t1_real has one, the held-out sets at most 12)",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {tuple(METHODS)}")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the reference data folder")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results", help="output folder")
    parser.add_argument("--cache", type=Path, default=None, help="rendered pairs (default: OUTPUT/cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair list and of the renderings")
    parser.add_argument("--threads", type=int, default=2, help="threads per method")
    parser.add_argument("--device", default="cpu", help="torch device of the collection's bundles, e.g. cuda")
    parser.add_argument("--resume", action="store_true", help="reuse method-pairs already finished in OUTPUT/runs")
    parser.add_argument("--report-only", action="store_true", help="score finished method-pairs only; run nothing new")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a method-pair is given up")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="KEY=JSON config change for the collection's bundles (repeatable)",
    )
    args = parser.parse_args()
    datasets = [d for d in args.datasets.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(datasets) - set(DATASETS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown dataset or method: {', '.join(unknown)}")
    args.output.mkdir(parents=True, exist_ok=True)

    pairs = prepare_pairs(datasets, args.pairs, args.data, args.cache or args.output / "cache", args.seed)
    rows: list[dict[str, object]] = []
    for pair in pairs:
        for method in ["before"] + methods:
            if method == "before":
                row = {"status": "ok", **before_registration(pair)}
            else:
                out_dir = args.output / "runs" / pair.dataset / pair.name / method
                if args.report_only and not (out_dir / "run.json").is_file():
                    continue
                resume = args.resume or args.report_only
                row = run_method(pair, method, out_dir, args.threads, args.timeout, resume, args.override, args.device)
            rows.append({"dataset": pair.dataset, "pair": pair.name, "method": method, **row})
            dice = f"Dice {row['dice']:.3f}" if row["status"] == "ok" else row["status"]
            print(f"{pair.dataset} {pair.name} {method}: {dice}", flush=True)
            write_results(rows, args.output)

    table = summarise(rows, datasets, methods)
    (args.output / "table.md").write_text(table)
    plot(rows, datasets, methods, args.output / "dice.png")
    print("\n" + table)


if __name__ == "__main__":
    main()

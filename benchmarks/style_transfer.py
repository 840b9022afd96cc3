"""How close a style network brings other contrasts to the T1-like image of the same anatomy.

    python -m benchmarks.style_transfer [--weights bundles/vfa_brainid_adapter/models/synth.pt]
        [--contrasts t1,t2,flair,pd] [--data ../shared/data] [--output benchmarks/results/style_transfer]

Each held-out label map (``HELD_OUT``, never seen in training) is rendered at 1 mm in the T1-like contrast (the target)
and in each of ``--contrasts`` (the inputs, another seed), downsampled to 2 mm like the benchmark's held-out sets,
scaled as the bundles scale their inputs (0.5th-99.5th percentile to ``[0, 1]``) and passed through the network as
``vfa_brainid_adapter`` passes them (padded to its multiple, output clipped to ``[0, 1]``). Reported inside the brain
(label > 0), before (the input against the target) and after (the output against the target): the mean absolute
difference and Pearson's correlation. A network that maps every contrast to one smooth brain gets a low L1 but a
correlation far below the T1-like input's. Writes ``results.csv`` and ``table.md`` (means per contrast, also printed).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from monai.transforms import ScaleIntensityRangePercentiles

from benchmarks.make_sample import (
    DEFAULT_DATA,
    REPO_ROOT,
    downsample_image,
    downsample_labels,
    label_map_path,
    load_labels,
)
from common.networks import BrainIDSynthesizer, load_weights
from common.synthesis import CONTRASTS, render_contrast
from common.training import HELD_OUT_SUBJECTS

BUNDLE_WEIGHTS = REPO_ROOT / "bundles" / "vfa_brainid_adapter" / "models" / "synth.pt"


def closeness(image: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Mean absolute difference and Pearson's correlation of ``image`` and ``target`` inside ``mask`` (one shape)."""
    a, b = image[mask].astype(np.float64), target[mask].astype(np.float64)
    return {"l1": float(np.abs(a - b).mean()), "correlation": float(np.corrcoef(a, b)[0, 1])}


def transfer(network: nn.Module, image: np.ndarray, multiple: int) -> np.ndarray:
    """``network``'s output for a 3D ``image`` in ``[0, 1]``: zero-padded at the end of each axis to ``multiple``,
    cropped back, clipped to ``[0, 1]``."""
    shape = image.shape
    padded = np.zeros([-(-s // multiple) * multiple for s in shape], np.float32)
    padded[tuple(slice(0, s) for s in shape)] = image
    with torch.no_grad():
        output = network(torch.from_numpy(padded)[None, None]).clamp(0, 1)[0, 0].numpy()
    return output[tuple(slice(0, s) for s in shape)]


def evaluate(
    network: nn.Module, data_dir: Path, contrasts: list[str], subjects: tuple[int, ...], multiple: int
) -> list[dict[str, object]]:
    """One row per (subject, input contrast): closeness of the input and of the output to the T1-like target."""
    scale = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    rows = []
    for subject in subjects:
        labels, _ = load_labels(label_map_path(data_dir, subject))
        mask = downsample_labels(labels) > 0
        target = downsample_image(render_contrast(labels, "t1", seed=subject))
        for contrast in contrasts:
            rendered = downsample_image(render_contrast(labels, contrast, seed=1000 + subject))
            image = np.asarray(scale(rendered[None])[0], np.float32)
            row: dict[str, object] = {"subject": subject, "contrast": contrast}
            for stage, values in (("before", image), ("after", transfer(network, image, multiple))):
                row.update({f"{key}_{stage}": value for key, value in closeness(values, target, mask).items()})
            rows.append(row)
    return rows


def table(rows: list[dict[str, object]], contrasts: list[str]) -> str:
    """Markdown table of the means per input contrast."""
    lines = [
        "| input contrast | L1 before | L1 after | correlation before | correlation after |",
        "|---|---|---|---|---|",
    ]
    for contrast in contrasts:
        chosen = [r for r in rows if r["contrast"] == contrast]
        means = {k: np.mean([float(r[k]) for r in chosen]) for k in chosen[0] if k.endswith(("before", "after"))}
        lines.append(
            f"| {contrast} | {means['l1_before']:.3f} | {means['l1_after']:.3f} | "
            f"{means['correlation_before']:.3f} | {means['correlation_after']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=BUNDLE_WEIGHTS, help="the style network's state dict")
    parser.add_argument("--f_maps", type=int, default=16, help="the network's first-level channels (as trained)")
    parser.add_argument("--levels", type=int, default=4, help="the network's levels (as trained)")
    parser.add_argument("--contrasts", default=",".join(CONTRASTS), help="input contrasts, comma-separated")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "style_transfer")
    args = parser.parse_args()
    contrasts = [c for c in args.contrasts.split(",") if c]
    unknown = sorted(set(contrasts) - set(CONTRASTS))
    if unknown:
        parser.error(f"unknown contrasts {unknown}; choose from {list(CONTRASTS)}.")
    network = load_weights(BrainIDSynthesizer(args.f_maps, args.levels), args.weights).eval()
    rows = evaluate(network, args.data, contrasts, HELD_OUT_SUBJECTS, network.backbone.multiple)
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = table(rows, contrasts)
    (args.output / "table.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()

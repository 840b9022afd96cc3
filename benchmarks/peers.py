"""One registration method on one pair, run as its own process by ``run_benchmark.py``.

    python -m benchmarks.peers METHOD --fixed F --moving M --fixed_label FL --moving_label ML --output_dir DIR

Every method writes, on the fixed image's grid and with its affine, ``warped.nii.gz`` (the moving image warped),
``warped_label.nii.gz`` (the moving label map warped by nearest neighbour), ``jacobian.nii.gz`` (the determinant of
the transform's Jacobian), ``ddf.nii.gz`` (its whole transform as one displacement field in ITK's convention, or the
field that ``affine.mat`` follows, as the collection's bundles write them) and ``run.json`` with its wall time
(registration, warping and writing; imports and interpreter start excluded) and its own peak resident memory. The thread count is fixed by the caller through the
environment (see :func:`thread_env`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def thread_env(threads: int) -> dict[str, str]:
    """Environment that limits OpenMP, BLAS and ITK (ANTs) to ``threads`` threads."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    return {**os.environ, **{name: str(threads) for name in names}}


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MB (here rather than from ``common``, whose import would load torch
    into the peers' processes and inflate their memory).

    Linux's ``ru_maxrss`` keeps the high-water mark of the process image before ``execve``, which for a worker forked
    from a large parent is the parent's size; ``VmHWM`` in ``/proc/self/status`` starts afresh with the new image.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024**2 if sys.platform == "darwin" else 1024)


def run_ants(args: argparse.Namespace, transform: str = "SyNOnly", **options: object) -> float:
    """ANTs ``transform`` (``SyNOnly``, or ``SyN``: affine then SyN; antspyx defaults: Mattes mutual information) with
    ``options`` passed to the registration."""
    import ants

    start = time.perf_counter()
    work = args.output_dir / "ants_transforms"
    work.mkdir(parents=True, exist_ok=True)
    fixed, moving = ants.image_read(str(args.fixed)), ants.image_read(str(args.moving))
    reg = ants.registration(fixed, moving, type_of_transform=transform, outprefix=str(work / "tx_"), **options)
    warped_label = ants.apply_transforms(
        fixed, ants.image_read(str(args.moving_label)), reg["fwdtransforms"], interpolator="nearestNeighbor"
    )
    warp = next(f for f in reg["fwdtransforms"] if f.endswith("Warp.nii.gz"))
    jacobian = ants.create_jacobian_determinant_image(fixed, warp)
    # the affine (ants_syn) and the warp composed into one field: what the benchmark compares to a known deformation
    composite = ants.apply_transforms(fixed, moving, reg["fwdtransforms"], compose=str(work / "composite_"))
    shutil.move(composite, args.output_dir / "ddf.nii.gz")
    ants.image_write(reg["warpedmovout"], str(args.output_dir / "warped.nii.gz"))
    ants.image_write(warped_label.clone("unsigned int"), str(args.output_dir / "warped_label.nii.gz"))
    ants.image_write(jacobian, str(args.output_dir / "jacobian.nii.gz"))
    elapsed = time.perf_counter() - start
    shutil.rmtree(work)  # ANTs' own transform files: ddf.nii.gz holds them
    return elapsed


def convexadam_ddf(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """ConvexAdam-MIND with the package defaults, as our ddf ``[3, X, Y, Z]`` (voxels, pull-back).

    ``convex_adam_pt`` returns ``[X, Y, Z, 3]`` with channel ``c`` the displacement along array axis ``c`` in voxels,
    sampled as ``moving(x + u(x))`` (as its own ``apply_convex`` does): our convention up to the channel position.
    """
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    # float32 is what the package falls back to on a CPU anyway; asking for it avoids its warning
    displacement = convex_adam_pt(img_fixed=fixed, img_moving=moving, dtype=torch.float32, device=torch.device("cpu"))
    return np.ascontiguousarray(np.moveaxis(displacement, -1, 0), dtype=np.float32)


def run_convexadam(args: argparse.Namespace) -> float:
    """ConvexAdam-MIND; the moving image is first resampled onto the fixed grid through both headers."""
    import torch
    from nibabel.processing import resample_from_to
    from scipy.ndimage import map_coordinates

    from common.io import save_ddf_itk, save_image
    from common.spatial import jacobian_determinant

    start = time.perf_counter()
    fixed_image, moving_image = nib.load(str(args.fixed)), nib.load(str(args.moving))
    moving = resample_from_to(moving_image, fixed_image, order=1)
    ddf = convexadam_ddf(fixed_image.get_fdata(dtype=np.float32), moving.get_fdata(dtype=np.float32))

    # one nearest-neighbour lookup of the original labels at A_moving^-1 A_fixed (x + u(x))
    label_image = nib.load(str(args.moving_label))
    fixed_to_moving = np.linalg.inv(label_image.affine) @ fixed_image.affine
    points = np.indices(ddf.shape[1:], dtype=np.float32) + ddf
    coords = np.einsum("ij,j...->i...", fixed_to_moving[:3, :3], points) + fixed_to_moving[:3, 3, None, None, None]
    labels = np.asanyarray(label_image.dataobj)
    warped_label = map_coordinates(labels, coords, order=0, mode="constant", cval=0).astype(np.int16)
    warped = map_coordinates(moving.get_fdata(dtype=np.float32), points, order=1, mode="constant", cval=0)
    jacobian = jacobian_determinant(torch.from_numpy(ddf)[None])[0, 0].numpy()
    save_image(warped, fixed_image.affine, args.output_dir / "warped.nii.gz")
    save_image(warped_label, fixed_image.affine, args.output_dir / "warped_label.nii.gz")
    save_image(jacobian.astype(np.float32), fixed_image.affine, args.output_dir / "jacobian.nii.gz")
    save_ddf_itk(ddf, fixed_image.affine, args.output_dir / "ddf.nii.gz")
    return time.perf_counter() - start


def run_bundle(args: argparse.Namespace, bundle: str, preset: str = "", **overrides: object) -> float:
    """One of the collection's bundles through ``monai.bundle.ConfigWorkflow`` with config ``overrides`` (after the
    ``preset`` override file, when given); it writes its outputs itself.

    The bundle gets the moving labels (to write ``warped_label.nii.gz``) but not the fixed ones: the benchmark scores
    every method's outputs itself, and a bundle's own Dice and HD95 before and after (about 2 s a 2 mm pair) would
    charge it for work the peers' times leave out."""
    import torch
    from monai.bundle import ConfigWorkflow

    torch.manual_seed(0)  # networks built while parsing the config (an untrained descriptor) are then reproducible
    start = time.perf_counter()
    configs = REPO_ROOT / "bundles" / bundle / "configs"
    workflow = ConfigWorkflow(
        config_file=[str(configs / "inference.json")] + ([str(configs / f"{preset}.json")] if preset else []),
        workflow_type="infer",
        fixed=str(args.fixed),
        moving=str(args.moving),
        moving_label=str(args.moving_label),
        output_dir=str(args.output_dir),
        device=args.device,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return time.perf_counter() - start


def _parse_override(text: str) -> tuple[str, object]:
    """``KEY=JSON`` -> ``(KEY, value)``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"an override reads KEY=VALUE, got {text!r}.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"the value of override {key!r} is not JSON: {error}") from None


# the methods that are not the collection's bundles: config overrides do not apply to them
PEERS = ("ants_default", "ants_strong", "ants_syn", "convexadam")
METHODS: dict[str, Callable[[argparse.Namespace], float]] = {
    "ants_default": run_ants,
    "ants_strong": lambda args: run_ants(args, reg_iterations=(100, 70, 50)),
    # affine then SyN, for pairs that are not pre-aligned
    "ants_syn": lambda args: run_ants(args, "SyN"),
    "convexadam": run_convexadam,
    "node_mind": lambda args: run_bundle(args, "node_mind", **args.overrides),
    "node_lmi": lambda args: run_bundle(args, "node_lmi", **args.overrides),
    "node_contrastive": lambda args: run_bundle(args, "node_contrastive", **args.overrides),
    # the same registration with a randomly initialised descriptor network: what the training bought
    "node_contrastive_untrained": lambda args: run_bundle(
        args, "node_contrastive", **{"descriptor_weights": "", **args.overrides}
    ),
    # each bundle with a preset listed after its config: "longitudinal" for scans of one subject, "quick" (fewer
    # full-resolution iterations) for a CPU
    **{
        f"{bundle}_{preset}": lambda args, bundle=bundle, preset=preset: run_bundle(
            args, bundle, preset, **args.overrides
        )
        for preset, bundles in (
            ("longitudinal", ("node_mind", "node_lmi", "node_contrastive", "tto_kd", "vfa_brainid_adapter")),
            ("quick", ("node_mind", "node_lmi")),
        )
        for bundle in bundles
    },
    # tto_kd as released (the student fine-tuned on the pair), and its two networks alone, without test-time steps
    "tto_kd": lambda args: run_bundle(args, "tto_kd", **args.overrides),
    "tto_kd_student": lambda args: run_bundle(args, "tto_kd", **{"inferer#iterations": 0, **args.overrides}),
    "tto_kd_teacher": lambda args: run_bundle(
        args, "tto_kd", **{"model": "teacher", "inferer#iterations": 0, **args.overrides}
    ),
    # the adapter as released, without its style transfer, and its frozen backbone alone (no per-pair refinement)
    "vfa_brainid_adapter": lambda args: run_bundle(args, "vfa_brainid_adapter", **args.overrides),
    "vfa_brainid_adapter_no_style": lambda args: run_bundle(
        args, "vfa_brainid_adapter", **{"synth_weights": "", **args.overrides}
    ),
    "vfa_brainid_adapter_backbone": lambda args: run_bundle(
        args, "vfa_brainid_adapter", **{"inferer#iterations": 0, **args.overrides}
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=sorted(METHODS))
    for name in ("fixed", "moving", "fixed_label", "moving_label", "output_dir"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device of the collection's bundles (peers use the CPU)")
    parser.add_argument("--override", action="append", default=[], help="KEY=JSON config change (bundles only)")
    args = parser.parse_args()
    try:
        args.overrides = dict(_parse_override(text) for text in args.override)
    except ValueError as error:
        parser.error(str(error))
    if args.overrides and args.method in PEERS:
        parser.error(f"--override applies to the collection's bundles, not to {args.method}.")

    if args.method == "convexadam" or args.method.startswith("node_"):
        import torch

        torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    wall_s = METHODS[args.method](args)
    report = {"method": args.method, "wall_s": wall_s, "peak_rss_mb": peak_memory_mb(), "threads": args.threads}
    (args.output_dir / "run.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The pairs a run registers (one from the command line, a datalist, or the embedded sample) and their loading."""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.io import RegistrationInputError, load_image, load_label, load_landmarks, load_mask
from common.sample import sample_pair

PATH_KEYS = (
    "fixed",
    "moving",
    "fixed_label",
    "moving_label",
    "fixed_landmarks",
    "moving_landmarks",
    "fixed_mask",
    "moving_mask",
)


def bundle_root(name: str) -> str:
    """Folder of bundle ``name``: the cwd when it is that bundle's own folder (a bundle exported alone, run from its
    root as model-zoo bundles are), else ``bundles/<name>`` beside the installed ``common`` package, else under the
    cwd."""
    here = Path.cwd()
    if here.name == name and (here / "configs" / "metadata.json").is_file():
        return str(here)
    beside = Path(__file__).resolve().parents[2] / "bundles" / name
    return str(beside if beside.is_dir() else here / "bundles" / name)


def bundle_component(name: str, id: str, overrides: Mapping[str, Any] | None = None, config: str = "inference") -> Any:
    """Component ``id`` of bundle ``name``'s ``configs/<config>.json``, with ``overrides`` (id -> content) applied:
    another bundle's method used as part of this one (its registration as a training target, say)."""
    parser = ConfigParser()
    parser.read_config(str(Path(bundle_root(name)) / "configs" / f"{config}.json"))
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser.get_parsed_content(id)


def _check_companions(pair: Mapping[str, Any], where: str = "") -> None:
    """Landmarks come in fixed/moving pairs; a moving label map may come alone (its warped copy is then the fixed
    image's segmentation, as in atlas-based segmentation), a fixed one only with a moving one to compare."""
    if pair.get("fixed_label") and not pair.get("moving_label"):
        raise RegistrationInputError(f"{where}--fixed_label needs --moving_label: the labels to compare it with")
    if bool(pair.get("fixed_landmarks")) != bool(pair.get("moving_landmarks")):
        raise RegistrationInputError(
            f"{where}--fixed_landmarks and --moving_landmarks go together: give both or neither"
        )


def _datalist_pairs(datalist: str) -> list[dict[str, Any]]:
    path = Path(datalist)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistrationInputError(f"datalist '{datalist}': file not found") from None
    except (OSError, ValueError) as e:
        raise RegistrationInputError(f"datalist '{datalist}': not readable JSON ({e})") from None
    entries = content.get("pairs") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not entries:
        raise RegistrationInputError(f"datalist '{datalist}': needs a non-empty list under the key \"pairs\"")
    pairs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("fixed") or not entry.get("moving"):
            raise RegistrationInputError(f'datalist \'{datalist}\': pair {i} needs "fixed" and "moving" paths')
        pair = {k: str((path.parent / entry[k]).resolve()) for k in PATH_KEYS if entry.get(k)}
        pair["id"] = str(entry.get("id") or f"{i:03d}_{Path(entry['moving']).name.split('.')[0]}")
        if pair["id"] in (".", "..") or Path(pair["id"]).name != pair["id"] or "\\" in pair["id"]:
            raise RegistrationInputError(
                f"datalist '{datalist}': pair id '{pair['id']}' must be a plain folder name (it names the pair's "
                "output folder inside --output_dir)"
            )
        _check_companions(pair, f"datalist '{datalist}', pair {pair['id']}: ")
        pairs.append(pair)
    if len({p["id"] for p in pairs}) != len(pairs):
        raise RegistrationInputError(f"datalist '{datalist}': pair ids must be unique")
    return pairs


def build_pairs(
    fixed: str | None = None,
    moving: str | None = None,
    fixed_label: str | None = None,
    moving_label: str | None = None,
    fixed_landmarks: str | None = None,
    moving_landmarks: str | None = None,
    datalist: str | None = None,
    fixed_mask: str | None = None,
    moving_mask: str | None = None,
) -> list[dict[str, Any]]:
    """Pairs to register, each a dict of paths plus ``"id"`` (``""`` for a single pair: outputs go to the root).

    A datalist (``{"pairs": [{"fixed": ..., "moving": ..., ...}]}``, paths relative to the file) takes precedence;
    with neither a datalist nor ``fixed``/``moving``, the embedded sample pair is registered.
    """
    if datalist:
        return _datalist_pairs(datalist)
    given = {
        "fixed": fixed,
        "moving": moving,
        "fixed_label": fixed_label,
        "moving_label": moving_label,
        "fixed_landmarks": fixed_landmarks,
        "moving_landmarks": moving_landmarks,
        "fixed_mask": fixed_mask,
        "moving_mask": moving_mask,
    }
    if not fixed and not moving:
        if any(given.values()):
            raise RegistrationInputError("labels, landmarks or masks were given without --fixed and --moving")
        return [{**sample_pair(), "id": ""}]
    if not fixed or not moving:
        raise RegistrationInputError(f"--{'fixed' if not fixed else 'moving'} is missing: give both images")
    _check_companions(given)
    return [{**{k: str(v) for k, v in given.items() if v}, "id": ""}]


class LoadRegistrationPaird(MapTransform):
    """Load and validate a pair's images, label maps and landmarks (see :mod:`common.io`).

    Images become ``MetaTensor [1, X, Y, Z]`` (RAS affine), labels ``int32`` and masks ``bool`` on their image's
    grid, landmarks ``[N, 3]`` RAS mm. Raises :class:`~common.io.RegistrationInputError` naming the file and the problem.

    Args:
        landmark_convention: ``"auto"``, ``"LPS"`` or ``"RAS"`` for landmark CSVs without a header saying which.
    """

    def __init__(self, keys: KeysCollection = ("fixed", "moving"), landmark_convention: str = "auto") -> None:
        super().__init__(keys)
        self.landmark_convention = landmark_convention

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in ("fixed", "moving"):
            d[f"{key}_path"] = d[key]
            d[key] = load_image(d[key], role=f"{key} image")
        for key in ("fixed", "moving"):
            if d.get(f"{key}_label"):
                d[f"{key}_label"] = load_label(d[f"{key}_label"], d[key], role=f"{key} label map")
            if d.get(f"{key}_mask"):
                d[f"{key}_mask_path"] = d[f"{key}_mask"]
                d[f"{key}_mask"] = load_mask(d[f"{key}_mask"], d[key], role=f"{key} mask")
            if d.get(f"{key}_landmarks"):
                d[f"{key}_landmarks"] = load_landmarks(
                    d[f"{key}_landmarks"], self.landmark_convention, role=f"{key} landmarks"
                )
        if "fixed_landmarks" in d and len(d["fixed_landmarks"]) != len(d["moving_landmarks"]):
            raise RegistrationInputError(
                f"landmarks: {len(d['fixed_landmarks'])} fixed but {len(d['moving_landmarks'])} moving points"
            )
        return d

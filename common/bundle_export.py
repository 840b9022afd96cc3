"""Export one bundle as a zip that runs on its own, as model-zoo bundles do.

    python -m common.bundle_export node_mind node_mind.zip

The zip holds ``<name>/`` with ``configs/``, ``models/``, ``docs/`` and the project's ``LICENSE``. Unzipped anywhere,
it runs from its own folder (``cd <name> && python -m monai.bundle run --config_file configs/inference.json``) with
this project's package installed (``common``, the requirement its metadata names under
``required_packages_version``); its configs find their weights relative to that folder.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

from common.bundle_config import DELTA_SUFFIX
from common.workflow import bundle_root

__all__ = ["export_bundle"]

_PARTS = ("configs", "models", "docs")
_LICENSE = Path(__file__).resolve().parents[1] / "LICENSE"


def export_bundle(name: str, destination: str | Path) -> Path:
    """Write bundle ``name`` into the zip ``destination`` (its folders, without caches); returns the zip's path."""
    root = Path(bundle_root(name))
    if not (root / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"no bundle '{name}' at {root} (configs/metadata.json missing)")
    json.loads((root / "configs" / "metadata.json").read_text())  # a broken metadata file fails here, not in use
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for part in _PARTS:
            for path in sorted((root / part).rglob("*")):
                # deltas build the configs inside this repository only; the zip carries the full configs
                if (
                    path.is_file()
                    and "__pycache__" not in path.parts
                    and not path.name.endswith((DELTA_SUFFIX, ".base.json"))
                ):
                    archive.write(path, Path(name) / path.relative_to(root))
        license_file = root / "LICENSE" if (root / "LICENSE").is_file() else _LICENSE
        archive.write(license_file, Path(name) / "LICENSE")
    return destination


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the bundle's folder name under bundles/, e.g. node_mind")
    parser.add_argument("destination", help="the zip to write")
    args = parser.parse_args()
    print(export_bundle(args.name, args.destination))


if __name__ == "__main__":
    main()

"""Each bundle's complete config files, built from the shared bases in ``common/configs/`` and the bundle's deltas.

    python -m common.bundle_config           # rewrite every bundle's built configs
    python -m common.bundle_config --check   # exit 1 naming each built config that is out of date

What all bundles share is written once, in ``common/configs/``: ``inference.json`` (inputs, loading, outputs,
evaluator), ``neural_ode_inference.json`` (the Neural ODE flow and its instance optimisation), ``train.json`` (the
held-out split, trainer, validation, checkpoints that resume). A bundle's ``configs/<name>_delta.json`` names its
bases under ``_bases_`` and holds only what is its own; the merge is MONAI's own for a list of config files
(``--config_file "[base, ..., delta]"`` gives the same content): a later file replaces a top-level key, and an
``a#b`` key replaces one nested value. The result is written as the bundle's ``configs/<name>.json``, so that a
bundle runs, and exports to the model zoo, as self-contained files. An override file (a preset such as
``longitudinal.json``) is built the same way from a base that holds override keys only. ``logging.conf`` (every
bundle) and ``multi_gpu_train.json`` (bundles that train) are the same for all bundles and are copied as they are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

__all__ = [
    "BASES_DIR",
    "DELTA_SUFFIX",
    "base_files",
    "built_configs",
    "format_config",
    "is_override",
    "merged_config",
    "write_bundle_configs",
]

BASES_DIR = Path(__file__).resolve().parent / "configs"
DELTA_SUFFIX = "_delta.json"
_BASES_KEY = "_bases_"
_LINE = 116  # JSON arrays and objects that fit on one line of this width stay on one line


def base_files(delta: str | Path, bases_dir: str | Path = BASES_DIR) -> list[str]:
    """The files a ``delta`` extends, in order: its ``_bases_``, each a name in ``bases_dir`` or, written ``./name``,
    a ``name.base.json`` beside the delta (what several configs of one bundle share, such as its network sizes)."""
    bases = json.loads(Path(delta).read_text()).get(_BASES_KEY)
    if not isinstance(bases, list) or not bases:
        raise ValueError(f"{delta}: '{_BASES_KEY}' must list the base configs it extends, e.g. [\"inference\"]")
    own = Path(delta).parent
    return [str(own / f"{n[2:]}.base.json" if n.startswith("./") else Path(bases_dir) / f"{n}.json") for n in bases]


def is_override(config: dict[str, Any]) -> bool:
    """Whether ``config`` is an override file (a preset): every key but ``_bases_`` a path into the config it is
    listed after (``a#b``), so it merges onto that config rather than standing alone."""
    keys = [key for key in config if key != _BASES_KEY]
    return bool(keys) and all("#" in key or "::" in key for key in keys)


def merged_config(delta: str | Path, bases_dir: str | Path = BASES_DIR) -> dict[str, Any]:
    """The full config of a bundle's ``delta`` file: its ``_bases_`` (names in ``bases_dir``) then the delta, merged
    as MONAI merges a list of config files."""
    files = base_files(delta, bases_dir) + [str(delta)]
    if is_override(ConfigParser.load_config_file(files[0])):
        # its keys stay flat paths: MONAI's merge would look them up in a config that is not there
        merged = {k: v for f in files for k, v in ConfigParser.load_config_file(f).items()}
    else:
        merged = ConfigParser.load_config_files(files)
    merged.pop(_BASES_KEY)
    return merged


def format_config(config: Any, indent: int = 0, key_width: int = 0) -> str:
    """``config`` as JSON with 4-space indents, each array or object on one line when it fits in 116 characters."""
    compact = json.dumps(config, separators=(", ", ": "))
    if not isinstance(config, (dict, list)) or indent + key_width + len(compact) <= _LINE:
        return compact
    pad = " " * (indent + 4)
    if isinstance(config, dict):
        items = [
            f"{pad}{json.dumps(k)}: {format_config(v, indent + 4, len(json.dumps(k)) + 2)}" for k, v in config.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + format_config(v, indent + 4) for v in config]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def built_configs(bundle: str | Path, bases_dir: str | Path = BASES_DIR) -> dict[Path, str]:
    """Every built file of one bundle folder and the text it must have."""
    configs = Path(bundle) / "configs"
    built = {
        delta.with_name(delta.name[: -len(DELTA_SUFFIX)] + ".json"): format_config(merged_config(delta, bases_dir))
        + "\n"
        for delta in sorted(configs.glob(f"*{DELTA_SUFFIX}"))
    }
    trains = any(path.name.startswith("train") for path in built)
    shared = ["logging.conf"] + (["multi_gpu_train.json"] if trains else [])
    built.update({configs / name: (Path(bases_dir) / name).read_text() for name in shared})
    return built


def write_bundle_configs(bundles_dir: str | Path, check: bool = False) -> list[Path]:
    """Write the built configs of every bundle (a folder with ``configs/metadata.json``) in ``bundles_dir``; with
    ``check``, write nothing. Returns the files that were (or, with ``check``, would be) changed."""
    changed = []
    for metadata in sorted(Path(bundles_dir).glob("*/configs/metadata.json")):
        for target, text in built_configs(metadata.parent.parent).items():
            if not target.is_file() or target.read_text() != text:
                changed.append(target)
                if not check:
                    target.write_text(text)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", default=str(Path(__file__).resolve().parents[1] / "bundles"))
    parser.add_argument("--check", action="store_true", help="only report configs that are out of date")
    args = parser.parse_args()
    changed = write_bundle_configs(args.bundles, check=args.check)
    for path in changed:
        print(("out of date: " if args.check else "written: ") + str(path))
    if args.check and changed:
        sys.exit(1)


if __name__ == "__main__":
    main()

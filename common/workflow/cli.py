"""The command line (``python -m monai.bundle run ... --key value``): one-line errors, checked overrides, switches."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from common.io import RegistrationInputError, switch

__all__ = ["PRESETS", "check_command_line", "input_error_cause", "os_error_cause", "switch"]

# override files that change a bundle's defaults for a kind of pair (``configs/<name>.json``)
PRESETS = ("longitudinal", "quick")
# arguments of monai.bundle's ``run`` itself, not config overrides
_RUN_ARGUMENTS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}


def input_error_cause(error: BaseException) -> RegistrationInputError | None:
    """The user-input error behind ``error``, which MONAI's transforms and config parser wrap in RuntimeErrors."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, RegistrationInputError):
        cause = cause.__cause__
    return cause


def os_error_cause(error: BaseException) -> OSError | None:
    """The operating-system error (unwritable folder, full disk, ...) behind ``error``, if any."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    return cause


def _one_line_hook(previous: Callable[..., Any]) -> Callable[..., None]:
    def hook(kind: type, error: BaseException, tb: Any) -> None:
        cause = input_error_cause(error)
        if cause is None:
            previous(kind, error, tb)
        else:
            print(f"error: {cause}", file=sys.stderr)

    hook.one_line = True  # type: ignore[attr-defined]
    return hook


def _overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Config files and ``--key value`` overrides of a ``monai.bundle run`` command line (values as typed)."""
    files: list[str] = []
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:  # "--key value", or a bare "--key", which fire reads as True
            value = "true"
            if i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
        if key == "config_file":
            files = [f.strip(" '\"") for f in value.strip("[]()").split(",")]
        elif key not in _RUN_ARGUMENTS:
            overrides[key] = value
    return files, overrides


def _check(key: str, value: str, default: Any) -> None:
    if isinstance(default, bool) or (isinstance(default, list) and default and isinstance(default[0], bool)):
        switch(value, key)
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            float(value)
        except ValueError:
            raise RegistrationInputError(f"--{key} {value}: a number is expected (default {default})") from None
    elif isinstance(default, list) and default and not (value.startswith(("[", "(")) or "," in value):
        try:
            float(value)
        except ValueError:
            raise RegistrationInputError(f"--{key} {value}: a list is expected, like {default}") from None


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """Check a bundle's command line before anything runs, and report user errors in one line from here on.

    Installs an excepthook that prints a :class:`~common.io.RegistrationInputError` (however deeply MONAI wrapped it)
    as ``error: <message>`` instead of a stack trace. Then, when the process is ``python -m monai.bundle run``, every
    ``--key value`` must name a setting of the bundle's config (a mistyped key is an error with the closest names,
    not a new unused setting) and fit its default: a switch takes true/false, a number a number, a list a list.
    From Python (``ConfigWorkflow``), values arrive typed and only the excepthook is installed.

    Args:
        argv: the command line to check; default ``sys.argv`` when it is a ``monai.bundle run``.
    """
    if not getattr(sys.excepthook, "one_line", False):
        sys.excepthook = _one_line_hook(sys.excepthook)
    if argv is None:
        if len(sys.argv) < 2 or Path(sys.argv[0]).parent.name != "bundle" or sys.argv[1] != "run":
            return
        argv = sys.argv[2:]
    files, overrides = _overrides(argv)
    if not files:
        return
    parser = ConfigParser()
    parser.read_config(files)
    for key, value in overrides.items():
        if key == "preset" and key not in parser:
            raise RegistrationInputError(_preset_hint(value, files))
        if key in parser:
            _check(key, value, parser.get(key))
            continue
        known = [k for k in _ids(parser.get()) if not k.startswith("_")]
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        raise RegistrationInputError(f"--{key}: no such setting in {', '.join(files)}{hint}")


def _preset_hint(name: str, files: list[str]) -> str:
    """How to use a preset: as MONAI merges override files, by adding the preset's file after the config."""
    folder = Path(files[0]).parent
    available = sorted(p.stem for p in folder.glob("*.json") if p.stem in PRESETS)
    if name not in available:
        listed = ", ".join(available) or "none"
        return f"--preset {name}: no such preset beside {files[0]} (presets of this bundle: {listed})"
    preset = folder / f"{name}.json"
    return (
        f"--preset {name}: a preset is an override file, listed after the config: "
        f"--config_file \"['{files[0]}','{preset}']\""
    )


def _ids(config: Any, prefix: str = "") -> list[str]:
    """Every id of a config (``a``, ``a#b``, ``a#0``)."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    ids = []
    for k, v in items:
        key = f"{prefix}{k}"
        ids += [key, *_ids(v, key + "#")]
    return ids

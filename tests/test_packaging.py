"""Packaging checks: bundle metadata against the shipped schema, the install requirements, CI and README."""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import torch
from monai.bundle import ConfigParser
from packaging.requirements import Requirement

from common.workflow.cli import PRESETS as PRESET_NAMES

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "bundles" / "schema" / "meta_schema_20240725.json"
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"  # the published file, unchanged
BUNDLES = sorted(p.parent.parent.name for p in (ROOT / "bundles").glob("*/configs/metadata.json"))


def _configs(bundle: str) -> Path:
    return ROOT / "bundles" / bundle / "configs"


def _metadata(bundle: str) -> dict:
    return json.loads((_configs(bundle) / "metadata.json").read_text())


def test_every_bundle_has_the_files_of_a_bundle():
    assert "node_mind" in BUNDLES
    for bundle in BUNDLES:
        for name in ("configs/inference.json", "configs/logging.conf", "docs/README.md"):
            assert (ROOT / "bundles" / bundle / name).is_file(), f"{bundle}/{name}"


def test_each_built_config_is_its_bases_and_delta_merged():
    """A bundle's inference.json and train.json are what ``python -m common.bundle_config`` builds from the shared
    bases and the bundle's deltas, and equal MONAI's own merge of that list of files (same components)."""
    from common.bundle_config import base_files, is_override, merged_config, write_bundle_configs

    assert write_bundle_configs(ROOT / "bundles", check=True) == [], "run: python -m common.bundle_config"
    deltas = sorted((ROOT / "bundles").glob("*/configs/*_delta.json"))
    assert {d.parent.parent.name for d in deltas} >= {"node_mind", "node_lmi", "node_contrastive", "tto_kd"}
    for delta in deltas:
        if is_override(merged_config(delta)):
            continue  # an override file (a preset): see the preset's own test
        listed = ConfigParser()
        listed.read_config(base_files(delta) + [str(delta)])
        built = ConfigParser()
        built.read_config(str(delta.with_name(delta.name.replace("_delta", ""))))
        for key in ("inferer", "network_def", "handlers", "postprocessing", "evaluator", "train", "validate"):
            if key in built:
                assert built.get(key) == listed.get(key), f"{delta}: {key}"


PRESETS = [
    (b, "longitudinal") for b in ("node_mind", "node_lmi", "node_contrastive", "tto_kd", "vfa_brainid_adapter")
] + [("node_mind", "quick"), ("node_lmi", "quick")]


@pytest.mark.parametrize("bundle,preset", PRESETS)
def test_each_preset_changes_existing_settings_of_its_bundle(bundle, preset):
    """Every key of a preset (``configs/<preset>.json``) names a setting the bundle's inference config has (a mistyped
    key would add an unused setting and change nothing) and changes it; the longitudinal preset's merged config builds
    a rigid-only affine stage."""
    assert preset in PRESET_NAMES
    overrides = json.loads((_configs(bundle) / f"{preset}.json").read_text())
    plain = ConfigParser()
    plain.read_config(str(_configs(bundle) / "inference.json"))
    assert overrides and all(key in plain for key in overrides), [key for key in overrides if key not in plain]
    merged = ConfigParser()
    merged.read_config([str(_configs(bundle) / "inference.json"), str(_configs(bundle) / f"{preset}.json")])
    if preset == "longitudinal":
        assert merged.get_parsed_content("affine_stage").stages == ("rigid",)
    for key, value in overrides.items():
        assert merged.get(key) == value != plain.get(key)


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {req.name.lower(): req for req in map(Requirement, project["dependencies"])}


def _readme_command(marker: str) -> str:
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is not written yet")
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme.read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines() if marker in line]
    assert lines, f"README.md has no command containing {marker!r}"
    return lines[0]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_valid_against_shipped_schema(bundle):
    metadata = _metadata(bundle)
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    jsonschema.validate(metadata, schema)
    # monai.bundle.verify_metadata reads the local copy only when it bears the URL's file name
    assert metadata["schema"].rsplit("/", 1)[-1] == SCHEMA.name


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_metadata_uses_local_schema_without_network(monkeypatch, bundle):
    import monai.apps.utils
    from monai.bundle import verify_metadata

    def no_download(*args, **kwargs):
        raise AssertionError("verify_metadata tried to download the schema")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", no_download)
    verify_metadata(meta_file=str(_configs(bundle) / "metadata.json"), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)


# the bundles that ship a trained network, its config id and its weights
TRAINED = {"tto_kd": ("network_def", "student.pt"), "node_contrastive": ("descriptor_def", "descriptor.pt")}


@pytest.mark.parametrize("bundle", sorted(set(BUNDLES) - set(TRAINED)))
def test_metadata_network_io(bundle):
    """A bundle without a trained network describes its registration: two images in, a displacement out."""
    io = _metadata(bundle)["network_data_format"]
    assert {k: v["num_channels"] for k, v in io["inputs"].items()} == {"fixed": 1, "moving": 1}
    assert {k: v["num_channels"] for k, v in io["outputs"].items()} == {"ddf": 3}
    for tensor in [*io["inputs"].values(), *io["outputs"].values()]:
        assert tensor["spatial_shape"] == ["*", "*", "*"]


@pytest.mark.parametrize("bundle", sorted(TRAINED))
def test_a_trained_network_passes_the_zoo_checks_and_exports_to_torchscript(bundle, tmp_path):
    """``verify_net_in_out`` against the metadata's ``network_data_format``, then ``ckpt_export`` (traced: MONAI's
    Gaussian filter does not script) of the shipped weights; the TorchScript file gives the eager network's output."""
    from monai.bundle import ckpt_export, verify_net_in_out

    net_id, weights = TRAINED[bundle]
    config, meta = str(_configs(bundle) / "inference.json"), str(_configs(bundle) / "metadata.json")
    verify_net_in_out(net_id=net_id, meta_file=meta, config_file=config, device="cpu", n=2)
    channels = _metadata(bundle)["network_data_format"]["inputs"]["image"]["num_channels"]
    exported = tmp_path / "model.ts"
    checkpoint = str(ROOT / "bundles" / bundle / "models" / weights)
    ckpt_export(
        net_id=net_id,
        filepath=str(exported),
        ckpt_file=checkpoint,
        meta_file=meta,
        config_file=config,
        use_trace=True,
        input_shape=[1, channels, 32, 32, 32],
    )
    parser = ConfigParser()
    parser.read_config(config)
    eager = parser.get_parsed_content(net_id)
    eager.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    eager.eval()
    scripted = torch.jit.load(str(exported))
    x = torch.rand(1, channels, 48, 32, 64)  # another shape than the trace's
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_versions_agree_with_pyproject(bundle):
    metadata, requirements = _metadata(bundle), _requirements()
    assert requirements["monai"].specifier.contains(metadata["monai_version"])
    assert requirements["torch"].specifier.contains(metadata["pytorch_version"])
    # an exported bundle needs this project's package (its ``common``): the metadata says which version
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert metadata["required_packages_version"][pyproject["name"]] == pyproject["version"]


def test_exported_bundles_run_alone_from_their_own_folders(tmp_path):
    """``python -m common.bundle_export`` writes a zip per bundle that, unzipped outside the repository, runs from its
    own folder with its own configs and weights (here: the bundle root each resolves, and a run for node_mind)."""
    import subprocess
    import sys
    import zipfile

    from common.bundle_export import export_bundle

    folders = {}
    for bundle in BUNDLES:
        archive = tmp_path / f"{bundle}.zip"
        if bundle == "node_mind":  # the command line once; the others through the function it calls
            subprocess.run([sys.executable, "-m", "common.bundle_export", bundle, str(archive)], check=True, cwd=ROOT)
        else:
            export_bundle(bundle, archive)
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp_path / "unzipped")
        folders[bundle] = alone = tmp_path / "unzipped" / bundle
        assert {p.name for p in alone.iterdir()} == {"configs", "models", "docs", "LICENSE"}, bundle
        assert not list(alone.glob("configs/*_delta.json")) and not list(alone.glob("configs/*.base.json")), bundle
    # one interpreter visits every unzipped folder, as a user would cd into it, and parses its config there
    probe = "import os, sys; from monai.bundle import ConfigParser\nfor folder in sys.argv[1:]:\n"
    probe += "    os.chdir(folder); p = ConfigParser(); p.read_config('configs/inference.json')\n"
    probe += "    print(p.get_parsed_content('bundle_root'))"
    found = subprocess.run(
        [sys.executable, "-c", probe, *map(str, folders.values())], cwd=tmp_path, capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip().splitlines()[-len(folders) :] == [str(f) for f in folders.values()]
    # one full run on the embedded sample, short schedule
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    command += ["--output_dir", "out", "--inferer#iterations", "[10, 5]", "--progress", "false"]
    subprocess.run(command, cwd=folders["node_mind"], check=True, capture_output=True, text=True)
    metrics = json.loads((folders["node_mind"] / "out" / "metrics.json").read_text())
    assert metrics["dice"]["after"]["mean"] > metrics["dice"]["before"]["mean"]


def test_pyproject_pulls_no_cuda_build():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert project["name"] == "monai-multimodal-registration"
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["common*"]
    requirements = _requirements()
    extras = [Requirement(r) for reqs in project["optional-dependencies"].values() for r in reqs]
    for req in [*requirements.values(), *extras]:
        assert not req.name.lower().startswith("nvidia"), req
        assert req.url is None, req
    torch = requirements["torch"]
    assert torch.specifier, "torch must be constrained"
    assert all(spec.operator in (">=", ">", "<", "<=", "!=") for spec in torch.specifier), torch
    assert all("+" not in spec.version for spec in torch.specifier), torch


def test_pyproject_version_matches_package():
    import common

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == common.__version__


@pytest.mark.parametrize("bundle", BUNDLES)
def test_logging_conf_has_console_handler(bundle):
    parser = configparser.ConfigParser(interpolation=None)
    assert parser.read(_configs(bundle) / "logging.conf")
    assert parser["logger_root"]["handlers"] in parser["handlers"]["keys"]
    assert parser["handler_console"]["class"] == "StreamHandler"
    assert "%(asctime)s" in parser["formatter_timed"]["format"]


def test_readme_torch_pin_satisfies_requirement():
    command = _readme_command("python -m pytest")
    pinned = re.search(r"pip install torch==(\S+)", command)
    assert pinned, command
    assert _requirements()["torch"].specifier.contains(pinned.group(1))


def test_ci_runs_readme_test_command():
    command = _readme_command("python -m pytest")
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    assert command in ci.read_text()
    subprocess.run(["bash", "-n", str(ci)], check=True)


def test_a_delta_without_bases_is_refused_and_a_local_base_is_read_beside_it(tmp_path):
    from common.bundle_config import merged_config

    delta = tmp_path / "inference_delta.json"
    delta.write_text(json.dumps({"bundle_name": "x"}))
    with pytest.raises(ValueError, match="_bases_"):
        merged_config(delta)
    (tmp_path / "sizes.base.json").write_text(json.dumps({"channels": [1, 2], "bundle_name": "base"}))
    delta.write_text(json.dumps({"_bases_": ["inference", "./sizes"], "bundle_name": "x"}))
    merged = merged_config(delta)
    assert merged["channels"] == [1, 2] and merged["bundle_name"] == "x" and "evaluator" in merged

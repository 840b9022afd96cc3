"""The MONAI Label app (apps/monailabel), served by the real ``monailabel start_server`` on localhost: atlas-based
segmentation through a bundle over the REST API, and MONAI Label's own replies to bad requests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.io import load_image, load_label, resample_to_grid
from common.metrics import dice_per_label, mean_dict
from common.sample import sample_pair

pytest.importorskip("monailabel", reason='MONAI Label is not installed (README: pip install -e ".[monailabel]" ...)')
httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[1]
FAST = {"inferer#iterations": [10, 5], "save_qc": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``monailabel start_server`` on a studies folder holding the sample's fixed T2 image as ``subject``."""
    root = tmp_path_factory.mktemp("monailabel")
    studies = root / "studies"
    studies.mkdir()
    shutil.copyfile(sample_pair()["fixed"], studies / "subject.nii.gz")
    # a labelled image of the datastore, to register instead of the atlas (image-to-image)
    shutil.copyfile(sample_pair()["moving"], studies / "labelled_t1.nii.gz")
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copyfile(sample_pair()["moving_label"], studies / "labels" / "final" / "labelled_t1.nii.gz")
    port = _free_port()
    monailabel = Path(sys.executable).with_name("monailabel")
    command = [str(monailabel), "start_server", "--app", str(REPO / "apps" / "monailabel"), "--studies", str(studies)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--conf", "output_dir", str(root / "outputs")]
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env())
        try:
            for _ in range(240):
                if process.poll() is not None:
                    pytest.fail(f"the server exited: {(root / 'server.log').read_text()[-3000:]}")
                try:
                    if httpx.get(f"{url}/info/", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
            else:
                pytest.fail("the server did not answer within 2 minutes")
            yield {"url": url, "studies": studies, "outputs": root / "outputs"}
        finally:
            process.terminate()
            process.wait(timeout=60)


def _env() -> dict[str, str]:
    """The server and the command line compute alike: one thread each (float sums depend on the thread count)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def test_the_server_lists_every_bundle_as_a_model(server):
    models = httpx.get(f"{server['url']}/info/", timeout=10).json()["models"]
    bundles = sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/inference.json"))
    assert sorted(models) == bundles and all(m["type"] == "segmentation" for m in models.values())


def test_an_infer_request_returns_the_bundles_own_warped_atlas_labels(server, tmp_path):
    """POST /infer/node_mind for the studies image: the label returned is the bundle's own warped_label.nii.gz for
    the same pair and settings (run from the command line), Dice against the image's true labels went up, and the
    app's output folder keeps the warped image, fields and metrics beside it."""
    response = httpx.post(
        f"{server['url']}/infer/node_mind",
        params={"image": "subject", "output": "image"},
        data={"params": json.dumps({"overrides": FAST})},
        timeout=600,
    )
    assert response.status_code == 200, response.text[-2000:]
    returned = tmp_path / "returned.nii.gz"
    returned.write_bytes(response.content)

    sample = sample_pair()
    own = tmp_path / "own"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/node_mind/configs/inference.json"]
    command += ["--fixed", str(server["studies"] / "subject.nii.gz"), "--moving", sample["moving"]]
    command += ["--moving_label", sample["moving_label"], "--output_dir", str(own), "--progress", "false"]
    command += [arg for key, value in FAST.items() for arg in (f"--{key}", json.dumps(value))]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env=_env())
    label = np.asarray(nib.load(returned).dataobj)
    assert np.array_equal(label, np.asarray(nib.load(own / "warped_label.nii.gz").dataobj))

    fixed = load_image(sample["fixed"])
    truth = load_label(sample["fixed_label"], fixed)[0]
    atlas = load_label(sample["moving_label"], load_image(sample["moving"]))
    before = resample_to_grid(atlas, atlas.affine, fixed.affine, fixed.shape[1:], mode="nearest")[0]
    dice_before = mean_dict(dice_per_label(before.long(), truth.long()))
    dice_after = mean_dict(dice_per_label(torch.as_tensor(label.astype(np.int64)), truth.long()))
    assert dice_after > dice_before + 0.02, (dice_before, dice_after)
    kept = server["outputs"] / "node_mind" / "subject"
    assert {"warped.nii.gz", "ddf.nii.gz", "inverse_ddf.nii.gz", "metrics.json", "warped_label.nii.gz"} <= {
        p.name for p in kept.iterdir()
    }


def test_another_datastore_image_and_its_label_can_replace_the_atlas(server, tmp_path):
    """``moving_image`` names a labelled datastore image (here a copy of the atlas): the answer is the same label as
    with the atlas itself."""
    answers = []
    for params in ({"overrides": FAST}, {"overrides": FAST, "moving_image": "labelled_t1"}):
        response = httpx.post(
            f"{server['url']}/infer/node_mind",
            params={"image": "subject", "output": "image"},
            data={"params": json.dumps(params)},
            timeout=600,
        )
        assert response.status_code == 200, response.text[-2000:]
        path = tmp_path / f"{len(answers)}.nii.gz"
        path.write_bytes(response.content)
        answers.append(np.asarray(nib.load(path).dataobj))
    assert np.array_equal(*answers) and answers[0].max() > 0


def test_bad_requests_get_error_replies_and_the_server_keeps_serving(server):
    for model, image in (("no_such_bundle", "subject"), ("node_mind", "no_such_image")):
        response = httpx.post(f"{server['url']}/infer/{model}", params={"image": image}, timeout=60)
        assert response.status_code >= 400, (model, image)
    unlabelled = {"params": json.dumps({"moving_image": "subject"})}  # an image without a label to carry over
    response = httpx.post(f"{server['url']}/infer/node_mind", params={"image": "subject"}, data=unlabelled, timeout=60)
    assert response.status_code >= 400
    assert httpx.get(f"{server['url']}/info/", timeout=10).status_code == 200

"""Atlas-based segmentation by registration: a bundle registers a labelled atlas (any contrast) onto the request's
image and its warped atlas labels are that image's label."""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

__all__ = ["BundleRegistrationTask", "discover_bundles"]

logger = logging.getLogger(__name__)


def discover_bundles(bundles_dir: str | Path) -> list[str]:
    """Names of the bundles under ``bundles_dir`` that have an inference config."""
    return sorted(p.parent.parent.name for p in Path(bundles_dir).glob("*/configs/inference.json"))


class BundleRegistrationTask(InferTask):
    """Register the atlas (or, with the request param ``moving_image``, another datastore image and its label)
    onto the request's image with one bundle, and answer with the warped label map.

    The bundle runs exactly as ``python -m monai.bundle run --config_file <bundle>/configs/inference.json`` would,
    into ``<output_dir>/<bundle>/<image id>/``: warped image, fields, metrics.json and the QC picture stay there
    beside the label. The request param ``overrides`` (a dict of bundle settings, e.g.
    ``{"inferer#iterations": [50, 25]}``) changes settings for that request.

    Args:
        bundle_dir: the bundle's folder (``bundles/<name>``).
        atlas_image, atlas_label: the default moving image and its label map.
        output_dir: where each request's outputs go.
        datastore: the app's datastore (``MONAILabelApp.datastore``), to resolve a ``moving_image`` id.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        atlas_image: str,
        atlas_label: str,
        output_dir: str | Path,
        datastore: Callable[[], Any],
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        metadata = json.loads((self.bundle_dir / "configs" / "metadata.json").read_text())
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=None,
            dimension=3,
            description=f"atlas registration with {metadata['name']}",
            config={"overrides": {}, "moving_image": ""},
        )
        self.atlas_image, self.atlas_label = atlas_image, atlas_label
        self.output_dir, self.datastore = Path(output_dir), datastore

    def is_valid(self) -> bool:
        return (self.bundle_dir / "configs" / "inference.json").is_file()

    def _moving(self, request: dict[str, Any]) -> tuple[str, str]:
        moving_id = request.get("moving_image") or ""
        if not moving_id:
            return self.atlas_image, self.atlas_label
        store = self.datastore()
        image = store.get_image_uri(moving_id)
        labels = store.get_labels_by_image_id(moving_id) if image else {}
        if not image or not labels:
            problem = "no such image" if not image else "no label map to carry over"
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"moving_image '{moving_id}': {problem}")
        tag = next(iter(labels))
        return image, store.get_label_uri(labels[tag], tag)

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        fixed = request.get("image") or ""
        if not Path(fixed).is_file():
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "the requested image is not in the datastore")
        moving, moving_label = self._moving(request)
        overrides = request.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "overrides must be a dict of bundle settings")
        image_id = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(fixed).name.split(".")[0])
        out = self.output_dir / self.bundle_dir.name / image_id
        workflow = ConfigWorkflow(
            config_file=str(self.bundle_dir / "configs" / "inference.json"),
            workflow_type="infer",
            fixed=fixed,
            moving=moving,
            moving_label=moving_label,
            output_dir=str(out),
            **{"progress": False, **({"device": request["device"]} if request.get("device") else {}), **overrides},
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        metrics = json.loads((out / "metrics.json").read_text())
        logger.info(f"{self.bundle_dir.name}: {fixed} registered, outputs in {out}")
        summary = {k: metrics[k] for k in ("bundle", "version", "iterations", "time_s", "jacobian") if k in metrics}
        # MONAI Label deletes the file it answers with: answer with a copy, keep the label with the other outputs
        answer = Path(tempfile.mkdtemp(prefix="registration-")) / "label.nii.gz"
        shutil.copyfile(out / "warped_label.nii.gz", answer)
        return str(answer), {**summary, "output_dir": str(out)}

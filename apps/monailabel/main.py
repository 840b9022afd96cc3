"""A MONAI Label app whose models are the collection's bundles: atlas-based segmentation by registration.

    monailabel start_server --app apps/monailabel --studies IMAGES_DIR \
        [--conf atlas_image atlas.nii.gz --conf atlas_label atlas_labels.nii.gz --conf output_dir OUT]

Each bundle under ``bundles/`` with an inference config is one infer task (model) of the same name.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lib import BundleRegistrationTask, discover_bundles
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

import common
from common.sample import sample_pair

logger = logging.getLogger(__name__)

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"


class RegistrationApp(MONAILabelApp):
    """Atlas-based segmentation: the atlas (by default the collection's embedded sample T1 and its labels) registered
    onto each image with the bundle the request names."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        sample = sample_pair()
        self.atlas_image = conf.get("atlas_image", sample["moving"])
        self.atlas_label = conf.get("atlas_label", sample["moving_label"])
        self.output_dir = conf.get("output_dir", str(Path(app_dir) / "outputs"))
        for key in ("atlas_image", "atlas_label"):
            if not Path(getattr(self, key)).is_file():
                raise FileNotFoundError(f"--conf {key} {getattr(self, key)}: no such file")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MONAI Multimodal Registration",
            description="Atlas-based segmentation by multimodal deformable registration",
            version=common.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {
            name: BundleRegistrationTask(
                BUNDLES_DIR / name, self.atlas_image, self.atlas_label, self.output_dir, self.datastore
            )
            for name in discover_bundles(BUNDLES_DIR)
        }
        logger.info(f"registration models: {', '.join(infers)}; atlas {self.atlas_image}")
        return infers

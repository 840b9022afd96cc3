from .render import CLASS_MEANS, CONTRASTS, TISSUE_CLASSES, render_contrast, render_labels, tissue_class
from .transforms import RandLabelToImaged

__all__ = [
    "CLASS_MEANS",
    "CONTRASTS",
    "TISSUE_CLASSES",
    "RandLabelToImaged",
    "render_contrast",
    "render_labels",
    "tissue_class",
]

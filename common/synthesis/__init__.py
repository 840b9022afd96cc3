from .render import CLASS_MEANS, CONTRASTS, TISSUE_CLASSES, render_contrast, render_labels, tissue_class
from .transforms import LabelToContrastd, RandLabelToImaged

__all__ = [
    "CLASS_MEANS",
    "CONTRASTS",
    "TISSUE_CLASSES",
    "LabelToContrastd",
    "RandLabelToImaged",
    "render_contrast",
    "render_labels",
    "tissue_class",
]

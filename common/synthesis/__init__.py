from .render import CLASS_MEANS, CONTRASTS, TISSUE_CLASSES, render_contrast, tissue_class

__all__ = ["CLASS_MEANS", "CONTRASTS", "TISSUE_CLASSES", "render_contrast", "tissue_class"]

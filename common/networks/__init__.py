from .descriptor import DescriptorUNet, SelfSimilarityDescriptor

__all__ = ["DescriptorUNet", "SelfSimilarityDescriptor"]

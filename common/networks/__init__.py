from .descriptor import DescriptorUNet, SelfSimilarityDescriptor, frozen

__all__ = ["DescriptorUNet", "SelfSimilarityDescriptor", "frozen"]

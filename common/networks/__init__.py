from .descriptor import DescriptorUNet, SelfSimilarityDescriptor
from .displacement import DisplacementUNet
from .weights import frozen, load_weights

__all__ = ["DescriptorUNet", "DisplacementUNet", "SelfSimilarityDescriptor", "frozen", "load_weights"]

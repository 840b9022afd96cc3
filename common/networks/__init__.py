from .adapter import FrozenBackboneAdapter
from .brainid import BrainIDSynthesizer, BrainIDUNet
from .descriptor import DescriptorUNet, SelfSimilarityDescriptor
from .displacement import DisplacementUNet, PairInput
from .refiners import ProgressiveRefiner
from .vfa import VFA, VFAEncoder
from .weights import checkpoint_state_dict, frozen, load_weights

__all__ = [
    "VFA",
    "BrainIDSynthesizer",
    "BrainIDUNet",
    "DescriptorUNet",
    "DisplacementUNet",
    "FrozenBackboneAdapter",
    "PairInput",
    "ProgressiveRefiner",
    "SelfSimilarityDescriptor",
    "VFAEncoder",
    "checkpoint_state_dict",
    "frozen",
    "load_weights",
]

from .affine import AffineRegistration, AffineResult
from .convex import CoupledConvexInitializer
from .finetuning import TestTimeOptimizationInferer, network_fields, working_shape
from .gate import AnatomyGate, ContrastGate, GatedStyleTransfer, local_correlation
from .optimizer import BestState, PairAdam, create_pair_engine
from .precision import autocast_bfloat16, check_amp, native_bfloat16
from .protocols import (
    InvertibleModel,
    LocalDescriptor,
    MultiStartModel,
    PairRegistration,
    PatchSimilarity,
    RegistrationResult,
    RegistrationStats,
    StartableModel,
)
from .registration import InstanceOptimizationInferer, downsample_image

__all__ = [
    "AffineRegistration",
    "AffineResult",
    "AnatomyGate",
    "BestState",
    "ContrastGate",
    "CoupledConvexInitializer",
    "GatedStyleTransfer",
    "InstanceOptimizationInferer",
    "InvertibleModel",
    "LocalDescriptor",
    "MultiStartModel",
    "PairAdam",
    "PairRegistration",
    "PatchSimilarity",
    "RegistrationResult",
    "RegistrationStats",
    "StartableModel",
    "TestTimeOptimizationInferer",
    "autocast_bfloat16",
    "check_amp",
    "create_pair_engine",
    "downsample_image",
    "local_correlation",
    "native_bfloat16",
    "network_fields",
    "working_shape",
]

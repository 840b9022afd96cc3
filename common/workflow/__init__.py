"""Glue between a bundle's config and the registration code: the pairs to register, the loop over them, outputs."""

from .evaluator import RegistrationEvaluator
from .motion import MotionCorrector, region_mask
from .pairs import LoadRegistrationPaird, build_pairs, bundle_root

__all__ = ["LoadRegistrationPaird", "MotionCorrector", "RegistrationEvaluator", "build_pairs", "bundle_root", "region_mask"]

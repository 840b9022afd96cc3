"""Glue between a bundle's config and the registration code: the pairs to register, the loop over them, outputs."""

from .evaluator import RegistrationEvaluator
from .pairs import LoadRegistrationPaird, build_pairs, bundle_root

__all__ = ["LoadRegistrationPaird", "RegistrationEvaluator", "build_pairs", "bundle_root"]

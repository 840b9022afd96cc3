"""Glue between a bundle's config and the registration code: the pairs to register, the loop over them, outputs."""

from .cli import check_command_line, input_error_cause, switch
from .device import resolve_device
from .evaluator import RegistrationEvaluator
from .executors import RayExecutor, outputs_complete, pair_executor
from .handlers import ImageWriter, MetricsWriter, PairOutputHandler, PairSummary, QCFigureWriter
from .motion import MotionCorrector, region_mask
from .pairs import LoadRegistrationPaird, build_pairs, bundle_component, bundle_root
from .postprocessing import (
    InverseOnMovingGridd,
    JacobianDeterminantd,
    PlausibilityReportd,
    RegistrationMetricsd,
    WarpMovingd,
)

__all__ = [
    "ImageWriter",
    "InverseOnMovingGridd",
    "JacobianDeterminantd",
    "LoadRegistrationPaird",
    "MetricsWriter",
    "MotionCorrector",
    "PairOutputHandler",
    "PairSummary",
    "PlausibilityReportd",
    "QCFigureWriter",
    "RayExecutor",
    "RegistrationEvaluator",
    "RegistrationMetricsd",
    "WarpMovingd",
    "build_pairs",
    "bundle_component",
    "bundle_root",
    "check_command_line",
    "input_error_cause",
    "outputs_complete",
    "pair_executor",
    "region_mask",
    "resolve_device",
    "switch",
]

"""Calibration: measure a model on the user's images and choose per-block reduce modes and r under a budget."""

from tofu_export.calibration.calibrate import Calibration, calibrate, measure
from tofu_export.calibration.images import CalibrationDataError, load_images
from tofu_export.calibration.plot import plot_policy
from tofu_export.calibration.select import Budget, BudgetError

__all__ = ["Budget", "BudgetError", "Calibration", "CalibrationDataError", "calibrate", "load_images", "measure",
           "plot_policy"]

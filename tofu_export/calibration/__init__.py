"""Calibration: measure a model on the user's images and choose per-block reduce modes and r under a budget.

The names below load on first use, so ``calibration.select`` (the budget) and ``calibration.images`` (the image
count) can check a command's options before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"Calibration": "state", "calibrate": "search", "choose_policy": "search", "measure": "search",
          "CalibrationDataError": "images", "load_images": "images", "plot_policy": "plot",
          "Budget": "select", "BudgetError": "select"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)

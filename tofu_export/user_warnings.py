"""Warnings attributed to the user's code: the line that called into tofu-export, not a line inside it."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` naming the first caller outside this package (what Python 3.12's ``skip_file_prefixes``
    does): ``tofu_export.patch(model, r=40)`` warns at that line of the user's script, however deep the call went."""
    frame, level = sys._getframe(1), 2  # level 2: warn_user's caller
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)

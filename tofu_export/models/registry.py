"""A registry of families, imported when first asked for: ``(module, class)`` pairs -> one instance each."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any


def instantiate(registry: Sequence[tuple[str, str]]) -> list[Any]:
    """One instance of each ``class`` of ``module`` in ``registry``, in order; a pair whose module does not exist is
    left out (an optional library missing *inside* a family module is that module's error to raise)."""
    instances = []
    for module_name, class_name in registry:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        instances.append(getattr(module, class_name)())
    return instances

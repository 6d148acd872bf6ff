"""Exceptions raised by evaluation, one class per kind of user-facing failure."""

from __future__ import annotations


class EvaluationError(ValueError):
    """Unusable evaluation input: a malformed dataset folder, or a model whose outputs do not fit the task."""

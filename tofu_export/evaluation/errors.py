"""Exceptions raised by evaluation, one class per kind of user-facing failure."""

from __future__ import annotations

from tofu_export.errors import UserError


class EvaluationError(UserError, ValueError):
    """Unusable evaluation input: a malformed dataset folder, or a model whose outputs do not fit the task."""

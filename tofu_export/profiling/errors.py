"""The profiler's own error: bad arguments to timing, statistics, the profiler or a report."""

from __future__ import annotations

from tofu_export.errors import UserError


class ProfilerError(UserError, ValueError):
    """Invalid profiler input: bad arguments, too few samples, or a malformed profile."""

"""The profiler's own error: bad arguments to timing, statistics, the profiler or a report."""

from __future__ import annotations


class ProfilerError(ValueError):
    """Invalid profiler input: bad arguments, too few samples, or a malformed profile."""

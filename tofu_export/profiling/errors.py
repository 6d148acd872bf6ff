"""Exceptions raised by the runtime profiler, one class per kind of user-facing failure."""

from __future__ import annotations


class ProfilerError(ValueError):
    """Invalid profiler input: bad arguments, an unusable model, or a malformed profile."""


class BackendUnavailableError(RuntimeError):
    """A requested runtime (execution provider, TensorRT, CUDA) is not installed or not usable here."""


class SweepError(RuntimeError):
    """A sweep point failed, or the sweep state file cannot be used."""

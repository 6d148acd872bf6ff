"""Latency profiling of a runner: timing and statistics, per-op breakdown, memory, Jetson power, the machine, and
the interleaved comparison of several models.

Import the submodules directly (``tofu_export.profiling.profiler``, ``.timing``, ...); this package file stays free
of heavy imports so ``import tofu_export.profiling`` costs nothing.
"""

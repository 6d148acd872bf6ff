"""On-device latency profiler: timing, statistics, per-op breakdown, memory, Jetson power and sweep reports.

Import the submodules directly (``tofu_export.runtime.profiler``, ``.ort_backend``, ...); this package
file stays free of heavy imports so ``import tofu_export.runtime`` costs nothing.
"""

"""Peak memory: the process's resident-set high-water mark and, on CUDA, torch's peak allocated bytes."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any

_MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryReport:
    """Peak memory in MiB; a field is ``None`` when it cannot be measured, with the reason alongside.

    ``peak_rss_mib`` is the whole process's RSS high-water mark since it started (model, runtime, Python and
    everything else loaded), not the inference alone. ``cuda_peak_allocated_mib`` counts torch's caching
    allocator only (TorchRunner / TrtRunner buffers), since the last ``reset_peak_memory``.
    """

    peak_rss_mib: float | None
    rss_reason: str | None
    cuda_peak_allocated_mib: float | None
    cuda_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reset_peak_memory(device: str) -> None:
    """Restart the CUDA peak counter (the process RSS high-water mark cannot be reset)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def measure_memory(device: str) -> MemoryReport:
    """Read the peak RSS of this process and, for ``device == "cuda"``, torch's peak CUDA allocation."""
    rss_mib, rss_reason = _peak_rss_mib()
    cuda_mib, cuda_reason = _cuda_peak_mib(device)
    return MemoryReport(rss_mib, rss_reason, cuda_mib, cuda_reason)


def _peak_rss_mib() -> tuple[float | None, str | None]:
    try:
        import resource
    except ImportError:
        return None, f"the resource module is unavailable on {sys.platform}"
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bytes_per_unit = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return max_rss * bytes_per_unit / _MIB, None


def _cuda_peak_mib(device: str) -> tuple[float | None, str | None]:
    if device != "cuda":
        return None, f"backend runs on {device}, not CUDA"
    import torch

    if not torch.cuda.is_available():
        return None, "torch.cuda.is_available() is False"
    return torch.cuda.max_memory_allocated() / _MIB, None

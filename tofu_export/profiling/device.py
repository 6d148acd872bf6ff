"""A description of the machine a profile was taken on: CPU, core count, GPU, library versions."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# The vector extensions that decide which CPU kernels ONNX Runtime and torch run (and so their speed, and for INT8
# their rounding: ONNX Runtime's fused integer kernels differ by instruction set), x86 then ARM.
SIMD_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
              "asimd", "asimdhp", "asimddp", "i8mm", "sve")


@dataclass(frozen=True)
class DeviceInfo:
    """Hardware and software identifiers; ``None`` where a value cannot be read."""

    cpu_model: str | None
    cpu_cores: int | None
    cpu_features: list[str] | None  # the SIMD_FLAGS this CPU has ([] if none), None where /proc/cpuinfo is unread
    board: str | None  # e.g. "NVIDIA Jetson Orin Nano Developer Kit" from the device tree
    gpu_name: str | None
    platform: str
    python: str
    torch: str | None
    onnxruntime: str | None
    tensorrt: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_device(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> DeviceInfo:
    """Read the CPU model and vector extensions, board name, CUDA GPU name and installed versions."""
    cpuinfo = _read(cpuinfo_path)
    return DeviceInfo(
        cpu_model=cpu_model_from_cpuinfo(cpuinfo) or platform.processor() or None,
        cpu_cores=os.cpu_count(),
        cpu_features=cpu_features_from_cpuinfo(cpuinfo),
        board=(_read(Path("/proc/device-tree/model")) or "").rstrip("\x00\n") or None,
        gpu_name=_cuda_gpu_name(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=_version("torch"),
        onnxruntime=_version("onnxruntime") or _version("onnxruntime-gpu"),
        tensorrt=_version("tensorrt"),
    )


def cpu_model_from_cpuinfo(text: str | None) -> str | None:
    """The first ``model name`` (x86) or ``Model`` / ``Hardware`` (ARM) value in /proc/cpuinfo text."""
    for key in ("model name", "Model", "Hardware"):
        for value in _cpuinfo_values(text, key):
            if value:
                return value
    return None


def cpu_features_from_cpuinfo(text: str | None) -> list[str] | None:
    """The ``SIMD_FLAGS`` named on the first ``flags`` (x86) or ``Features`` (ARM) line of /proc/cpuinfo text, in
    ``SIMD_FLAGS`` order; None when there is no such line."""
    for key in ("flags", "Features"):
        for value in _cpuinfo_values(text, key):
            present = set(value.split())
            return [flag for flag in SIMD_FLAGS if flag in present]
    return None


def _cpuinfo_values(text: str | None, key: str) -> Iterator[str]:
    """The values of every ``key : value`` line of a /proc text (cpuinfo, the NVIDIA driver's information), stripped,
    in order."""
    for line in (text or "").splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            yield value.strip()


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cuda_gpu_name(driver: Path = Path("/proc/driver/nvidia/gpus")) -> str | None:
    """The first CUDA GPU's name: torch's where a runner already loaded torch, else the NVIDIA driver's (a Jetson's
    integrated GPU has no entry there: its board names it), so that timing an ONNX or TensorRT artifact does not
    import torch (2 CPU-s here, more on a Jetson) for one string."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    for information in sorted(driver.glob("*/information")):
        for name in _cpuinfo_values(_read(information), "Model"):
            return name or None
    return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the platform has none): printed beside every time."""
    import os

    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes the kernel says a new allocation can have without swapping (``MemAvailable``); None where unknown."""
    for value in _cpuinfo_values(_read(meminfo), "MemAvailable"):
        try:
            return int(value.split()[0]) * 1024  # "123456 kB"
        except (ValueError, IndexError):
            return None
    return None

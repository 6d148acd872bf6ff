"""The ``tensorrt`` Python package, imported lazily, its errors, and what differs between its releases.

TensorRT 8.x needs the explicit-batch network flag and asks for reduced precision with builder flags; TensorRT 10
makes explicit batch the only mode (the flag is deprecated) and adds strongly typed networks, whose layer precisions
are the ONNX graph's; TensorRT 11 removes the weakly typed precision flags (``BuilderFlag.FP16``/``INT8``) and the
implicit INT8 calibrators. Every version switch of the package lives here.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from tofu_export.engines.base import BackendUnavailableError, RunnerError
from tofu_export.errors import CheckFailed, EngineNotBuilt

LOG_LEVELS = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")
STRONGLY_TYPED_FROM = 10  # first major release with NetworkDefinitionCreationFlag.STRONGLY_TYPED


class TensorRTUnavailable(EngineNotBuilt, BackendUnavailableError):
    """The ``tensorrt`` Python package is not importable here; ``command`` is the trtexec line, if any."""

    def __init__(self, message: str, command: str | None = None) -> None:
        super().__init__(message)
        self.command = command

    @classmethod
    def for_build(cls, onnx_path: str | Path, command: str, reason: str) -> TensorRTUnavailable:
        """The error the engine builder raises: the ONNX file exists; here is how to build on the device."""
        return cls(
            f"TensorRT is not installed here ({reason}), so no engine was built; the ONNX file was still "
            f"written to {onnx_path}. Build the engine on the target device (JetPack ships trtexec in "
            f"/usr/src/tensorrt/bin) with:\n  {command}",
            command,
        )


class EngineBuildError(CheckFailed, RuntimeError):
    """TensorRT rejected the ONNX graph or failed to build, load or run an engine."""


def import_tensorrt(purpose: str) -> ModuleType:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` saying what could not be done without it."""
    try:
        import tensorrt
    except ImportError as error:  # also what `sys.modules["tensorrt"] = None` raises
        raise TensorRTUnavailable(
            f"Cannot {purpose}: the tensorrt Python package is not installed here ({error}). Run this on a CUDA "
            "device that has TensorRT (JetPack, or NVIDIA's tensorrt wheels); otherwise use the ONNX Runtime "
            "runner (OrtRunner)."
        ) from error
    return tensorrt


def severity(trt: ModuleType, log_level: str) -> Any:
    """The ``trt.Logger`` severity named ``log_level`` (one of :data:`LOG_LEVELS`)."""
    level = log_level.upper()
    if level not in LOG_LEVELS:
        raise RunnerError(f"Unknown TensorRT log level '{log_level}'; use one of {', '.join(LOG_LEVELS)}.")
    return getattr(trt.Logger, level)


def trt_major(trt: ModuleType) -> int:
    """``"10.13.0.35"`` -> 10."""
    return int(str(trt.__version__).split(".")[0])


def strongly_typed(trt: ModuleType) -> bool:
    """True where the network takes its precisions from the graph (TensorRT >= 10 has the flag)."""
    return trt_major(trt) >= STRONGLY_TYPED_FROM and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def network_flags(trt: ModuleType) -> int:
    """``create_network`` flags: explicit batch on 8.x (weakly typed); ``STRONGLY_TYPED`` from 10 (explicit batch is
    then the only mode and its flag deprecated)."""
    if strongly_typed(trt):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)

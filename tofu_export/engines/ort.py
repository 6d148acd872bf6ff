"""ONNX Runtime backend: one optimized session over a fixed random input, plus per-node profiling."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from tofu_export.runtime.backend import OpTime
from tofu_export.runtime.errors import BackendUnavailableError, ProfilerError
from tofu_export.runtime.ort_profile import OrtProfile, parse_ort_profile
from tofu_export.runtime.timing import time_callable

Provider = Literal["cpu", "cuda", "tensorrt", "auto"]
_PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def session_options(threads: int | None = None, *, spinning: bool = True) -> ort.SessionOptions:
    """Session options every tofu-export ORT session uses: all graph optimisations, ``threads`` intra-op threads
    (None: ORT's default). ``spinning=False`` stops idle workers from busy-waiting, which timing several sessions
    in turn needs (one session's spinning workers would otherwise steal the cores from the next)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def resolve_providers(provider: Provider, available: Sequence[str]) -> list[str]:
    """ORT execution providers to request, fastest first, always ending with the CPU fallback.

    ``auto`` takes every available one of TensorRT > CUDA > CPU; an explicit choice must be available.
    """
    if provider == "auto":
        return [name for name in _PROVIDER_NAMES.values() if name in available]
    if provider not in _PROVIDER_NAMES:
        choices = ", ".join(_PROVIDER_NAMES)
        raise ProfilerError(f"Unknown provider {provider!r}; choose one of auto, {choices}.")
    wanted = _PROVIDER_NAMES[provider]
    if wanted not in available:
        raise BackendUnavailableError(
            f"ONNX Runtime execution provider {wanted} (provider={provider!r}) is not available in this "
            f"onnxruntime build; available: {', '.join(available)}. Install onnxruntime-gpu (CUDA/TensorRT) "
            "or the Jetson wheel, or pass provider='auto' to use what is installed."
        )
    return [wanted] if wanted == _PROVIDER_NAMES["cpu"] else [wanted, _PROVIDER_NAMES["cpu"]]


class OrtBackend:
    """Runs an ONNX model with ``input`` shaped ``[B, C, H, W]`` (static C, H, W; B static or symbolic)."""

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        threads: int | None = None,
        provider: Provider = "auto",
        seed: int = 0,
        spinning: bool = True,
    ) -> None:
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise ProfilerError(f"ONNX model not found: {self.onnx_path}. Export it first (tofu-export export).")
        self.threads, self.spinning = threads, spinning
        self.providers = resolve_providers(provider, ort.get_available_providers())
        self.session = self._make_session(profile_prefix=None)
        quiet = "" if spinning else ", no spinning"
        self.name = f"onnxruntime[{self.session.get_providers()[0].removesuffix('ExecutionProvider')}{quiet}]"
        self.device = "cpu"  # ORT allocates device memory itself; torch's CUDA counters would not see it
        model_input = self.session.get_inputs()[0]
        self.input_name: str = model_input.name
        self.fixed_batch, self.chw = _static_input_shape(model_input.shape, self.onnx_path)
        if model_input.type not in _NUMPY_DTYPES:
            raise ProfilerError(f"Input {self.input_name!r} has unsupported type {model_input.type}.")
        self._dtype = _NUMPY_DTYPES[model_input.type]
        self._rng = np.random.default_rng(seed)
        self._inputs: dict[int, np.ndarray] = {}

    def _make_session(self, profile_prefix: str | None) -> ort.InferenceSession:
        options = session_options(self.threads, spinning=self.spinning)
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        return ort.InferenceSession(str(self.onnx_path), options, providers=self.providers)

    def _input(self, batch_size: int) -> np.ndarray:
        """Cached random batch ``[B, C, H, W]``."""
        if self.fixed_batch is not None and batch_size != self.fixed_batch:
            raise ProfilerError(
                f"{self.onnx_path.name} has a static batch size of {self.fixed_batch}; cannot run batch "
                f"{batch_size}. Export one model per batch size, or export with a dynamic batch axis."
            )
        if batch_size not in self._inputs:
            shape = (batch_size, *self.chw)
            self._inputs[batch_size] = self._rng.standard_normal(shape, dtype=np.float32).astype(self._dtype)
        return self._inputs[batch_size]

    def run(self, batch_size: int) -> None:
        self.session.run(None, {self.input_name: self._input(batch_size)})

    def sync(self) -> None:
        """No-op: ``InferenceSession.run`` returns host outputs, so the device work is already done."""

    def profile_ops(self, batch_size: int, iters: int) -> list[OpTime]:
        """Per-node mean kernel times from ORT's profiler over ``iters`` runs after one warm-up run."""
        return self.profile(batch_size, iters).ops

    def profile(self, batch_size: int, iters: int) -> OrtProfile:
        """Profile ``iters`` runs (after one warm-up) in a fresh profiling session, also timing each run.

        On CUDA/TensorRT providers ORT reports host-side node times, not GPU kernel times.
        """
        feed = {self.input_name: self._input(batch_size)}
        with tempfile.TemporaryDirectory(prefix="tofu-ort-profile-") as tmp:
            session = self._make_session(profile_prefix=str(Path(tmp) / "ort"))
            wall_s = time_callable(lambda: session.run(None, feed), warmup=1, iters=iters, budget_s=None)
            events = json.loads(Path(session.end_profiling()).read_text())
        parsed = parse_ort_profile(events, skip_runs=1)
        return replace(parsed, wall_ms=[seconds * 1e3 for seconds in wall_s])


def _static_input_shape(shape: Sequence[object], path: Path) -> tuple[int | None, tuple[int, int, int]]:
    """Split an ONNX input shape ``[B, C, H, W]`` into the static batch (or None) and static ``(C, H, W)``."""
    if len(shape) != 4 or not all(isinstance(dim, int) for dim in shape[1:]):
        raise ProfilerError(
            f"{path.name}: expected an image input [B, C, H, W] with static C, H, W, got {list(shape)}. "
            "Re-export with a fixed image size."
        )
    batch = shape[0] if isinstance(shape[0], int) else None
    c, h, w = (int(dim) for dim in shape[1:])  # type: ignore[arg-type]
    return batch, (c, h, w)

"""ONNX Runtime: the one session factory of the package, and the runner over an ``[B, C, H, W]`` image model."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnxruntime as ort

from tofu_export.engines.base import (
    BackendUnavailableError,
    InputSpec,
    OpTime,
    RunnerError,
    check_timed_images,
    fill_batch,
    run_images,
)
from tofu_export.engines.ort_profile import OrtProfile, parse_ort_profile
from tofu_export.onnx_file import check_onnx_file

if TYPE_CHECKING:
    import torch

Provider = Literal["cpu", "cuda", "tensorrt", "auto"]
Optimization = Literal["all", "extended", "basic", "disable"]
_PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_INDEX_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}  # a step's timestep, a class label


def create_session(
    model: str | Path | bytes,
    *,
    threads: int | None = None,
    spinning: bool = True,
    provider: Provider = "cpu",
    optimization: Optimization = "all",
    optimized_model_path: Path | None = None,
    profile_prefix: str | None = None,
    cache_dir: Path | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` over ``model`` (a path or serialized bytes): the only place tofu-export makes one.

    ``threads`` intra-op threads (None: ORT's default). ``spinning=False`` stops idle workers from busy-waiting,
    which timing several sessions in turn needs (one session's spinning workers would otherwise steal the cores
    from the next). ``optimization`` is the graph optimisation level; ``optimized_model_path`` saves the
    optimised graph there; ``profile_prefix`` turns on ORT's profiler (``session.end_profiling()`` writes it).
    ``cache_dir``: where the TensorRT provider keeps its engine and timing caches (see :func:`provider_options`).
    """
    if optimization not in _LEVELS:
        raise RunnerError(f"Unknown ONNX Runtime optimization level {optimization!r}; choose one of {list(_LEVELS)}.")
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if not isinstance(model, bytes):
        check_onnx_file(model)  # a missing, truncated or non-ONNX file is named before ONNX Runtime parses it
    source = model if isinstance(model, bytes) else str(model)
    names = resolve_providers(provider, ort.get_available_providers())
    providers = [(name, provider_options(name, cache_dir)) for name in names]
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as error:  # onnxruntime's pybind errors (Fail, InvalidGraph, ...) derive from Exception only
        what = "the serialized model" if isinstance(model, bytes) else str(model)
        raise RunnerError(f"ONNX Runtime cannot load {what}: {str(error).splitlines()[0][:300]}") from error


def resolve_providers(provider: Provider, available: Sequence[str]) -> list[str]:
    """ORT execution providers to request, fastest first, always ending with the CPU fallback.

    ``auto`` takes every available one of TensorRT > CUDA > CPU; an explicit choice must be available.
    """
    if provider == "auto":
        return [name for name in _PROVIDER_NAMES.values() if name in available]
    if provider not in _PROVIDER_NAMES:
        choices = ", ".join(_PROVIDER_NAMES)
        raise RunnerError(f"Unknown provider {provider!r}; choose one of auto, {choices}.")
    wanted = _PROVIDER_NAMES[provider]
    if wanted not in available:
        raise BackendUnavailableError(
            f"ONNX Runtime execution provider {wanted} (provider={provider!r}) is not available in this "
            f"onnxruntime build; available: {', '.join(available)}. Install onnxruntime-gpu (CUDA/TensorRT) "
            "or the Jetson wheel, or pass provider='auto' to use what is installed."
        )
    return [wanted] if wanted == _PROVIDER_NAMES["cpu"] else [wanted, _PROVIDER_NAMES["cpu"]]


def provider_options(name: str, cache_dir: Path | None) -> dict[str, str]:
    """Options of execution provider ``name``: for TensorRT, engine and timing caches in ``cache_dir`` (the artifact
    folder), so a second session loads the engine instead of rebuilding it (minutes on a Jetson Orin)."""
    if name != _PROVIDER_NAMES["tensorrt"] or cache_dir is None:
        return {}
    folder = str(cache_dir)
    return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": folder,
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": folder}  # fmt: skip


class OrtRunner:
    """An ONNX model whose one input is ``[B, C, H, W]`` (static C, H, W; B static or symbolic); on the TensorRT
    provider its engine and timing caches are kept in the model's folder."""

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        threads: int | None = None,
        provider: Provider = "cpu",
        spinning: bool = True,
        seed: int = 0,
    ) -> None:
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise RunnerError(f"ONNX model not found: {self.onnx_path}. Export it first (tofu-export export).")
        self._settings = {"threads": threads, "spinning": spinning, "provider": provider,
                          "cache_dir": self.onnx_path.parent}  # the TensorRT provider's caches live beside the model
        self.session = create_session(self.onnx_path, **self._settings)  # type: ignore[arg-type]
        quiet = "" if spinning else ", no spinning"
        self.name = f"onnxruntime[{self.session.get_providers()[0].removesuffix('ExecutionProvider')}{quiet}]"
        self.device = "cpu"  # ORT allocates device memory itself; torch's CUDA counters would not see it
        model_input = self.session.get_inputs()[0]
        batch, chw = _static_input_shape(model_input.shape, self.onnx_path)
        self.input = InputSpec(model_input.name, batch, chw)
        if model_input.type not in _NUMPY_DTYPES:
            raise RunnerError(f"Input {model_input.name!r} has unsupported type {model_input.type}.")
        self._dtype = _NUMPY_DTYPES[model_input.type]
        self._extra = [_extra_input(spec, self.onnx_path) for spec in self.session.get_inputs()[1:]]
        self._random = np.random.default_rng(seed)  # numpy's: opening and timing a graph needs no torch
        self._images: np.ndarray | None = None  # feed_images's, else seeded noise
        self._feeds: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """First output ``[B, K]`` of ``images`` ``[B, C, H, W]``, run in chunks of the static batch if any."""
        return run_images(self._first_output, images, self.input, self.onnx_path.name)

    def _first_output(self, images: torch.Tensor) -> torch.Tensor:
        import torch  # the runners' common currency; not needed to open or time a graph

        (output, *_) = self.session.run(None, {self.input.name: images.numpy().astype(self._dtype, copy=False)})
        return torch.from_numpy(output)

    def _feed(self, batch_size: int) -> dict[str, np.ndarray]:
        """The batch ``[B, C, H, W]`` ``run`` times, as a feed, made once per batch size outside any timing: seeded
        normal noise, or the images given to ``feed_images`` (``engines.base.TimedBatches`` says why)."""
        if self.input.batch is not None and batch_size != self.input.batch:
            raise RunnerError(
                f"{self.onnx_path.name} has a static batch size of {self.input.batch}; cannot run batch "
                f"{batch_size}. Export one model per batch size, or export with a dynamic batch axis."
            )
        if batch_size not in self._feeds:
            images = (self._random.standard_normal((batch_size, *self.input.chw), dtype=np.float32)
                      if self._images is None else fill_batch(self._images, batch_size))
            self._feeds[batch_size] = {self.input.name: images.astype(self._dtype, copy=False),
                                       **{name: self._filled(batch_size, shape, dtype)
                                          for name, shape, dtype in self._extra}}
        return self._feeds[batch_size]

    def _filled(self, batch_size: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        """A graph's further input (a denoiser step's timestep, class label or conditioning) for timing: seeded noise
        for floats, zeros (the first class, step 0) for integers."""
        if np.issubdtype(dtype, np.integer):
            return np.zeros((batch_size, *shape), dtype=dtype)
        return self._random.standard_normal((batch_size, *shape), dtype=np.float32).astype(dtype, copy=False)

    def feed_images(self, images: Any) -> None:
        """Run (and profile) batch B on the first B of ``images`` ``[N, C, H, W]`` (a tensor or an array; repeated
        when B > N) from now on, not on the seeded noise: a graph's time can depend on its input's values."""
        array = np.asarray(images, dtype=self._dtype)
        check_timed_images(array.shape, self.input.chw, self.onnx_path.name)
        self._images = array
        self._feeds.clear()

    def run(self, batch_size: int) -> None:
        self.session.run(None, self._feed(batch_size))

    def sync(self) -> None:
        """No-op: ``InferenceSession.run`` returns host outputs, so the device work is already done."""

    def profile_ops(self, batch_size: int, iters: int) -> list[OpTime]:
        """Per-node mean kernel times from ORT's profiler over ``iters`` runs after one warm-up run."""
        return self.profile(batch_size, iters).ops

    def profile(self, batch_size: int, iters: int) -> OrtProfile:
        """Profile ``iters`` runs (after one warm-up) in a fresh profiling session, also timing each run.

        On CUDA/TensorRT providers ORT reports host-side node times, not GPU kernel times.
        """
        feed = self._feed(batch_size)
        with tempfile.TemporaryDirectory(prefix="tofu-ort-profile-") as tmp:
            session = create_session(self.onnx_path, profile_prefix=str(Path(tmp) / "ort"), **self._settings)  # type: ignore[arg-type]
            wall_s = _timed_runs(lambda: session.run(None, feed), warmup=1, iters=iters)
            events = json.loads(Path(session.end_profiling()).read_text())
        parsed = parse_ort_profile(events, skip_runs=1)
        return replace(parsed, wall_ms=[seconds * 1e3 for seconds in wall_s])


def _timed_runs(run: Callable[[], object], *, warmup: int, iters: int) -> list[float]:
    """Wall seconds of each of ``iters`` calls of ``run`` after ``warmup`` untimed ones (the profiler's own runs;
    latency measurements go through ``profiling.timing``, which builds on the runners, not the other way round)."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return samples


def _extra_input(spec: Any, path: Path) -> tuple[str, tuple[int, ...], type]:
    """``(name, shape without the batch axis, numpy dtype)`` of a graph input after the image (a denoiser step's
    timestep, label, conditioning), which ``run`` and ``profile`` fill: every axis but the batch must be static."""
    dtype = _NUMPY_DTYPES.get(spec.type) or _INDEX_DTYPES.get(spec.type)
    if dtype is None or not all(isinstance(dim, int) for dim in spec.shape[1:]):
        raise RunnerError(f"{path.name}: its input {spec.name!r} ({spec.type}, {list(spec.shape)}) cannot be filled "
                          "for timing: inputs after the image need a float or integer type and static axes after "
                          "the batch")
    return spec.name, tuple(int(dim) for dim in spec.shape[1:]), dtype


def _static_input_shape(shape: Sequence[object], path: Path) -> tuple[int | None, tuple[int, int, int]]:
    """Split an ONNX input shape ``[B, C, H, W]`` into the static batch (or None) and static ``(C, H, W)``."""
    if len(shape) != 4 or not all(isinstance(dim, int) for dim in shape[1:]):
        raise RunnerError(
            f"{path.name}: expected an image input [B, C, H, W] with static C, H, W, got {list(shape)}. "
            "Re-export with a fixed image size."
        )
    batch = shape[0] if isinstance(shape[0], int) else None
    c, h, w = (int(dim) for dim in shape[1:])  # type: ignore[arg-type]
    return batch, (c, h, w)

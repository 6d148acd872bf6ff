"""TensorRT engine backend (TensorRT >= 8.5 tensor API), with per-layer times from an ``IProfiler``.

``tensorrt`` and CUDA are imported lazily; device buffers are torch CUDA tensors, so no pycuda is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tofu_export.runtime.backend import OpTime
from tofu_export.runtime.errors import BackendUnavailableError, ProfilerError


def _import_tensorrt() -> Any:
    try:
        import tensorrt
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(
            f"The TensorRT backend needs the tensorrt Python package and torch ({exc}). On a Jetson it ships "
            "with JetPack; elsewhere `pip install tofu-export[trt]`. Use the ONNX Runtime backend otherwise."
        ) from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError("The TensorRT backend needs a CUDA GPU; torch.cuda.is_available() is False here.")
    return tensorrt


def _layer_profiler(trt: Any) -> Any:
    """An ``IProfiler`` that accumulates ``report_layer_time`` calls (ms per layer, per execution)."""

    class LayerProfiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.totals_ms: dict[str, float] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.totals_ms[layer_name] = self.totals_ms.get(layer_name, 0.0) + ms

    return LayerProfiler()


class TrtBackend:
    """Runs a serialized engine whose single input is ``[B, C, H, W]`` with a static batch ``B``."""

    def __init__(self, engine_path: str | Path, *, seed: int = 0) -> None:
        import torch

        trt = _import_tensorrt()
        self._trt = trt
        path = Path(engine_path)
        if not path.is_file():
            raise ProfilerError(f"TensorRT engine not found: {path}. Build it on this device first.")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ProfilerError(
                f"TensorRT could not deserialize {path}; engines only load with the TensorRT version and GPU "
                "they were built with. Rebuild the engine on this device."
            )
        self.context = self.engine.create_execution_context()
        self.name = f"tensorrt[{trt.__version__}]"
        self.device = "cuda"
        self._stream = torch.cuda.Stream()
        self._buffers: dict[str, torch.Tensor] = {}
        self.input_name = ""
        self._bind_buffers(torch.Generator().manual_seed(seed))
        self.batch_size = int(self._buffers[self.input_name].shape[0])

    def _bind_buffers(self, generator: Any) -> None:
        """Allocate one CUDA tensor per I/O tensor (random input, empty outputs) and bind its address."""
        import torch

        trt = self._trt
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(dim < 0 for dim in shape):
                raise ProfilerError(f"Engine tensor {name!r} has a dynamic shape {shape}; build a static-shape engine.")
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_name = name
                tensor = torch.randn(shape, generator=generator).to(dtype=dtype, device="cuda")
            else:
                tensor = torch.empty(shape, dtype=dtype, device="cuda")
            self._buffers[name] = tensor
            self.context.set_tensor_address(name, tensor.data_ptr())

    def run(self, batch_size: int) -> None:
        if batch_size != self.batch_size:
            raise ProfilerError(
                f"This engine has a static batch size of {self.batch_size}; cannot run batch {batch_size}. "
                "Build one engine per batch size."
            )
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise ProfilerError("TensorRT execute_async_v3 failed; see the TensorRT log above.")

    def sync(self) -> None:
        self._stream.synchronize()

    def profile_ops(self, batch_size: int, iters: int) -> list[OpTime]:
        """Mean per-layer GPU time over ``iters`` runs after one warm-up, from TensorRT's ``IProfiler``."""
        self.run(batch_size)
        self.sync()
        profiler = _layer_profiler(self._trt)
        self.context.profiler = profiler
        try:
            for _ in range(iters):
                self.run(batch_size)
                self.sync()  # the profiler reports layer times once the enqueued work completes
        finally:
            self.context.profiler = None
        return [OpTime(name=name, op_type="", ms=ms / iters) for name, ms in profiler.totals_ms.items()]

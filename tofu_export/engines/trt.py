"""TensorRT engine backend for the profiler, with per-layer times from an ``IProfiler``.

Runs engines through ``tofu_export.exporters.tensorrt.TrtRunner`` (TensorRT 8.5 / 10 tensor API, torch CUDA
buffers, dynamic batch within the engine's optimisation profile). ``tensorrt`` is imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tofu_export.runtime.backend import OpTime
from tofu_export.runtime.errors import BackendUnavailableError, ProfilerError


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
    """Runs a serialized engine whose single input is ``[B, C, H, W]`` on random inputs, one per batch size."""

    def __init__(self, engine_path: str | Path, *, seed: int = 0) -> None:
        from tofu_export.exporters.tensorrt import TensorRTUnavailable, TrtRunner, load_engine

        path = Path(engine_path)
        try:
            import tensorrt
            import torch
        except ImportError as exc:
            raise BackendUnavailableError(
                f"The TensorRT backend needs the tensorrt Python package ({exc}). On a Jetson it ships with "
                "JetPack; elsewhere `pip install tofu-export[trt]`. Use the ONNX Runtime backend otherwise."
            ) from exc
        if not torch.cuda.is_available():
            raise BackendUnavailableError("The TensorRT backend needs a CUDA GPU; torch.cuda.is_available() is False.")
        if not path.is_file():
            raise ProfilerError(f"TensorRT engine not found: {path}. Build it on this device first.")
        try:
            self.runner = TrtRunner(load_engine(path))
        except TensorRTUnavailable as exc:
            raise BackendUnavailableError(str(exc)) from exc
        if len(self.runner.input_names) != 1:
            raise ProfilerError(f"{path} has inputs {self.runner.input_names}; the profiler feeds one image input.")
        self._trt, self._torch = tensorrt, torch
        self.name = f"tensorrt[{tensorrt.__version__}]"
        self.device = "cuda"
        self.input_name = self.runner.input_names[0]
        self.chw = tuple(int(d) for d in self.runner.engine.get_tensor_shape(self.input_name)[1:])
        self._generator = torch.Generator().manual_seed(seed)
        self._inputs: dict[int, Any] = {}

    def _input(self, batch_size: int) -> Any:
        if batch_size not in self._inputs:
            images = self._torch.randn((batch_size, *self.chw), generator=self._generator)
            self._inputs[batch_size] = images.to("cuda")
        return self._inputs[batch_size]

    def run(self, batch_size: int) -> None:
        self.runner.run({self.input_name: self._input(batch_size)})

    def sync(self) -> None:
        self._torch.cuda.synchronize()

    def profile_ops(self, batch_size: int, iters: int) -> list[OpTime]:
        """Mean per-layer GPU time over ``iters`` runs after one warm-up, from TensorRT's ``IProfiler``."""
        self.run(batch_size)
        self.sync()
        profiler = _layer_profiler(self._trt)
        self.runner.context.profiler = profiler
        try:
            for _ in range(iters):
                self.run(batch_size)
                self.sync()  # the profiler reports layer times once the enqueued work completes
        finally:
            self.runner.context.profiler = None
        return [OpTime(name=name, op_type="", ms=ms / iters) for name, ms in profiler.totals_ms.items()]

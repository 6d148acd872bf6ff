"""TensorRT (>= 8.5): load a serialized engine and run it on torch CUDA tensors; per-layer times via ``IProfiler``.

``tensorrt`` is imported lazily: without it every entry point raises ``api.TensorRTUnavailable``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tofu_export.engines.base import (
    BackendUnavailableError,
    InputSpec,
    OpTime,
    RunnerError,
    TimedBatches,
    run_images,
)
from tofu_export.tensorrt.api import EngineBuildError, import_tensorrt, severity
from tofu_export.tensorrt.inspect import AttentionFusion, attention_fusion, engine_information


def load_engine(engine_path: str | Path, log_level: str = "WARNING") -> Any:
    """Deserialize ``engine_path`` into a ``tensorrt.ICudaEngine`` (needs the TensorRT that built it)."""
    path = Path(engine_path)
    trt = import_tensorrt(f"load the engine {path}")
    if not path.is_file():
        raise RunnerError(f"TensorRT engine not found: {path}. Build it on this device first.")
    runtime = trt.Runtime(trt.Logger(severity(trt, log_level)))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} could not load {path}: engines only load on the TensorRT version "
            "and GPU they were built with. Rebuild it on this device."
        )
    return engine


def layer_profiler(trt: Any) -> Any:
    """An ``IProfiler`` whose ``totals_ms`` sums the ``report_layer_time`` calls per layer name, over executions."""

    class LayerProfiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.totals_ms: dict[str, float] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.totals_ms[layer_name] = self.totals_ms.get(layer_name, 0.0) + ms

    return LayerProfiler()


class TrtRunner:
    """A TensorRT engine (a path, or a deserialized ``ICudaEngine``) run with the name-based I/O API
    (``set_input_shape`` + ``execute_async_v3``) on torch CUDA buffers; batch dynamic within its profile."""

    def __init__(self, engine: str | Path | Any, *, seed: int = 0) -> None:
        trt = import_tensorrt("run a TensorRT engine")
        if not torch.cuda.is_available():
            raise BackendUnavailableError("The TensorRT runner needs a CUDA GPU; torch.cuda.is_available() is False.")
        self.source = str(engine) if isinstance(engine, str | Path) else "engine"
        self.engine = load_engine(engine) if isinstance(engine, str | Path) else engine
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineBuildError("TensorRT could not create an execution context (out of GPU memory?).")
        self._trt = trt
        names = [self.engine.get_tensor_name(index) for index in range(self.engine.num_io_tensors)]
        is_input = {name: self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in names}
        self.input_names = [name for name in names if is_input[name]]
        self.output_names = [name for name in names if not is_input[name]]
        self.name = f"tensorrt[{trt.__version__}]"
        self.device = "cuda"
        self.input: InputSpec | None = None  # set for single-image-input engines, which __call__ and run() need
        if len(self.input_names) == 1:
            batch, *chw = (int(d) for d in self.engine.get_tensor_shape(self.input_names[0]))
            self.input = InputSpec(self.input_names[0], batch if batch > 0 else None, (chw[0], chw[1], chw[2]))
            self._batches = TimedBatches(self.input.chw, seed, "cuda")

    def _image_input(self) -> InputSpec:
        if self.input is None:
            raise RunnerError(f"Engine has inputs {self.input_names}; call infer() with a name -> tensor map.")
        return self.input

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """First output (float32, CPU) of ``images [B, C, H, W]``, run in chunks of the static batch if any."""
        spec, first = self._image_input(), self.output_names[0]
        return run_images(lambda batch: self.infer({spec.name: batch})[first].float().cpu(), images, spec,
                          Path(self.source).name)  # fmt: skip

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Run once on ``inputs`` (name -> tensor, any device/dtype); returns name -> CUDA tensor outputs."""
        missing = sorted(set(self.input_names) - set(inputs))
        if missing:
            raise RunnerError(f"Missing engine inputs {missing}; the engine expects {self.input_names}.")
        context = self.context
        staged = {name: inputs[name].to("cuda", self._dtype(name)).contiguous() for name in self.input_names}
        for name, tensor in staged.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError("TensorRT execute_async_v3 failed; see the TensorRT log above.")
        stream.synchronize()  # also keeps `staged` alive until the engine has read it
        return outputs

    def _dtype(self, name: str) -> torch.dtype:
        import numpy as np

        return torch.from_numpy(np.empty(0, dtype=self._trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def run(self, batch_size: int) -> None:
        spec = self._image_input()
        self.infer({spec.name: self._batches(batch_size)})

    def feed_images(self, images: Any) -> None:
        """Time on ``images`` ``[N, C, H, W]`` from now on (batch B: the first B, repeated when B > N), not on
        seeded noise."""
        self._image_input()
        self._batches.use(images, Path(self.source).name)

    def sync(self) -> None:
        torch.cuda.synchronize()

    def attention_fusion(self) -> list[AttentionFusion]:
        """Per block, whether TensorRT fused its attention into an MHA kernel (the engine inspector's layers)."""
        return attention_fusion(engine_information(self.engine, self._trt))

    def profile_ops(self, batch_size: int, iters: int) -> list[OpTime]:
        """Mean per-layer GPU time over ``iters`` runs after one warm-up, from TensorRT's ``IProfiler``."""
        self.run(batch_size)
        self.sync()
        profiler = layer_profiler(self._trt)
        self.context.profiler = profiler
        try:
            for _ in range(iters):
                self.run(batch_size)
                self.sync()  # the profiler reports layer times once the enqueued work completes
        finally:
            self.context.profiler = None
        return [OpTime(name=name, op_type="", ms=ms / iters) for name, ms in profiler.totals_ms.items()]

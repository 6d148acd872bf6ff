"""Predictors: anything that maps a batch of images ``[B, 3, H, W]`` to outputs ``[B, K]``.

``K`` is the number of classes for a classifier, or the feature width for a headless backbone.
PyTorch modules, ONNX Runtime sessions (CPU) and TensorRT engines (lazy import) share this interface,
so every metric in :mod:`tofu_export.evaluation.metrics` runs on any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort
import torch

from tofu_export.evaluation.errors import EvaluationError
from tofu_export.runtime.errors import BackendUnavailableError
from tofu_export.runtime.ort_backend import session_options


@runtime_checkable
class Predictor(Protocol):
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` float32 on CPU -> ``[B, K]`` float32 on CPU."""
        ...


def run_in_fixed_batches(
    run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, fixed_batch: int | None
) -> torch.Tensor:
    """``run`` over ``images`` ``[B, ...]`` in chunks of exactly ``fixed_batch`` (zero-padding the last one).

    Static-shape artifacts accept one batch size only; the padded rows are dropped from the result.
    With ``fixed_batch=None`` the batch is run as is.
    """
    if fixed_batch is None or images.shape[0] == fixed_batch:
        return run(images)
    outputs = []
    for start in range(0, images.shape[0], fixed_batch):
        chunk = images[start : start + fixed_batch]
        missing = fixed_batch - chunk.shape[0]
        if missing:
            chunk = torch.cat([chunk, chunk.new_zeros((missing, *chunk.shape[1:]))])
        outputs.append(run(chunk)[: fixed_batch - missing])
    return torch.cat(outputs)


def _check_image_shape(images: torch.Tensor, expected: Sequence[Any], source: str) -> None:
    """Raise if ``images`` ``[B, C, H, W]`` does not fit the static ``(C, H, W)`` of an artifact."""
    static = [dim if isinstance(dim, int) and dim > 0 else None for dim in expected]
    actual = list(images.shape[1:])
    mismatch = any(s is not None and s != a for s, a in zip(static, actual, strict=False))
    if len(static) != len(actual) or mismatch:
        raise EvaluationError(
            f"{source} expects images shaped {list(expected)} per sample but got {actual}. Build the loader "
            "with artifact_transform(img_size=...) matching the size the artifact was exported at."
        )


class TorchPredictor:
    """A PyTorch module in eval mode; ``features=True`` returns pre-logits pooled features, not logits."""

    def __init__(self, model: torch.nn.Module, *, features: bool = False) -> None:
        self.model = model.eval()
        self.features = features

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if not self.features:
                return self.model(images)
            return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


class OrtPredictor:
    """An ONNX model on ONNX Runtime's CPU provider, ``threads`` intra-op threads (None: ORT's default)."""

    def __init__(self, onnx_path: str | Path, threads: int | None = None) -> None:
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise EvaluationError(f"ONNX model not found: {self.onnx_path}. Export it (tofu-export export).")
        options = session_options(threads)
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        model_input = self.session.get_inputs()[0]
        self.input_name: str = model_input.name
        self.input_shape: list[Any] = list(model_input.shape)
        self.fixed_batch = self.input_shape[0] if isinstance(self.input_shape[0], int) else None

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: images.numpy().astype(np.float32, copy=False)}
        (output, *_) = self.session.run(None, feed)
        return torch.from_numpy(output)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_image_shape(images, self.input_shape[1:], self.onnx_path.name)
        return run_in_fixed_batches(self._run, images.detach().cpu().contiguous(), self.fixed_batch)


class TrtPredictor:
    """A serialized TensorRT engine (one image input, first output returned), run on the CUDA GPU through
    ``tofu_export.exporters.tensorrt.TrtRunner``."""

    def __init__(self, engine_path: str | Path) -> None:
        from tofu_export.exporters.tensorrt import TensorRTUnavailable, TrtRunner, load_engine

        if not torch.cuda.is_available():
            raise BackendUnavailableError("TrtPredictor needs a CUDA GPU, and torch sees none on this machine.")
        self.engine_path = Path(engine_path)
        try:
            if not self.engine_path.is_file():
                raise EvaluationError(f"TensorRT engine not found: {self.engine_path}. Build it first.")
            self.runner = TrtRunner(load_engine(self.engine_path))
        except TensorRTUnavailable as error:
            raise BackendUnavailableError(
                f"{error} To score the ONNX artifact on the CPU instead, use OrtPredictor."
            ) from error
        engine = self.runner.engine
        self.input_shape = list(engine.get_tensor_shape(self.runner.input_names[0]))
        self.fixed_batch = self.input_shape[0] if self.input_shape[0] > 0 else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_image_shape(images, self.input_shape[1:], self.engine_path.name)
        return run_in_fixed_batches(lambda batch: self.runner(batch).float().cpu(), images, self.fixed_batch)

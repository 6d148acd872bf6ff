"""Profile an artifact or a checkpoint: pick the runner its file type (or the caller) names, then time it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tofu_export.config import ToFuConfig
from tofu_export.errors import Hint, UserError
from tofu_export.models.family import family_of
from tofu_export.models.loading import load_model

BACKENDS = ("ort", "trt", "torch")
_BY_SUFFIX = {".onnx": "ort", ".engine": "trt", ".plan": "trt"}


def backend_for(path: str | Path, backend: str | None) -> str:
    """The backend asked for, or the one the file type implies (a checkpoint or timm name runs in PyTorch)."""
    kind = backend or _BY_SUFFIX.get(Path(path).suffix, "torch")
    if kind not in BACKENDS:
        raise UserError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}", hint=Hint("backend", "ort"))
    return kind


def open_runner(
    source: str | Path,
    *,
    backend: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    spinning: bool = True,
    tofu: ToFuConfig | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
) -> Any:
    """The runner for ``source``: ORT for ``.onnx``, TensorRT for ``.engine``, else the checkpoint (or timm name)
    patched with ``tofu`` (static, at its own input size) in PyTorch."""
    kind = backend_for(source, backend)
    if kind == "ort":
        from tofu_export.engines.ort import OrtRunner

        provider = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "tensorrt"}.get(device, "auto")
        return OrtRunner(source, threads=threads, provider=provider, spinning=spinning)
    if kind == "trt":
        from tofu_export.engines.trt import TrtRunner

        return TrtRunner(source)
    from tofu_export.engines.torch import TorchRunner

    model = load_model(source, arch=arch, img_size=None if tofu is None else tofu.img_size,
                       trust_pickle=trust_pickle).model
    if tofu is not None:
        tofu.patch(model)
    return TorchRunner(model, device=device, img_size=family_of(model).img_size(model), threads=threads)


def profile_source(
    source: str | Path,
    *,
    batch_sizes: Sequence[int],
    warmup: int = 10,
    iters: int | None = 50,
    budget_s: float | None = None,
    breakdown: bool = True,
    **runner_options: Any,
) -> Any:
    """Open the runner for ``source`` and profile it (``ProfileResult``)."""
    from tofu_export.profiling.profiler import profile

    if any(b < 1 for b in batch_sizes):
        raise UserError(f"batch sizes must be at least 1, got {list(batch_sizes)}", hint=Hint("batch", "1"))
    if warmup < 0 or (iters is not None and iters < 1):
        raise UserError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}", hint=Hint("iters"))
    runner = open_runner(source, **runner_options)
    return profile(runner, batch_sizes=batch_sizes, warmup=warmup, iters=iters, budget_s=budget_s,
                   breakdown=breakdown)

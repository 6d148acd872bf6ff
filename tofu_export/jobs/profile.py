"""Profile an artifact or a checkpoint: pick the runner its file type (or the caller) names, then time it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tofu_export.config import ToFuConfig
from tofu_export.errors import Hint, UserError

BACKENDS = ("ort", "ort-cuda", "ort-trt", "trt", "torch")  # what `profile` and `sweep` time, by one name each
_BY_SUFFIX = {".onnx": "ort", ".engine": "trt", ".plan": "trt"}
_ORT_PROVIDER = {"ort": "cpu", "ort-cuda": "cuda", "ort-trt": "tensorrt"}


@dataclass(frozen=True)
class Backend:
    """Where a graph is timed: ``name`` one of ``BACKENDS``; ``device`` the PyTorch device (``torch`` only);
    ``cuda_graphs`` times PyTorch on CUDA as replayed CUDA graphs rather than eagerly."""

    name: str
    device: str = "cpu"
    cuda_graphs: bool = False

    @property
    def runtime(self) -> str:
        """``ort``, ``trt`` or ``torch``: the runner family."""
        return "ort" if self.name in _ORT_PROVIDER else self.name

    @property
    def on_cpu(self) -> bool:
        return self.name == "ort" or (self.name == "torch" and self.device == "cpu")

    @property
    def label(self) -> str:
        """For tables: ``ONNX Runtime CPU``, ``TensorRT engine``, ``PyTorch cuda``..."""
        return {"ort": "ONNX Runtime CPU", "ort-cuda": "ONNX Runtime CUDA", "ort-trt": "ONNX Runtime TensorRT EP",
                "trt": "TensorRT engine"}.get(
            self.name, f"PyTorch {self.device}" + (", CUDA graphs" if self.cuda_graphs else ""))


def parse_backend(
    name: str | None, device: str = "cpu", path: str | Path | None = None, cuda_graphs: bool = False
) -> Backend:
    """The backend asked for (``None``: the one ``path``'s file type implies); ``device`` is PyTorch's device. An
    ORT provider picked with the device (the old ``--device cuda``) fails naming the ``--backend`` that replaced it;
    ``cuda_graphs`` needs PyTorch on CUDA."""
    kind = name or (_BY_SUFFIX.get(Path(path).suffix, "torch") if path is not None else "ort")
    if kind not in BACKENDS:
        raise UserError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}", hint=Hint("backend", "ort"))
    if device not in ("cpu", "cuda", "tensorrt"):
        raise UserError(f"unknown device {device!r}: cpu or cuda (PyTorch's device)", hint=Hint("device", "cpu"))
    if kind.startswith("ort") and device != "cpu":
        replacement = {"cuda": "ort-cuda", "tensorrt": "ort-trt"}[device]
        raise UserError(f"ONNX Runtime's provider is chosen by the backend now, not the device: use backend "
                        f"{replacement} instead of device {device}", hint=Hint("backend", replacement))
    if (kind != "torch" and device != "cpu") or device == "tensorrt":
        raise UserError(f"the device applies to the torch backend only, not {kind!r}", hint=Hint("device", "cpu"))
    if cuda_graphs and (kind != "torch" or device != "cuda"):
        where, fix = (f"backend {kind!r}", Hint("backend", "torch")) if kind != "torch" else \
            (f"device {device!r}", Hint("device", "cuda"))
        raise UserError(f"CUDA graphs time PyTorch on a GPU: they need the torch backend on device cuda, not {where}",
                        hint=fix)
    return Backend(kind, device, cuda_graphs)


def backend_for(path: str | Path, backend: str | None) -> str:
    """The runtime (``ort``, ``trt``, ``torch``) asked for, or the one the file type implies (a checkpoint or timm
    name runs in PyTorch)."""
    return parse_backend(backend, path=path).runtime


def open_runner(
    source: str | Path,
    *,
    backend: str | Backend | None = None,
    device: str = "cpu",
    threads: int | None = None,
    spinning: bool = True,
    tofu: ToFuConfig | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    num_heads: int | None = None,
) -> Any:
    """The runner for ``source``: ORT (its CPU, CUDA or TensorRT provider) for ``.onnx``, TensorRT for ``.engine``,
    else the checkpoint (or timm name) patched with ``tofu`` (static, at its own input size) in PyTorch."""
    chosen = backend if isinstance(backend, Backend) else parse_backend(backend, device, source)
    if chosen.runtime != "torch":
        return graph_runner(source, chosen, threads=threads, spinning=spinning)
    from tofu_export.models.loading import load_model  # torch: only where a checkpoint is profiled

    model = load_model(source, arch=arch, img_size=None if tofu is None else tofu.img_size,
                       trust_pickle=trust_pickle, num_heads=num_heads).model
    if tofu is not None:
        tofu.patch(model)
    return model_runner(model, chosen, threads=threads)


def graph_runner(path: str | Path, backend: Backend, *, threads: int | None = None, spinning: bool = True) -> Any:
    """The runner of an exported graph: ``.onnx`` on ORT with the backend's provider, an engine on TensorRT."""
    if backend.runtime == "ort":
        from tofu_export.engines.ort import OrtRunner

        return OrtRunner(path, threads=threads, provider=_ORT_PROVIDER[backend.name], spinning=spinning)
    from tofu_export.tensorrt.runner import TrtRunner

    return TrtRunner(path)


def model_runner(model: Any, backend: Backend, *, threads: int | None = None) -> Any:
    """A (patched) PyTorch model on the backend's device."""
    from tofu_export.engines.torch import TorchRunner
    from tofu_export.models.family import family_of

    return TorchRunner(model, device=backend.device, img_size=family_of(model).img_size(model), threads=threads,
                       cuda_graphs=backend.cuda_graphs)


def profile_source(
    source: str | Path,
    *,
    batch_sizes: Sequence[int],
    warmup: int = 10,
    iters: int | None = 50,
    budget_s: float | None = None,
    breakdown: bool = True,
    images: str | Path | None = None,
    backend: str | Backend | None = None,
    device: str = "cpu",
    **runner_options: Any,
) -> Any:
    """Open the runner for ``source`` on ``backend`` (``open_runner``) and profile it (``ProfileResult``), on up to
    ``max(batch_sizes)`` of the images at ``images`` (a file or a folder) where given, else on seeded noise."""
    from tofu_export.profiling.profiler import profile

    if any(b < 1 for b in batch_sizes):
        raise UserError(f"batch sizes must be at least 1, got {list(batch_sizes)}", hint=Hint("batch", "1"))
    if warmup < 0 or (iters is not None and iters < 1):
        raise UserError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}", hint=Hint("iters"))
    chosen = backend if isinstance(backend, Backend) else parse_backend(backend, device, source)
    runner = open_runner(source, backend=chosen, **runner_options)
    spec = getattr(runner, "input", None)
    if spec is not None:  # the batch must fit in memory before any input is allocated
        from tofu_export.onnx_file import check_batch_fits

        for batch in batch_sizes:
            check_batch_fits([batch, *spec.chw], batch, Path(str(source)))
    timing = None if images is None else _timing_images(runner, chosen, source, images, max(batch_sizes))
    return profile(runner, batch_sizes=batch_sizes, warmup=warmup, iters=iters, budget_s=budget_s,
                   breakdown=breakdown, images=timing)


def _timing_images(runner: Any, backend: Backend, source: str | Path, path: str | Path, count: int) -> Any:
    """The images to time ``runner`` (opened on ``backend``) on: a graph's in its manifest's preprocessing, a
    PyTorch model's in its own."""
    from tofu_export.profiling.images import graph_timing_images, model_timing_images

    if backend.runtime == "torch":
        return model_timing_images(path, count, runner.model)
    if runner.input is None:
        raise UserError(f"{source} has more than one input: it cannot be timed on images", hint=Hint("data"))
    return graph_timing_images(path, count, source, runner.input.chw)

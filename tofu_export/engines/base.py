"""What every runner (one per runtime: torch, ONNX Runtime, TensorRT) offers, and the records they share.

A runner loads one model and serves both users of an engine: evaluation and parity checks call it on images
(``runner(images)``), the profiler times ``run(batch_size)`` on a cached batch (seeded noise, or images given with
``feed_images``) and asks ``profile_ops`` for per-op times.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from tofu_export.errors import UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
NOISE = "seeded normal noise"  # what ``run`` times on until a runner is fed images (``TimedBatches``)


class RunnerError(UserError, ValueError):
    """A runner cannot use this artifact, or the images do not fit it (missing file, wrong shape, static batch)."""


class BackendUnavailableError(UserError, RuntimeError):
    """A requested runtime (execution provider, TensorRT, CUDA) is not installed or not usable here."""


@dataclass(frozen=True)
class OpTime:
    """Mean time of one graph node / layer / module per inference run.

    ``name`` is the scoped node, layer or module name (``/blocks.3/attn/qkv/MatMul``, ``blocks.3.attn``);
    ``op_type`` is the ONNX op, TensorRT layer type or module class (may be empty when unknown).
    """

    name: str
    op_type: str
    ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InputSpec:
    """The one image input ``[B, C, H, W]`` of a model: its name, static batch (None: any batch) and ``(C, H, W)``."""

    name: str
    batch: int | None
    chw: tuple[int, int, int]


@runtime_checkable
class Runner(Protocol):
    """A model ready to run on one device."""

    name: str  # e.g. "onnxruntime[CPU]", "torch[cuda]", "tensorrt[10.3.0]"
    device: str  # "cpu" or "cuda": where memory is measured

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Outputs ``[B, K]`` (float32, CPU) of images ``[B, C, H, W]``, in chunks of the static batch if any."""
        ...

    def run(self, batch_size: int) -> None:
        """Run one inference on the cached batch of ``batch_size`` images (``TimedBatches``)."""

    def feed_images(self, images: Any) -> None:
        """Time (and profile) on ``images`` ``[N, C, H, W]`` from now on, not on seeded noise (``TimedBatches``)."""

    def sync(self) -> None:
        """Block until all queued device work is done (a no-op for synchronous runtimes)."""

    def profile_ops(self, batch_size: int, iters: int) -> list[OpTime]:
        """Per-node mean times over ``iters`` profiled runs (after one discarded warm-up run)."""
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
    import torch  # the runners' tensors; imported here so that the records above cost no torch

    outputs = []
    for start in range(0, images.shape[0], fixed_batch):
        chunk = images[start : start + fixed_batch]
        missing = fixed_batch - chunk.shape[0]
        if missing:
            chunk = torch.cat([chunk, chunk.new_zeros((missing, *chunk.shape[1:]))])
        outputs.append(run(chunk)[: fixed_batch - missing])
    return torch.cat(outputs)


def run_images(
    run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor | Any, spec: InputSpec, source: str
) -> torch.Tensor:
    """``run`` over ``images`` ``[B, C, H, W]`` (torch or numpy, moved to the CPU), checked against the static
    ``spec.chw`` and cut into chunks of the static ``spec.batch`` if there is one (see ``run_in_fixed_batches``)."""
    import torch

    images = torch.as_tensor(images).detach().cpu().contiguous()
    if list(images.shape[1:]) != list(spec.chw):
        raise RunnerError(
            f"{source} expects images shaped {list(spec.chw)} per sample but got {list(images.shape[1:])}. Resize "
            "them to the size the artifact was exported at (evaluation.artifact_transform(img_size=...) does)."
        )
    return run_in_fixed_batches(run, images, spec.batch)


def fill_batch(images: T, batch_size: int) -> T:
    """The first ``batch_size`` of ``images`` ``[N, ...]`` (numpy or torch), starting over at the first image when
    the batch is larger than ``N``."""
    return images[[i % len(images) for i in range(batch_size)]]  # type: ignore[index]


class TimedBatches:
    """``batches(B)``: the ``[B, *chw]`` float32 batch a runner's ``run(B)`` times on ``device``, made once per batch
    size, outside any timing: seeded normal noise, or after ``use(images)`` those images (``fill_batch``).

    A graph's time can depend on its input's values: on an Intel Xeon VM a DINOv2 ViT-S/14 block ran 9.1 ms on
    noise against 6.6 ms on its own input (``bench/results/latency_prediction.md``), so timing on real images gives
    the figure a deployment sees.
    """

    def __init__(self, chw: Sequence[int], seed: int, device: str = "cpu") -> None:
        import torch

        self.chw = tuple(chw)
        self.device = device
        self._generator = torch.Generator().manual_seed(seed)
        self._images: torch.Tensor | None = None
        self._cache: dict[int, torch.Tensor] = {}

    def use(self, images: Any, source: str) -> None:
        """Batches from ``images`` ``[N, *chw]`` (a tensor or an array) from now on; ``source`` names the model in
        the error a wrong shape gets."""
        import torch

        images = torch.as_tensor(images, dtype=torch.float32)
        check_timed_images(tuple(images.shape), self.chw, source)
        self._images = images.to(self.device)
        self._cache.clear()

    def __call__(self, batch_size: int) -> torch.Tensor:
        import torch

        if batch_size not in self._cache:
            self._cache[batch_size] = (
                torch.randn((batch_size, *self.chw), generator=self._generator).to(self.device)
                if self._images is None else fill_batch(self._images, batch_size))
        return self._cache[batch_size]


def check_timed_images(shape: Sequence[int], chw: Sequence[int], source: str) -> None:
    """Refuse images to time on that are not ``[N, *chw]`` with N >= 1."""
    if len(shape) != 1 + len(chw) or tuple(shape[1:]) != tuple(chw) or shape[0] < 1:
        raise RunnerError(f"{source} takes images {list(chw)} to time on, got {list(shape)}.")

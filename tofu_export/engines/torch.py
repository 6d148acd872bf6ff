"""PyTorch: a module in eval mode, run on images or timed on a cached random batch (eagerly, or on CUDA as one
captured CUDA graph per batch size); per-module profiling."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from tofu_export.engines.base import BackendUnavailableError, InputSpec, OpTime, RunnerError, TimedBatches
from tofu_export.sizes import as_pair

if TYPE_CHECKING:
    from tofu_export.models.family import ModelFamily

ROOT_NAME = "<model>"
_SCOPE_PREFIX = "module::"


class TorchRunner:
    """``model`` in inference mode on ``device``; ``features=True`` returns pre-logits pooled features, not logits.

    ``img_size`` (default: the model's own input size, from its family) sets the random batch ``run`` times; calling
    the runner on images needs no size. ``cuda_graphs=True`` (CUDA only) times each batch size as one captured CUDA
    graph, replayed: the GPU's time without Python's per-kernel launch cost, which dominates an eager ViT-S at small
    batches. Calls on images and ``profile_ops`` stay eager.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: Literal["cpu", "cuda"] = "cpu",
        img_size: int | tuple[int, int] | None = None,
        threads: int | None = None,
        in_chans: int = 3,
        seed: int = 0,
        features: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        if device not in ("cpu", "cuda"):
            raise RunnerError(f"device must be 'cpu' or 'cuda', got {device!r}.")
        if cuda_graphs and device != "cuda":
            raise RunnerError(f"cuda_graphs=True needs device='cuda' (CUDA graphs are a GPU feature), got {device!r}.")
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                "TorchRunner(device='cuda') needs a CUDA GPU and a CUDA build of torch; "
                "torch.cuda.is_available() is False here. Use device='cpu'."
            )
        if threads is not None:
            torch.set_num_threads(threads)  # process-wide: torch has no per-model thread pool
        self.device = device
        self.cuda_graphs = cuda_graphs
        self.name = f"torch[{device}, CUDA graphs]" if cuda_graphs else f"torch[{device}]"
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}
        self.model = model.eval().to(device)
        self.features = features
        self.family = _family(model)
        size = img_size if img_size is not None or self.family is None else self.family.img_size(model)
        self.input = None if size is None else InputSpec("images", None, (in_chans, *as_pair(size)))
        self._batches = None if self.input is None else TimedBatches(self.input.chw, seed, device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` (or pooled features ``[B, D]``) of ``images`` ``[B, C, H, W]``, on the CPU."""
        images = torch.as_tensor(images).to(self.device)
        if not self.features:
            return self.model(images).cpu()
        if self.family is None:
            raise RunnerError(f"TorchRunner(features=True) needs a model ToFu knows; got {type(self.model).__name__}")
        family, model = self.family, self.model
        return family.pooled_output(model, family.run_blocks(model, family.embed(model, images), 0)).cpu()

    def _timed(self) -> TimedBatches:
        if self._batches is None:
            raise RunnerError("TorchRunner needs img_size to make a batch to time: ToFu does not know this model.")
        return self._batches

    def _batch(self, batch_size: int) -> torch.Tensor:
        """The cached batch ``[B, C, H, W]`` ``run`` times, on the runner's device (``TimedBatches``)."""
        return self._timed()(batch_size)

    def feed_images(self, images: Any) -> None:
        """Time on ``images`` ``[N, C, H, W]`` from now on (batch B: the first B, repeated when B > N), not on
        seeded noise; CUDA graphs captured on the old batches are captured again."""
        self._timed().use(images, type(self.model).__name__)
        self._replays.clear()

    @torch.inference_mode()
    def run(self, batch_size: int) -> None:
        if not self.cuda_graphs:
            self._forward(batch_size)
            return
        if batch_size not in self._replays:  # captured at the first run of this size (a warm-up run, untimed)
            try:
                self._replays[batch_size] = capture_cuda_graph(self.model, self._batch(batch_size))
            except (RuntimeError, AssertionError) as error:  # a host sync, an op graphs cannot hold, no CUDA
                first_line = str(error).splitlines()[0] if str(error) else ""
                raise RunnerError(
                    f"capturing the model's forward at batch {batch_size} as a CUDA graph failed "
                    f"({type(error).__name__}: {first_line}); time it without CUDA graphs."
                ) from error
        self._replays[batch_size]()

    @torch.inference_mode()
    def _forward(self, batch_size: int) -> None:
        self.model(self._batch(batch_size))

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def profile_ops(self, batch_size: int, iters: int) -> list[OpTime]:
        """Exclusive (self) time per module, per run, in ms: each module's scope minus its child modules'.

        Module names are ``named_modules`` paths (``blocks.3.attn.qkv``); time spent in the model's own
        ``forward`` outside any submodule is reported as ``<model>``. The parts sum to the forward time.
        On CUDA the times are GPU kernel times, on CPU host wall time.
        """
        self._forward(batch_size)  # warm-up, outside the profile (eager: a graph replay has no module scopes)
        # Kineto, the profiler's tracer, otherwise prints "USDT: profiler_start/stop" and, without a GPU,
        # "ERROR: gpuGetDeviceCount failed" on stderr at every profile; read when the first profile starts, and a
        # level the user set is kept.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with _module_scopes(self.model), torch.profiler.profile(activities=activities) as prof:
            for _ in range(iters):
                self._forward(batch_size)
            self.sync()
        # The host-side scope events only: on CUDA the profiler also records each scope as a GPU "user annotation"
        # under the same name, whose span includes the GPU's idle gaps between launches; read instead, a block's
        # self time took those gaps and the parts summed to 3x the forward time (measured on an H200 at batch 1).
        # A host-side scope's device time is the kernel time it launched, children included.
        inclusive_us = {
            event.key.removeprefix(_SCOPE_PREFIX): (
                event.device_time_total if self.device == "cuda" else event.cpu_time_total
            )
            for event in prof.key_averages()
            if event.key.startswith(_SCOPE_PREFIX) and event.device_type == torch.autograd.DeviceType.CPU
        }
        return _exclusive_times(self.model, inclusive_us, iters)


def capture_cuda_graph(model: nn.Module, x: torch.Tensor, warmup: int = 3) -> Callable[[], torch.Tensor]:
    """``model(x)`` captured as one CUDA graph; the returned call replays it and returns the graph's output tensor
    (asynchronously: synchronise before reading it or to time it).

    The forward runs ``warmup`` times on a side stream first (cuBLAS handles and the caching allocator's blocks are
    made there, as capture requires); each replay reads ``x`` in place and overwrites the same output tensor.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(warmup):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        output = model(x)

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


@contextmanager
def _module_scopes(model: nn.Module) -> Iterator[None]:
    """Wrap every module's forward in a ``record_function("module::<path>")`` scope via forward hooks."""
    open_scopes: dict[str, list[torch.autograd.profiler.record_function]] = {}
    handles = []
    for name, module in model.named_modules():
        label = name or ROOT_NAME

        def enter(_module: nn.Module, _args: object, label: str = label) -> None:
            scope = torch.autograd.profiler.record_function(_SCOPE_PREFIX + label)
            scope.__enter__()
            open_scopes.setdefault(label, []).append(scope)

        def leave(_module: nn.Module, _args: object, _output: object, label: str = label) -> None:
            open_scopes[label].pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _exclusive_times(model: nn.Module, inclusive_us: dict[str, float], iters: int) -> list[OpTime]:
    """Per-module self time: inclusive time minus the inclusive times of its direct children, per run."""
    ops = []
    for name, module in model.named_modules():
        label = name or ROOT_NAME
        if label not in inclusive_us:
            continue
        children = (f"{name}.{child}" if name else child for child, _ in module.named_children())
        self_us = inclusive_us[label] - sum(inclusive_us.get(child, 0.0) for child in children)
        ops.append(OpTime(name=label, op_type=type(module).__name__, ms=max(self_us, 0.0) / 1e3 / iters))
    return ops


def _family(model: nn.Module) -> ModelFamily | None:
    """The model's ToFu family, or None for a model no family owns (it can still be run on given images)."""
    from tofu_export.models.family import UnsupportedModelError, family_of

    try:
        return family_of(model)
    except UnsupportedModelError:
        return None

"""Shared fixtures: seeded random-init timm ViTs small enough for a 2-core CPU, and seeded image batches."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # torch and timm are imported where used: the xdist controller, which runs no test, never loads them
    import torch
    from timm.models.vision_transformer import VisionTransformer

    VitFactory = Callable[..., VisionTransformer]
    ImageFactory = Callable[..., torch.Tensor]

ENV = "TOFU_TESTS_TRACE_CACHE"  # the session's trace-cache folder (trace_cache.py), shared by its workers, or "off"
CLASS_CACHE_ENV = "TOFU_EXPORT_CLASS_CACHE"  # evaluation.class_cache's folder
_OWN_FOLDERS: dict[str, str] = {}  # env name -> the folder this process made (the xdist controller, or a lone run)


def pytest_configure(config: pytest.Config) -> None:
    """One trace-cache folder for the session, inherited by its workers and their fork servers (``trace_cache``), and
    one for zero-shot's class embeddings (``evaluation.class_cache``: the tests never write the user's ~/.cache).
    A pytest-xdist worker with a worker per core runs torch on one intra-op thread: two threads per worker on two
    cores made tiny-model forwards up to ~80x slower on a loaded machine (``single_thread`` does the same for a
    module in a lone run)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and workers >= (os.cpu_count() or 1):
        import torch

        torch.set_num_threads(1)
    lean_garbage_collector()
    if not os.environ.get(CLASS_CACHE_ENV):  # zero-shot's class embeddings: kept for the session, not in ~/.cache
        os.environ[CLASS_CACHE_ENV] = _OWN_FOLDERS[CLASS_CACHE_ENV] = tempfile.mkdtemp(prefix="tofu-class-cache-")
    if not os.environ.get(ENV):
        os.environ[ENV] = _OWN_FOLDERS[ENV] = tempfile.mkdtemp(prefix="tofu-trace-cache-")


GC_ENV = "TOFU_TESTS_GC"  # "default" keeps Python's collector settings (to compare against)


def lean_garbage_collector() -> None:
    """Fewer, cheaper cyclic collections in a test process: what is imported so far (in a worker, torch) is
    frozen out of every later collection, and the youngest generation is collected as rarely as ``tofu-export``
    collects it (``cli.fewer_collections``: every 50,000 allocations instead of 700). A dynamo export makes millions
    of short-lived objects: with Python's defaults the collector took ~9% of a tiny ToFu ViT's export, ~2% with
    these; ``test_cli.py`` and ``test_calibration.py`` in one process used 0.89-0.90 of the CPU (3 interleaved
    pairs). Nothing a test checks depends on when garbage is freed; ``TOFU_TESTS_GC=default`` keeps Python's
    settings. The fork server does the same (``commands.SERVER``)."""
    if os.environ.get(GC_ENV) != "default":
        from tofu_export.cli import fewer_collections

        gc.freeze()
        fewer_collections()  # the threshold the command sets for itself


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, folder in _OWN_FOLDERS.items():
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(name, None)
    if os.environ.get(GC_ENV) != "default":
        one_final_collection(config)


def one_final_collection(config: pytest.Config) -> None:
    """One cyclic collection at the end of the session instead of pytest's 5. After this hook pytest's
    unraisable-exception plugin collects garbage, to run the finalizers of cyclic garbage and report what they raise
    as warnings (never failures), 5 passes in a row; each pass walks every live object, 1.1-1.5 million in a worker
    at the end of this suite: 3.3-4.7 s a worker, the last seconds of every run. One pass still runs every finalizer
    of the garbage left then; what it misses is garbage that a finalizer's own run leaves behind. (The setting is
    pytest's own, made for pytester's in-process runs; another pytest without it keeps its default.)"""
    try:
        from _pytest.unraisableexception import gc_collect_iterations_key
    except ImportError:
        return
    config.stash[gc_collect_iterations_key] = 1


@pytest.fixture(scope="module")
def shared_traces() -> Iterator[None]:
    """The module's dynamo traces through the session's trace cache (``trace_cache``): ask for it only in a module
    that changes nothing a trace depends on (no patched model code); its exports still simplify, check and verify."""
    with traces_through_the_cache():
        yield


@contextlib.contextmanager
def traces_through_the_cache() -> Iterator[None]:
    """Inside: ``exporters.trace``'s dynamo trace step goes through the session's trace cache (unless it is off)."""
    folder = os.environ.get(ENV, "off")
    with pytest.MonkeyPatch.context() as patcher:
        if folder != "off":
            from trace_cache import cached

            from tofu_export.exporters import trace

            patcher.setattr(trace, "_trace_dynamo", cached(trace._trace_dynamo, Path(folder)))
        yield


_BUILT: dict[str, tuple[Any, Any]] = {}  # a build's arguments -> (the model as built, torch's RNG state after it)


def _build_vit(name: str, seed: int = 0, **kwargs: Any) -> VisionTransformer:
    """A random-init timm model in eval mode; layer-scale gammas are drawn from U(0.5, 1.5).

    DINOv2's layer scale starts at 1e-5, which would make every block nearly the identity and every comparison
    between two ways of computing the blocks vacuous.

    Each distinct call builds once per process (timm's random initialisation was ~3% of the suite's CPU); every call
    gets its own deep copy, and leaves torch's random number generator as a fresh build leaves it.
    """
    import copy

    import torch

    key = repr((name, seed, sorted(kwargs.items())))
    if key not in _BUILT:
        import timm
        from timm.layers import LayerScale

        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        for module in model.modules():
            if isinstance(module, LayerScale):
                with torch.no_grad():
                    module.gamma.uniform_(0.5, 1.5)
        _BUILT[key] = (model, torch.get_rng_state())
    model, generator_state = _BUILT[key]
    torch.set_rng_state(generator_state)
    return copy.deepcopy(model)


def _images(batch: int, img_size: int, seed: int = 1) -> torch.Tensor:
    """``[batch, 3, img_size, img_size]`` standard-normal images from a fixed seed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img_size, img_size, generator=generator)


@pytest.fixture(scope="session")
def make_vit() -> VitFactory:
    """``make_vit(name, seed=0, **timm_kwargs)``: a fresh random-init model (e.g. ``depth=4, img_size=64``)."""
    return _build_vit


@pytest.fixture(scope="session")
def make_images() -> ImageFactory:
    """``make_images(batch, img_size, seed=1)``: a seeded ``[B, 3, H, W]`` batch."""
    return _images


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Run a test module on one intra-op thread: on 2 busy cores, two threads make tiny-model ops 20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class CallLog:
    """Calls recorded across processes: ``spy(fn)`` wraps ``fn`` so that every call, in this process or in a forked
    export worker (``exporters.workers``), appends its keyword arguments (JSON, other values as text) and its
    process id to one file; ``calls()`` reads them back in the order they were written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def spy(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        import json

        def recorded(*args: Any, **kwargs: Any) -> Any:
            with self.path.open("a") as log:  # one short line a call: an append lands whole
                log.write(json.dumps({"pid": os.getpid(), "kwargs": kwargs}, default=str) + "\n")
            return fn(*args, **kwargs)

        return recorded

    def calls(self) -> list[dict]:
        import json

        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


@pytest.fixture
def call_log(tmp_path: Path) -> CallLog:
    """A ``CallLog`` in this test's folder."""
    return CallLog(tmp_path / "calls.jsonl")


# ----------------------------------------------------------------------------------------------------
# One tiny checkpoint and its export, shared by every test that only reads them
# ----------------------------------------------------------------------------------------------------

TINY_ARCH, TINY_IMG, TINY_DEPTH, TINY_R = "deit_tiny_patch16_224", 64, 2, 2  # 17 tokens enter block 0


def tiny_state_dict() -> dict[str, torch.Tensor]:
    """The weights of ``deit_tiny_patch16_224`` with 2 blocks at 64 px, random init from seed 0 (1000 classes)."""
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(TINY_ARCH, pretrained=False, depth=TINY_DEPTH, img_size=TINY_IMG).eval().state_dict()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.safetensors`` of ``tiny_state_dict()`` with its timm ``config.json`` beside it, as a hub download has
    (the head count and block kind are not in the weights: the config states them). Read it; never write beside it."""
    import json

    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("tiny") / "model.safetensors"
    save_file(tiny_state_dict(), str(path))
    config = {"architecture": TINY_ARCH, "num_classes": 1000, "model_args": {"depth": TINY_DEPTH, "img_size": TINY_IMG}}
    (path.parent / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def mixed_tofu_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``deit_tiny_patch16_224`` (4 blocks, 64 px, random init from seed 0) with ToFu r=3, block 0 pruning and blocks
    1-3 merging (MLERP), exported with the default settings. Its dynamo trace goes through the session's trace cache,
    so the modules that read this graph share one trace whichever worker runs them. Read it; never write beside it."""
    import timm
    import torch

    from tofu_export import patch
    from tofu_export.exporters.onnx import export_onnx

    torch.manual_seed(0)
    model = timm.create_model(TINY_ARCH, pretrained=False, depth=4, img_size=TINY_IMG).eval()
    patch(model, r=3, mode="tofu", prune_layers=1, img_size=TINY_IMG)
    path = tmp_path_factory.mktemp("mixed_tofu") / "model.onnx"
    with traces_through_the_cache():
        export_onnx(model, path, TINY_IMG)
    return path


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifact folder of ``tiny_checkpoint`` exported with ToFu r=2 and the default settings, without the
    quick look. Shared: a test that writes into it must copy it first (``shutil.copytree``)."""
    from tofu_export.config import ExportConfig, ToFuConfig
    from tofu_export.pipeline import run_export

    out = tmp_path_factory.mktemp("tiny_export") / "artifact"
    run_export(tiny_checkpoint, out, ExportConfig(tofu=ToFuConfig(r=TINY_R)))
    return out


@pytest.fixture
def safetensors_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key of every tensor read whole through ``safetensors.safe_open`` during the test, in order (a header's
    shapes and slices are not reads)."""
    import safetensors

    read: list[str] = []
    real_open = safetensors.safe_open

    class Recording:  # safe_open, recording every tensor read
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.inner = real_open(*args, **kwargs)

        def __enter__(self) -> Recording:
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def __getattr__(self, name: str) -> object:
            return getattr(self.handle, name)

        def get_tensor(self, key: str) -> object:
            read.append(key)
            return self.handle.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return read

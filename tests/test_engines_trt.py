"""TensorRT runner: clear errors without TensorRT; per-layer profiling against a fake ``tensorrt`` (any machine);
on a CUDA box with TensorRT, a ToFu export built with ``build_engine`` matches torch and reports its layers."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tofu_export.engines.base import BackendUnavailableError, RunnerError, TimedBatches
from tofu_export.tensorrt.runner import TrtRunner, layer_profiler

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
LAYERS = {"/blocks.0/attn/qkv/MatMul": 1.0, "/blocks.0/reduce/MatMul + /blocks.0/reduce/Softmax": 0.25}


@pytest.mark.skipif(HAS_TRT, reason="TensorRT and CUDA are available here")
def test_missing_tensorrt_is_a_clear_runtime_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="TensorRT") as info:
        TrtRunner(tmp_path / "model.engine")
    assert isinstance(info.value, BackendUnavailableError)


class FakeIProfiler:
    def __init__(self) -> None:
        pass


class FakeEngine:
    """One input ``images [-1, 3, 8, 8]`` (dynamic batch) and one output ``logits``."""

    num_io_tensors = 2

    def __init__(self, batch: int = -1) -> None:
        self.shapes = {"images": (batch, 3, 8, 8), "logits": (batch, 10)}

    def get_tensor_name(self, index: int) -> str:
        return list(self.shapes)[index]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == "images" else "OUTPUT"

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def create_execution_context(self) -> Any:
        return types.SimpleNamespace(profiler=None)


@pytest.fixture
def fake_runner(monkeypatch: pytest.MonkeyPatch) -> TrtRunner:
    """A TrtRunner over a fake engine whose executions report ``LAYERS`` times scaled by ``n + 1`` on run n,
    to the profiler attached to the context (as TensorRT does), if any."""
    trt = types.SimpleNamespace(IProfiler=FakeIProfiler, __version__="10.0-fake",
                                TensorIOMode=types.SimpleNamespace(INPUT="INPUT"))  # fmt: skip
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    runner = TrtRunner(FakeEngine())
    runs: list[int] = []
    fed: list[torch.Tensor] = []

    def infer(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert list(inputs) == ["images"]
        profiler = runner.context.profiler
        if profiler is not None:
            for name, ms in LAYERS.items():
                profiler.report_layer_time(name, ms * (len(runs) + 1))
        runs.append(inputs["images"].shape[0])
        fed.append(inputs["images"])
        return {"logits": torch.zeros(inputs["images"].shape[0], 10)}

    monkeypatch.setattr(runner, "infer", infer)
    monkeypatch.setattr(runner, "_batches", TimedBatches((3, 8, 8), seed=0, device="cpu"))  # no GPU here
    runner.runs = runs  # type: ignore[attr-defined]
    runner.fed = fed  # type: ignore[attr-defined]
    return runner


def test_runner_times_on_the_images_it_is_fed(fake_runner: TrtRunner) -> None:
    fake_runner.run(2)
    noise = fake_runner.fed[-1]  # type: ignore[attr-defined]
    images = torch.rand(3, 3, 8, 8)
    fake_runner.feed_images(images)
    fake_runner.run(2)
    fake_runner.run(4)
    assert torch.equal(fake_runner.fed[-2], images[:2]) and not torch.equal(noise, images[:2])  # type: ignore[attr-defined]
    assert torch.equal(fake_runner.fed[-1], images[[0, 1, 2, 0]])  # type: ignore[attr-defined]
    with pytest.raises(RunnerError, match=r"takes images \[3, 8, 8\] to time on"):
        fake_runner.feed_images(torch.rand(1, 3, 4, 4))


def test_runner_reads_the_engine_input(fake_runner: TrtRunner) -> None:
    assert fake_runner.input is not None
    assert (fake_runner.input.name, fake_runner.input.batch, fake_runner.input.chw) == ("images", None, (3, 8, 8))
    assert fake_runner.output_names == ["logits"] and fake_runner.name == "tensorrt[10.0-fake]"


def test_profile_ops_averages_layer_times_over_profiled_runs_only(fake_runner: TrtRunner) -> None:
    ops = fake_runner.profile_ops(batch_size=2, iters=3)
    # run 0 is the warm-up (no profiler attached); runs 1..3 report ms * 2, 3, 4: a mean of ms * 3 per run
    assert {op.name: op.ms for op in ops} == {name: pytest.approx(ms * 3) for name, ms in LAYERS.items()}
    assert fake_runner.runs == [2, 2, 2, 2]  # type: ignore[attr-defined]
    assert fake_runner.context.profiler is None  # detached afterwards


def test_profiler_is_detached_when_a_run_fails(fake_runner: TrtRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def failing_run(batch_size: int) -> None:
        calls.append(batch_size)
        if len(calls) > 1:
            raise RuntimeError("execute_async_v3 failed")

    monkeypatch.setattr(fake_runner, "run", failing_run)
    with pytest.raises(RuntimeError, match="execute_async_v3"):
        fake_runner.profile_ops(batch_size=1, iters=2)
    assert fake_runner.context.profiler is None


def test_layer_profiler_sums_repeated_reports_per_layer() -> None:
    profiler = layer_profiler(types.SimpleNamespace(IProfiler=FakeIProfiler))
    for name, ms in [("a", 1.0), ("b", 0.5), ("a", 2.0)]:
        profiler.report_layer_time(name, ms)
    assert profiler.totals_ms == {"a": 3.0, "b": 0.5}


def test_call_runs_static_batch_engines_in_padded_chunks(
    fake_runner: TrtRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = TrtRunner(FakeEngine(batch=2))  # fake_runner has installed the fake tensorrt
    seen: list[int] = []

    def infer(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.append(inputs["images"].shape[0])
        return {"logits": inputs["images"].flatten(1)[:, :10] + 1}

    monkeypatch.setattr(runner, "infer", infer)
    images = torch.randn(5, 3, 8, 8)
    out = runner(images)
    assert seen == [2, 2, 2] and out.shape == (5, 10)
    torch.testing.assert_close(out, images.flatten(1)[:, :10] + 1)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs the tensorrt Python package and a CUDA GPU")
def test_tofu_engine_matches_torch_and_reports_its_layers(tmp_path: Path) -> None:
    import timm

    from tofu_export.config import TrtConfig
    from tofu_export.exporters.onnx import export_onnx
    from tofu_export.models.timm_vit import patch
    from tofu_export.tensorrt.build import build_engine

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    patch(model, r=4, mode="tofu", img_size=64)
    onnx_path = export_onnx(model, tmp_path / "tofu.onnx", 64).path
    runner = TrtRunner(build_engine(onnx_path, tmp_path / "tofu.engine", TrtConfig(max_batch=4)))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(runner(images), expected, atol=2e-3, rtol=2e-3)
    ops = runner.profile_ops(batch_size=1, iters=3)
    assert any("blocks" in op.name for op in ops)
    assert 0 < sum(op.ms for op in ops) < 1e3 and np.isfinite([op.ms for op in ops]).all()

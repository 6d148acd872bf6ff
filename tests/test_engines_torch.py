"""TorchRunner on a tiny timm ViT: runs, and per-module exclusive times from torch.profiler."""

import os
import time

import pytest
import timm
import torch
from torch import nn

import tofu_export
from tofu_export.engines.base import BackendUnavailableError, RunnerError
from tofu_export.engines.torch import ROOT_NAME, TorchRunner, _exclusive_times, capture_cuda_graph
from tofu_export.profiling.breakdown import categorize, summarize

IMG = 32


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=2)


def test_exclusive_times_subtract_direct_children() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Identity()))
    inclusive_us = {ROOT_NAME: 1000.0, "0": 300.0, "1": 500.0, "1.0": 200.0, "1.1": 100.0}
    times = {op.name: op.ms for op in _exclusive_times(model, inclusive_us, iters=2)}
    assert times == pytest.approx({ROOT_NAME: 0.1, "0": 0.15, "1": 0.1, "1.0": 0.1, "1.1": 0.05})


def test_profile_ops_names_modules_and_covers_vit_parts() -> None:
    backend = TorchRunner(tiny_vit(), device="cpu", img_size=IMG, threads=1)
    backend.run(2)
    ops = backend.profile_ops(batch_size=2, iters=3)
    by_name = {op.name: op for op in ops}
    assert by_name["blocks.0.attn.qkv"].op_type == "Linear"
    assert by_name[ROOT_NAME].op_type == "VisionTransformer"
    assert by_name["blocks.1.mlp.fc1"].ms > by_name["blocks.1.mlp.drop1"].ms
    parts = summarize(ops)
    for category in ("attention", "mlp", "embed", "head"):
        assert parts.by_category_ms[category] > 0, category
    assert not backend.model._forward_pre_hooks and not backend.model.blocks[0]._forward_hooks  # hooks removed


def test_profiling_quiets_the_tracer_unless_the_user_set_its_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kineto prints "USDT: profiler_start" (and, without a GPU, an ERROR line) at every profile unless its level
    is set before its first profile; a level the user set stays."""
    backend = TorchRunner(tiny_vit(), device="cpu", img_size=IMG, threads=1)
    monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)
    backend.profile_ops(batch_size=1, iters=1)
    assert os.environ["KINETO_LOG_LEVEL"] == "6"
    monkeypatch.setenv("KINETO_LOG_LEVEL", "2")
    backend.profile_ops(batch_size=1, iters=1)
    assert os.environ["KINETO_LOG_LEVEL"] == "2"


def test_runner_times_on_the_images_it_is_fed(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = TorchRunner(tiny_vit(), device="cpu", img_size=IMG, threads=1)
    seen: list[torch.Tensor] = []
    forward = backend.model.forward
    monkeypatch.setattr(backend.model, "forward", lambda x: seen.append(x) or forward(x))
    backend.run(2)
    images = torch.rand(3, 3, IMG, IMG)
    backend.feed_images(images)
    backend.run(2)
    backend.run(4)
    assert not torch.equal(seen[0], images[:2]) and torch.equal(seen[1], images[:2])
    assert torch.equal(seen[2], images[[0, 1, 2, 0]])  # a batch larger than the images: round again
    with pytest.raises(RunnerError, match=r"takes images \[3, 32, 32\] to time on, got \[2, 3, 16, 16\]"):
        backend.feed_images(torch.rand(2, 3, 16, 16))


def test_patched_model_has_token_reduction_modules() -> None:
    import tofu_export

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3)
    tofu_export.patch(model, r=4, mode="tofu", img_size=64)
    ops = TorchRunner(model, img_size=64, threads=1).profile_ops(batch_size=1, iters=2)
    assert any(categorize(op.name, op.op_type) == "token_reduction" for op in ops)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_request_without_gpu_fails_clearly() -> None:
    with pytest.raises(BackendUnavailableError, match="cuda"):
        TorchRunner(nn.Identity(), device="cuda", img_size=IMG)


def test_cuda_graphs_are_refused_off_the_gpu() -> None:
    with pytest.raises(RunnerError, match="cuda_graphs=True needs device='cuda'"):
        TorchRunner(nn.Identity(), device="cpu", img_size=IMG, cuda_graphs=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: the capture would succeed")
def test_a_failed_capture_is_a_runner_error_that_says_what_to_do() -> None:
    runner = TorchRunner(tiny_vit(), device="cpu", img_size=IMG)
    runner.cuda_graphs = True  # past the constructor's check: the capture itself fails (no CUDA here)
    with pytest.raises(RunnerError, match=r"at batch 1 as a CUDA graph failed \(.*\); time it without CUDA graphs"):
        runner.run(1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_the_static_forward_on_new_inputs() -> None:
    """The captured ToFu static graph computes what eager torch computes, for inputs written into its input tensor
    after capture; the runner captures once per batch size and times replays."""
    model = tiny_vit()
    tofu_export.patch(model, r=2, mode="tofu", img_size=IMG)
    model = model.eval().cuda()
    x = torch.randn(2, 3, IMG, IMG, device="cuda")
    replay = capture_cuda_graph(model, x)
    for seed in (1, 2):
        x.copy_(torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)).cuda())
        out = replay().clone()
        with torch.inference_mode():
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    runner = TorchRunner(model, device="cuda", img_size=IMG, cuda_graphs=True)
    for _ in range(3):
        runner.run(2)
    runner.run(1)
    runner.sync()
    assert sorted(runner._replays) == [1, 2] and runner.name == "torch[cuda, CUDA graphs]"
    assert summarize(runner.profile_ops(batch_size=1, iters=2)).by_category_ms["token_reduction"] > 0  # eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_profile_parts_are_kernel_time_within_the_forward_time() -> None:
    """On CUDA the parts are the kernel time each module launched: at batch 1 (launch-bound) they sum to less than
    the forward's wall time. Read from the GPU-side annotation spans, idle gaps included, they summed to 3x it."""
    model = tiny_vit()
    tofu_export.patch(model, r=1, mode="tofu", img_size=IMG)
    backend = TorchRunner(model, device="cuda", img_size=IMG)
    backend.run(1)
    backend.sync()
    start = time.perf_counter()
    for _ in range(20):
        backend.run(1)
    backend.sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / 20
    parts = summarize(backend.profile_ops(batch_size=1, iters=20)).by_category_ms
    assert parts["mlp"] > 0 and parts["attention"] > 0 and parts["token_reduction"] > 0
    assert sum(parts.values()) < wall_ms, (parts, wall_ms)

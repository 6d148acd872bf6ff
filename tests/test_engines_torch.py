"""TorchRunner on a tiny timm ViT: runs, and per-module exclusive times from torch.profiler."""

import pytest
import timm
import torch
from torch import nn

from tofu_export.engines.base import BackendUnavailableError
from tofu_export.engines.torch import ROOT_NAME, TorchRunner, _exclusive_times
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_profile_reports_kernel_time() -> None:
    backend = TorchRunner(tiny_vit(), device="cuda", img_size=IMG)
    assert summarize(backend.profile_ops(batch_size=4, iters=3)).by_category_ms["mlp"] > 0

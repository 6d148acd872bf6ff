"""The open_clip family on a tiny random ``VisionTransformer`` tower: r=0 is the identity, the calibration hooks
compute the forward, proportional attention and size-weighted average pooling are applied, keys come from the
packed in-projection, and the static export passes parity without scatter or control flow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

open_clip_transformer = pytest.importorskip("open_clip.transformer")

from tofu_export.exporters.graph_costs import reduction_costs  # noqa: E402
from tofu_export.exporters.onnx import export_onnx  # noqa: E402
from tofu_export.models.family import family_of, is_patched, patch, patched, unpatch  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]

FORBIDDEN_OPS = {"ScatterElements", "ScatterND", "Scatter", "If", "Loop", "NonZero"}


def tower(pool: str = "tok") -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip_transformer.VisionTransformer(image_size=32, patch_size=4, width=32, layers=3, heads=2,
                                                   mlp_ratio=2, output_dim=16, pool_type=pool).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_patch_hooks_and_restore(pool: str, images: torch.Tensor) -> None:
    model = tower(pool)
    family = family_of(model)
    assert family.name == "open_clip" and family.num_tokens(model) == 65 and family.num_prefix(model) == 1
    with torch.no_grad():
        reference = model(images)
        with patched(model, r=0):
            assert torch.equal(model(images), reference)
        with patched(model, r=8, mode="tofu"):
            reduced = model(images)
            hooks = family.pooled_output(model, family.run_blocks(model, family.embed(model, images), 0))
            with patched(model, r=8, mode="tofu", prop_attn=False):
                assert not torch.allclose(model(images), reduced, atol=1e-6)
        torch.testing.assert_close(hooks, reduced, rtol=0, atol=1e-6)
        assert not torch.allclose(reduced, reference, atol=1e-4) and not is_patched(model)
        x = family.embed(model, images)
        y, metric = family.attention_half(model, 0, x)
        assert metric.shape == (2, 65, 16)
        torch.testing.assert_close(family.mlp_half(model, 0, y), model.transformer.resblocks[0](x), rtol=0, atol=1e-6)
        torch.testing.assert_close(family.pooled_output(model, family.run_blocks(model, x, 0)), reference,
                                   rtol=0, atol=1e-6)


def test_average_pool_is_size_weighted(images: torch.Tensor) -> None:
    model = tower("avg")
    with torch.no_grad(), patched(model, r=8, mode="tome"):
        weighted = model(images)
        state = model._tofu
        x = model.transformer(model._embeds(images))
        unweighted = model.ln_post(x)[:, 1:].mean(dim=1) @ model.proj
        size = state.size[:, 1:]
        by_size = ((model.ln_post(x)[:, 1:] * size).sum(dim=1) / size.sum(dim=1)) @ model.proj
    torch.testing.assert_close(weighted, by_size, rtol=0, atol=1e-6)
    assert not torch.allclose(weighted, unweighted, atol=1e-6)


@pytest.mark.slow
def test_static_export_passes_parity(tmp_path: Path) -> None:
    model = tower()
    patch(model, r=8, mode="tofu", img_size=32, prune_layers=1)
    result = export_onnx(model, tmp_path / "model.onnx", 32, exporter="torchscript")
    assert result.parity is not None and result.parity.ok
    assert not set(result.op_counts) & FORBIDDEN_OPS and "TopK" in result.op_counts
    costs = reduction_costs(tmp_path / "model.onnx")  # `check --costs` finds each resblock's reduce scope
    assert costs.blocks and [b.block for b in costs.blocks] == list(range(len(costs.blocks)))
    assert all(b.ops["TopK"] >= 2 for b in costs.blocks)  # the matching's two (a third sorts a prefix's)
    unpatch(model)


def test_a_frozen_unpatched_tower_exports_through_torchscript(tmp_path: Path) -> None:
    """A calibration's one-block graphs: unpatched, no weight needing a gradient. nn.MultiheadAttention then takes
    its fused kernel, which the TorchScript exporter cannot translate (calibrate --exporter torchscript failed on
    every open_clip tower); the export turns that path off while it traces, and back on after."""
    model = tower().requires_grad_(False)
    result = export_onnx(model, tmp_path / "model.onnx", 32, exporter="torchscript", simplify=False)
    assert result.parity is not None and result.parity.ok
    assert torch.backends.mha.get_fastpath_enabled()

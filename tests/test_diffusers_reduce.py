"""Dense ToFu before the chosen sub-layers of a diffusers ``BasicTransformerBlock`` (self-attention, cross-attention,
MLP) against an eager reference written from the definitions, and ``UNet2DModel``'s feature-map attention."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.models.attention import BasicTransformerBlock  # noqa: E402

from tofu_export.dense.export import export_denoiser, trt_targets_for  # noqa: E402
from tofu_export.dense.module import DenseToFu  # noqa: E402
from tofu_export.dense.plan import BlockPlan, DensePolicy, plan_blocks  # noqa: E402
from tofu_export.dense.tofu import match_dense  # noqa: E402
from tofu_export.errors import UserError  # noqa: E402
from tofu_export.models.diffusers_attention import ReducedMapProcessor  # noqa: E402
from tofu_export.models.diffusers_blocks import ReducedSubLayer, patch_block, unpatch_block  # noqa: E402
from tofu_export.models.diffusers_denoiser import input_names, patch, step, step_inputs, token_grids  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models, one intra-op thread

SIDE, DIM = 4, 32


def block() -> BasicTransformerBlock:
    torch.manual_seed(0)
    return BasicTransformerBlock(DIM, 2, 16, cross_attention_dim=24, activation_fn="geglu").eval()


def reference_reduce(x: torch.Tensor, matching, layout, mode: str) -> tuple[torch.Tensor, list[list[int]]]:
    """From the definitions, one sample at a time: every destination stands for itself and its matched sources
    (prune: the destination's token; mean: the members' mean; MLERP: that mean's direction with the largest member
    norm); an unmatched source stands for itself. Returns the reduced tokens ``[B, M, C]`` and, per sample, the
    row of the reduced token every position takes its output from."""
    rows, owners = [], []
    for b in range(x.shape[0]):
        src_of = dict(zip(layout.src[matching.src_idx[b, :, 0]].tolist(),
                          layout.dst[matching.dst_idx[b, :, 0]].tolist(), strict=True))
        tokens, owner = [], {}
        for pos in range(layout.num_tokens):
            if pos in src_of:
                continue
            members = [pos] + [s for s, d in src_of.items() if d == pos]
            group = x[b, members]  # [k, C]
            if mode == "prune":
                token = x[b, pos]
            elif mode == "mean":
                token = group.mean(0)
            else:
                mean = group.mean(0)
                token = mean / mean.norm() * group.norm(dim=-1).max()
            for m in members:
                owner[m] = len(tokens)
            tokens.append(token)
        rows.append(torch.stack(tokens))
        owners.append([owner[p] for p in range(layout.num_tokens)])
    return torch.stack(rows), owners


def reference_block(blk, x, context, r: int, mode: str, sublayers: tuple[str, ...]) -> torch.Tensor:
    """``BasicTransformerBlock`` (layer-norm type) with the sub-layers in ``sublayers`` run on reduced tokens."""
    layout = DenseToFu(SIDE, SIDE, 0.0, mode).layout
    matching = None

    def around(name: str, normed: torch.Tensor, fn) -> torch.Tensor:
        nonlocal matching
        if name not in sublayers:
            return fn(normed)
        matching = match_dense(normed, layout, r) if matching is None else matching
        reduced, owners = reference_reduce(normed, matching, layout, mode)
        out = fn(reduced)
        return torch.stack([out[b, owners[b]] for b in range(x.shape[0])])

    x = x + around("self", blk.norm1(x), lambda t: blk.attn1(t))
    x = x + around("cross", blk.norm2(x), lambda t: blk.attn2(t, encoder_hidden_states=context))
    return x + around("mlp", blk.norm3(x), lambda t: blk.ff(t))


@pytest.mark.parametrize("sublayers", [("self",), ("self", "cross", "mlp"), ("cross", "mlp")])
@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
def test_sublayers_follow_the_definitions(sublayers: tuple[str, ...], mode: str) -> None:
    blk = block()
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, SIDE * SIDE, DIM, generator=g), torch.randn(2, 3, 24, generator=g)
    with torch.no_grad():
        base = blk(x, encoder_hidden_states=context)
        expected = reference_block(blk, x, context, 6, mode, sublayers)
        assert patch_block(blk, DenseToFu(SIDE, SIDE, 0.0, mode), sublayers) == list(sublayers)
        assert torch.equal(blk(x, encoder_hidden_states=context), base)  # ratio 0: exactly the unreduced block
        unpatch_block(blk)
        patch_block(blk, DenseToFu(SIDE, SIDE, 6 / 16, mode), sublayers)
        got = blk(x, encoder_hidden_states=context)
    assert sum(isinstance(m, ReducedSubLayer) for m in blk.modules()) == len(sublayers)
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    unpatch_block(blk)
    assert not any(isinstance(m, ReducedSubLayer) for m in blk.modules())


def test_one_matching_per_block_forward(monkeypatch) -> None:
    blk = block()
    patch_block(blk, DenseToFu(SIDE, SIDE, 0.5, "mean"), ("self", "cross", "mlp"))
    calls = []
    original = DenseToFu.match
    monkeypatch.setattr(DenseToFu, "match", lambda self, metric: calls.append(1) or original(self, metric))
    with torch.no_grad():
        for _ in range(2):
            blk(torch.randn(1, SIDE * SIDE, DIM), encoder_hidden_states=torch.randn(1, 3, 24))
    assert len(calls) == 2 and blk.attn1._shared.matching is None  # one per forward, dropped after it


def unet2d(mid_attention: bool = True) -> torch.nn.Module:
    """Attention at 16x16 down and up and (``mid_attention``) in the 8x8 mid-block, which the plan leaves
    unreduced."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=8, norm_num_groups=8, add_attention=mid_attention).eval()


def test_unet2d_feature_map_attention_is_reduced() -> None:
    model = unet2d()
    make = step_inputs(model, 16)
    inputs = make(2, 0)
    with torch.no_grad():
        base = step(model)(*inputs)
    grids = token_grids(model, inputs)
    assert grids["down_blocks.0.attentions.0"] == (16, 16) and grids["mid_block.attentions.0"] == (8, 8)
    policy = plan_blocks(grids, 0.5, "mlerp")
    assert set(policy.blocks) == {"down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"}
    patch(model, policy, grids)
    assert sum(isinstance(m, ReducedMapProcessor) for m in model.modules()) == 3
    with torch.no_grad():
        reduced = step(model)(*inputs)
    assert reduced.shape == base.shape and not torch.allclose(reduced, base)
    patch(model, DensePolicy({name: BlockPlan(0.0, "mlerp") for name in grids}), grids)
    with torch.no_grad():
        assert torch.allclose(step(model)(*inputs), base, atol=1e-6)  # ratio 0 through the processor
    with pytest.raises(UserError, match="self-attention only"):
        patch(model, plan_blocks(grids, 0.5, "mean", sublayers=("self", "mlp")), grids)


@pytest.mark.slow
def test_unet2d_static_export(tmp_path) -> None:
    model = unet2d(mid_attention=False)  # the mid-block's attention, unreduced: a fifth of the export's time
    make = step_inputs(model, 16)
    grids = token_grids(model, make(1, 0))
    patch(model, plan_blocks(grids, 0.5, "mlerp"), grids)
    result = export_denoiser(step(model), tmp_path / "step.onnx", make, input_names(model), opset=17)
    assert result.parity.ok and result.tensorrt.ok and result.tensorrt.build_for == list(trt_targets_for(17))
    assert result.op_counts.get("TopK", 0) >= 3 and "Resize" not in result.op_counts

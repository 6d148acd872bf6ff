"""Patching timm ViTs: eager vs static, fused attention, prefix tokens, gradients, the patch/unpatch life cycle."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import timm
import torch
import torchvision
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from tofu_export import ScheduleError, UnsupportedModelError, is_patched, patch, token_schedule, unpatch
from tofu_export.models.timm_vit import tofu_state

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:r=.*is more than block"),
]

MODES = ["tofu", "tome", "prune", "mlerp"]
MERGING_MODES = ["tofu", "tome", "mlerp"]

# name -> (timm kwargs, r): depth-reduced, small inputs; every block removes tokens.
MODELS: dict[str, tuple[str, dict[str, Any], int]] = {
    "deit_tiny": ("deit_tiny_patch16_224", {"depth": 4, "img_size": 64}, 3),
    "deit_small": ("deit_small_patch16_224", {"depth": 4, "img_size": 64}, 3),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", {"depth": 4, "img_size": 64}, 3),
    "vit_base": ("vit_base_patch16_224", {"depth": 2, "img_size": 64}, 4),
    "mae_avg_pool": ("vit_base_patch16_224", {"depth": 2, "img_size": 64, "global_pool": "avg", "fc_norm": True}, 4),
    "avg_pool_no_cls": (
        "deit_tiny_patch16_224",
        {"depth": 4, "img_size": 64, "global_pool": "avg", "fc_norm": True, "class_token": False},
        3,
    ),
    "dinov2": ("vit_small_patch14_dinov2", {"depth": 4, "img_size": 56}, 3),
    "dinov2_reg4": ("vit_small_patch14_dinov2", {"depth": 4, "img_size": 56, "reg_tokens": 4}, 3),
    "qk_norm": ("deit_tiny_patch16_224", {"depth": 4, "img_size": 64, "qk_norm": True}, 3),
}

VitFactory = Callable[..., VisionTransformer]
ImageFactory = Callable[..., Tensor]


def _build(make_vit: VitFactory, key: str) -> tuple[VisionTransformer, int, int]:
    """The model named ``key`` in MODELS, its input size and its r."""
    name, kwargs, r = MODELS[key]
    return make_vit(name, **kwargs), kwargs["img_size"], r


@torch.no_grad()
def _run(model: nn.Module, images: Tensor) -> Tensor:
    return model(images)


def _set_fused_attn(model: VisionTransformer, fused: bool) -> None:
    for block in model.blocks:
        block.attn.fused_attn = fused


# --------------------------------------------------------------------------------------------------------------
# eager == static, fused attention and proportional attention
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", list(MODELS))
def test_static_path_equals_eager_path(make_vit: VitFactory, make_images: ImageFactory, key: str, mode: str) -> None:
    model, img_size, r = _build(make_vit, key)
    images = make_images(3, img_size)
    original = _run(model, images)
    eager = _run(patch(model, r=r, mode=mode), images)
    static = _run(patch(model, r=r, mode=mode, img_size=img_size), images)
    assert token_schedule(model).tokens[-1] < token_schedule(model).tokens[0]
    assert (eager - original).abs().max() > 1e-4, "the reduction had no effect on the output"
    torch.testing.assert_close(static, eager, rtol=0, atol=1e-5)


def test_keys_are_averaged_over_heads_after_qk_norm(make_vit: VitFactory) -> None:
    """The metric is the mean over heads of the keys the attention uses: after ``k_norm`` when the model has one."""
    model, _, r = _build(make_vit, "qk_norm")
    patch(model, r=r)
    block = model.blocks[0]
    assert isinstance(block.attn.k_norm, nn.LayerNorm) and len(block.attn.k_norm._forward_hooks) == 1
    keys = torch.randn(2, block.attn.num_heads, 17, block.attn.head_dim)  # [B, H, N, D]
    block.attn.k_norm(keys)
    torch.testing.assert_close(block.reduce.metric, block.attn.k_norm(keys).mean(dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", ["deit_tiny", "dinov2_reg4"])
def test_proportional_attention_applies_with_fused_and_unfused_attention(
    make_vit: VitFactory, make_images: ImageFactory, key: str, mode: str, static: bool
) -> None:
    model, img_size, r = _build(make_vit, key)
    images = make_images(2, img_size)
    outputs = {}
    for prop_attn in (True, False):
        patch(model, r=r, mode=mode, prop_attn=prop_attn, img_size=img_size if static else None)
        for fused in (True, False):
            _set_fused_attn(model, fused)
            outputs[prop_attn, fused] = _run(model, images)
    torch.testing.assert_close(outputs[True, True], outputs[True, False], rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs[False, True], outputs[False, False], rtol=0, atol=1e-5)
    difference = (outputs[True, True] - outputs[False, True]).abs().max()
    if mode == "prune":  # pruning never merges, so every size stays 1 and log(size) is 0
        assert difference == 0
    else:
        assert difference > 1e-4


def test_average_pool_weights_tokens_by_size(make_vit: VitFactory, make_images: ImageFactory) -> None:
    model, img_size, r = _build(make_vit, "avg_pool_no_cls")
    images = make_images(2, img_size)
    patch(model, r=r, mode="tome")
    with torch.no_grad():
        tokens = model.forward_features(images)  # [B, N', C]
        size = tofu_state(model).size  # [B, N', 1]
        logits = model.forward_head(tokens)
        weighted = model.head(model.fc_norm((tokens * size).sum(dim=1) / size.sum(dim=1)))
        plain = model.head(model.fc_norm(tokens.mean(dim=1)))
    assert size.sum(dim=1).eq(token_schedule(model).tokens[0]).all()
    torch.testing.assert_close(logits, weighted, rtol=0, atol=1e-5)
    assert (logits - plain).abs().max() > 1e-4


@pytest.mark.parametrize("fused", [True, False])
def test_attention_pool_head_counts_each_token_size_times(make_vit: VitFactory, fused: bool) -> None:
    """A MAP head (SigLIP's attention pool) over tokens of sizes ``s`` computes what it computes over ``s`` copies
    of each token: proportional attention in the pool's softmax. The class token is not pooled."""
    model = make_vit("test_vit3", depth=1, img_size=32)  # global_pool="map", one class token
    model.attn_pool.fused_attn = fused
    patch(model, r=1, mode="tome")
    tokens = torch.randn(2, 6, model.embed_dim, generator=torch.Generator().manual_seed(3))  # [B, 1 + 5, C]
    sizes = torch.tensor([1, 3, 1, 2, 1, 4])  # the class token's first
    state = tofu_state(model)
    with torch.no_grad():
        state.size = sizes.view(1, -1, 1).expand(2, -1, -1).float()  # [B, N, 1]
        weighted = model.pool(tokens)
        state.size = None  # nothing merged: timm's own pooling
        copies = model.pool(tokens.repeat_interleave(sizes, dim=1))  # [B, 12, C] -> pooled
        unweighted = model.pool(tokens)
    torch.testing.assert_close(weighted, copies, rtol=0, atol=1e-5)
    assert (weighted - unweighted).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------
# prefix tokens, token counts and pruning inside a real model
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def _record_reductions(model: VisionTransformer) -> Iterator[list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]]]:
    """Collect ``(x_in, size_in, x_out, size_out)`` of every block's ``reduce`` module during the forwards inside."""
    records: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]] = []

    def hook(module: nn.Module, args: tuple, output: tuple) -> None:
        records.append((args[0], args[1], output[0], output[1]))

    handles = [block.reduce.register_forward_hook(hook) for block in model.blocks]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", ["dinov2_reg4", "deit_tiny_distilled"])
def test_prefix_tokens_survive_every_block_at_the_front(
    make_vit: VitFactory, make_images: ImageFactory, key: str, mode: str, static: bool
) -> None:
    model, img_size, r = _build(make_vit, key)
    num_prefix = model.num_prefix_tokens
    assert num_prefix == (5 if key == "dinov2_reg4" else 2)
    patch(model, r=r, mode=mode, img_size=img_size if static else None)
    with _record_reductions(model) as records:
        _run(model, make_images(2, img_size))

    assert [x_in.shape[1] for x_in, *_ in records] == token_schedule(model).tokens
    for block, (x_in, _, x_out, _) in enumerate(records):
        assert x_out.shape[1] == x_in.shape[1] - token_schedule(model).r[block]
        prefix_in, prefix_out = x_in[:, :num_prefix], x_out[:, :num_prefix]
        if static and mode != "prune":  # the static merge recomputes every row (x * 1 / 1, rescaled to its norm)
            torch.testing.assert_close(prefix_out, prefix_in, rtol=1e-6, atol=0)
        else:
            assert torch.equal(prefix_out, prefix_in), f"block {block}"


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_prune_mode_drops_r_tokens_and_keeps_bit_identical_survivors(
    make_vit: VitFactory, make_images: ImageFactory, static: bool
) -> None:
    model, img_size, r = _build(make_vit, "dinov2_reg4")
    patch(model, r=r, mode="prune", img_size=img_size if static else None)
    with _record_reductions(model) as records:
        _run(model, make_images(2, img_size))
    assert len(records) == len(model.blocks)
    for x_in, size_in, x_out, size_out in records:
        assert size_in is None and size_out is None  # pruning never creates sizes
        assert x_out.shape[1] == x_in.shape[1] - r
        for sample in range(x_in.shape[0]):
            # every survivor is an exact copy of a distinct input token
            matches = (x_out[sample, :, None] == x_in[sample, None]).all(dim=-1)  # [N - r, N]
            assert matches.any(dim=1).all()
            assert matches.float().argmax(dim=1).unique().numel() == x_out.shape[1]


# --------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_every_block_weight_through_the_reductions(
    make_vit: VitFactory, make_images: ImageFactory, mode: str, static: bool
) -> None:
    model = make_vit("deit_tiny_patch16_224", depth=3, img_size=64).train()
    patch(model, r=4, mode=mode, img_size=64 if static else None)
    logits = model(make_images(2, 64))
    assert token_schedule(model).tokens == [17, 13, 9]
    torch.nn.functional.cross_entropy(logits, torch.tensor([3, 7])).backward()
    params = [*model.patch_embed.named_parameters(prefix="patch_embed"), *model.blocks.named_parameters("blocks")]
    assert params and all(p.requires_grad for _, p in params)
    no_grad = [name for name, p in params if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


# --------------------------------------------------------------------------------------------------------------
# life cycle: r = 0, unpatch, re-patch, unsupported models, wrong input sizes, strict schedules
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("img_size", [None, 56], ids=["eager", "static"])
@pytest.mark.parametrize("mode", MODES)
def test_r0_patched_model_equals_the_original_exactly(
    make_vit: VitFactory, make_images: ImageFactory, mode: str, img_size: int | None
) -> None:
    model, _, _ = _build(make_vit, "dinov2_reg4")
    images = make_images(2, 56)
    original = _run(model, images)
    assert torch.equal(_run(patch(model, r=0, mode=mode, img_size=img_size), images), original)


def _assert_plain_timm(model: VisionTransformer) -> None:
    assert not is_patched(model)
    assert "pool" not in vars(model)
    for block in model.blocks:
        assert type(block) is Block
        assert not block.attn.k_norm._forward_hooks
        assert "reduce" not in dict(block.named_children())
        assert not any(name.startswith("_tofu") for name in vars(block))


@pytest.mark.parametrize("key", ["deit_tiny", "avg_pool_no_cls"])
def test_unpatch_restores_outputs_and_leaves_nothing_behind(
    make_vit: VitFactory, make_images: ImageFactory, key: str
) -> None:
    model, img_size, r = _build(make_vit, key)
    images = make_images(2, img_size)
    original = _run(model, images)
    for img in (None, img_size):
        patch(model, r=r, mode="tofu", img_size=img)
        assert is_patched(model)
        assert all(len(block.attn.k_norm._forward_hooks) == 1 for block in model.blocks)
        assert not torch.allclose(_run(model, images), original)
        assert unpatch(model) is model
        _assert_plain_timm(model)
        assert torch.equal(_run(model, images), original)
    assert unpatch(model) is model  # unpatching a plain model is a no-op


def test_patching_twice_replaces_the_settings(make_vit: VitFactory, make_images: ImageFactory) -> None:
    model, img_size, _ = _build(make_vit, "deit_tiny")
    reference = copy.deepcopy(model)
    images = make_images(2, img_size)
    patch(model, r=2, mode="prune", prop_attn=False, img_size=img_size)
    patch(model, r=4, mode="mlerp")
    patch(reference, r=4, mode="mlerp")
    assert all(len(block.attn.k_norm._forward_hooks) == 1 for block in model.blocks)
    assert token_schedule(model).r == [4, 4, 4, 2] and token_schedule(model).modes == ["mlerp"] * 4
    assert tofu_state(model).plan is None and tofu_state(model).prop_attn
    assert torch.equal(_run(model, images), _run(reference, images))


@pytest.mark.parametrize(
    "build",
    [
        lambda: timm.create_model("resnet18", pretrained=False),
        lambda: torchvision.models.resnet18(weights=None),
    ],
    ids=["timm-resnet18", "torchvision-resnet18"],
)
def test_non_vit_models_are_rejected(build: Callable[[], nn.Module]) -> None:
    model = build()
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        patch(model, r=4)
    assert not is_patched(model)


def test_static_model_rejects_another_input_size(make_vit: VitFactory, make_images: ImageFactory) -> None:
    model = make_vit("deit_tiny_patch16_224", depth=2, img_size=64, dynamic_img_size=True)
    patch(model, r=4, mode="tofu", img_size=64)
    assert _run(model, make_images(1, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match=r"block 0 expected 17 tokens .*\(64, 64\).* got 5"):
        _run(model, make_images(1, 32))
    patch(model, r=4, mode="tofu")  # eager: any size
    assert _run(model, make_images(1, 32)).shape == (1, 1000)


def test_static_patch_for_a_size_the_model_cannot_take_is_rejected(make_vit: VitFactory) -> None:
    model = make_vit("deit_tiny_patch16_224", depth=2, img_size=64)
    with pytest.raises(ValueError, match=r"built for \(64, 64\) inputs"):
        patch(model, r=4, img_size=96)
    assert not is_patched(model)


@pytest.mark.parametrize("img_size", [None, 64], ids=["eager", "static"])
def test_strict_schedule_error_names_the_block(make_vit: VitFactory, img_size: int | None) -> None:
    model = make_vit("deit_tiny_patch16_224", depth=4, img_size=64)  # 17 -> 12 -> 7: block 2 can remove only 3
    with pytest.raises(ScheduleError, match=r"r=5 is more than block 2 can remove"):
        patch(model, r=5, img_size=img_size, strict=True)
    assert not is_patched(model)
    if img_size is None:  # the eager path clips at run time, for whatever input size comes
        patch(model, r=5)
    else:
        with pytest.warns(UserWarning, match="block 2"):
            patch(model, r=5, img_size=img_size)
    assert token_schedule(model).r == [5, 5, 3, 1]

"""r schedules, per-block modes, token plans, and the token/FLOP accounting of a patched ViT."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from tofu_export import (
    MODES,
    ScheduleError,
    ToFuConfig,
    decreasing_schedule,
    layer_modes,
    parse_r,
    patch,
    token_schedule,
    unpatch,
)
from tofu_export.models.timm_vit import tofu_state
from tofu_export.schedule import DEFAULT_PRUNE_LAYERS, block_macs, max_reduction, plan_tokens

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------------------------
# parse_r / decreasing_schedule
# --------------------------------------------------------------------------------------------------------------


def test_int_r_is_constant_per_block() -> None:
    assert parse_r(7, 12) == [7] * 12
    assert parse_r(0, 3) == [0, 0, 0]


def test_list_r_is_taken_as_given() -> None:
    assert parse_r([3, 2, 1, 0], 4) == [3, 2, 1, 0]
    assert parse_r(range(4), 4) == [0, 1, 2, 3]


@pytest.mark.parametrize(("r", "depth"), [(8, 12), (16, 12), (5, 4), (13, 24), (1, 7)])
def test_decreasing_schedule_removes_about_r_times_depth(r: int, depth: int) -> None:
    schedule = decreasing_schedule(r, depth)
    assert schedule == parse_r((r, -1.0), depth)
    assert len(schedule) == depth
    assert schedule[0] == 2 * r and schedule[-1] == 0
    assert all(b <= a for a, b in itertools.pairwise(schedule))
    assert abs(sum(schedule) - r * depth) <= depth  # int truncation loses under one token per block


@pytest.mark.parametrize("inflection", [-1.0, -0.5, 0.0, 0.5, 1.0])
def test_inflected_schedules_keep_the_total(inflection: float) -> None:
    schedule = parse_r((10, inflection), 12)
    assert abs(sum(schedule) - 120) <= 12
    if inflection == 0.0:
        assert schedule == [10] * 12
    elif inflection < 0:
        assert all(b <= a for a, b in itertools.pairwise(schedule))
    else:
        assert all(b >= a for a, b in itertools.pairwise(schedule))


@pytest.mark.parametrize(
    ("r", "message"),
    [
        (True, "not a bool"),
        ([1, 2, 3], "one value per block: got 3 values for 4 blocks"),
        ([1, -1, 0, 0], "r must be >= 0"),
        (-2, "r must be >= 0"),
        ((8, 1.5), r"inflection must lie in \[-1, 1\]"),
    ],
)
def test_bad_r_is_rejected(r: Any, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        parse_r(r, 4)


def test_schedule_error_is_a_value_error() -> None:
    assert issubclass(ScheduleError, ValueError)


# --------------------------------------------------------------------------------------------------------------
# layer_modes
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [4, 12, 24])
def test_tofu_merges_with_mlerp_everywhere_by_default(depth: int) -> None:
    """The measured default (issue 11): no pruning without data; prune_layers is the explicit speed knob."""
    assert DEFAULT_PRUNE_LAYERS == 0
    assert layer_modes("tofu", depth) == ["mlerp"] * depth
    assert layer_modes("tofu", depth, prune_layers=2) == ["prune"] * 2 + ["mlerp"] * (depth - 2)


def test_tofu_prune_layers_override() -> None:
    assert layer_modes("tofu", 12, prune_layers=5) == ["prune"] * 5 + ["mlerp"] * 7
    assert layer_modes("tofu", 6, prune_layers=0) == ["mlerp"] * 6
    assert layer_modes("tofu", 6, prune_layers=6) == ["prune"] * 6
    with pytest.raises(ScheduleError, match=r"prune_layers must lie in \[0, 6\]"):
        layer_modes("tofu", 6, prune_layers=7)


@pytest.mark.parametrize(("mode", "reduce_mode"), [("tome", "mean"), ("prune", "prune"), ("mlerp", "mlerp")])
def test_uniform_modes(mode: str, reduce_mode: str) -> None:
    assert mode in MODES
    assert layer_modes(mode, 5) == [reduce_mode] * 5


def test_per_block_mode_list() -> None:
    assert layer_modes(["prune", "tome", "mlerp", "mean"], 4) == ["prune", "mean", "mlerp", "mean"]
    with pytest.raises(ScheduleError, match="needs 4 entries"):
        layer_modes(["prune", "mlerp"], 4)
    with pytest.raises(ScheduleError, match="needs 2 entries"):
        layer_modes(["prune", "median"], 2)


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ScheduleError, match="unknown mode 'fuse'"):
        layer_modes("fuse", 12)


# --------------------------------------------------------------------------------------------------------------
# plan_tokens and block_macs
# --------------------------------------------------------------------------------------------------------------


def test_plan_without_clipping() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_tokens(197, 1, [15] * 12)
    assert plan.tokens == [197 - 15 * i for i in range(12)]
    assert plan.r == plan.requested == [15] * 12
    assert plan.clipped == []
    assert plan.final_tokens == 197 - 15 * 12


def test_plan_clips_late_blocks_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"block 2 can remove.*blocks \[2, 3\] were clipped"):
        plan = plan_tokens(17, 1, [5, 5, 5, 5])
    assert plan.tokens == [17, 12, 7, 4]
    assert plan.r == [5, 5, 3, 1]
    assert plan.clipped == [2, 3]
    for n, r in zip(plan.tokens, plan.r, strict=True):
        assert r <= max_reduction(n, 1)
    assert all(b == a - r for (a, b), r in zip(itertools.pairwise(plan.tokens), plan.r, strict=False))


@pytest.mark.parametrize("call", ["plan_tokens", "patch", "patch static", "ToFuConfig"])
def test_a_clipping_warning_names_the_callers_line(make_vit: Callable[..., VisionTransformer], call: str) -> None:
    """However deep inside tofu_export the plan is made, the warning points at the user's own call."""
    model = make_vit("deit_tiny_patch16_224", depth=4, img_size=32)  # 5 tokens, 1 protected: at most 2 a block
    with pytest.warns(UserWarning, match="were clipped") as caught:
        if call == "plan_tokens":
            plan_tokens(5, 1, [2] * 4)
        elif call == "ToFuConfig":
            ToFuConfig(r=2, img_size=32).patch(model)
        else:
            patch(model, r=2, img_size=32 if call == "patch static" else None)
    assert [w.filename for w in caught] == [__file__]


def test_plan_clipping_raises_when_strict() -> None:
    with pytest.raises(ScheduleError, match=r"block 2 can remove.*receives 7 tokens"):
        plan_tokens(17, 1, [5, 5, 5, 5], strict=True)


def test_prefix_tokens_limit_the_reduction() -> None:
    assert max_reduction(21, 5) == 8
    assert max_reduction(5, 5) == 0
    with pytest.warns(UserWarning, match="5 protected"):
        plan = plan_tokens(21, 5, [8, 8])
    assert plan.tokens == [21, 13] and plan.r == [8, 4]


def test_block_macs_counts_linear_layers_attention_and_matching() -> None:
    dim, hidden = 384, 1536
    plain = block_macs(197, 0, dim, hidden, num_prefix=1, metric_dim=64)
    assert plain == 4 * 197 * dim * dim + 2 * 197 * 197 * dim + 2 * 197 * dim * hidden
    reduced = block_macs(197, 16, dim, hidden, num_prefix=1, metric_dim=64)
    assert reduced == plain - 2 * 16 * dim * hidden + 98 * 98 * 64
    assert reduced < plain


# --------------------------------------------------------------------------------------------------------------
# token_schedule on real models
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deit_small(make_vit: Callable[..., VisionTransformer]) -> VisionTransformer:
    return make_vit("deit_small_patch16_224")


@pytest.mark.filterwarnings("ignore:r=16 is more than block 11")
@pytest.mark.parametrize("img_size", [None, 224], ids=["eager", "static"])
def test_deit_small_gflops_match_the_published_count(deit_small: VisionTransformer, img_size: int | None) -> None:
    unpatch(deit_small)
    plain = token_schedule(deit_small)
    assert plain.tokens == [197] * 12 and plain.r == [0] * 12 and plain.modes == ["none"] * 12
    assert abs(plain.gflops_original - 4.6) / 4.6 < 0.03  # DeiT paper: 4.6 GFLOPs
    assert plain.gflops_reduced == plain.gflops_original

    patch(deit_small, r=16, img_size=img_size)
    reduced = token_schedule(deit_small)
    assert reduced.img_size == (224, 224)
    assert reduced.r == [16] * 11 + [10]  # block 11 receives 21 tokens: one matching step removes at most 10
    assert reduced.modes == layer_modes("tofu", 12)
    assert all(reduced.tokens[i + 1] == reduced.tokens[i] - reduced.r[i] for i in range(11))
    assert reduced.gflops_original == pytest.approx(plain.gflops_original)
    assert reduced.gflops_reduced < 0.6 * plain.gflops_original  # ToMe reports ~2.0-2.7 GFLOPs at r=16
    assert reduced.flop_ratio == pytest.approx(reduced.gflops_original / reduced.gflops_reduced)
    assert reduced.to_dict()["flop_ratio"] == reduced.flop_ratio
    unpatch(deit_small)


@pytest.mark.filterwarnings("ignore:r=5 is more than block 1")
def test_token_schedule_counts_the_tokens_blocks_really_see(
    make_vit: Callable[..., VisionTransformer], make_images: Callable[..., torch.Tensor]
) -> None:
    model = make_vit("deit_tiny_distilled_patch16_224", depth=4, img_size=64)
    seen: list[int] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    patch(model, r=(4, -1.0), mode="tome")
    assert tofu_state(model).r == [8, 5, 2, 0]
    with torch.no_grad():
        model(make_images(1, 64))
    schedule = token_schedule(model)
    assert schedule.r == [8, 4, 2, 0]  # asked [8, 5, 2, 0]; 10 tokens with 2 protected allow 4
    assert seen == schedule.tokens == [18, 10, 6, 4]


def test_token_schedule_for_another_input_size(make_vit: Callable[..., VisionTransformer]) -> None:
    model = make_vit("deit_tiny_patch16_224", depth=2, img_size=64, dynamic_img_size=True)
    patch(model, r=2)
    assert token_schedule(model).tokens == [17, 15]
    assert token_schedule(model, img_size=96).tokens == [37, 35]
    assert token_schedule(model, img_size=96).img_size == (96, 96)

"""The latency bench's bound (``bench/latency_deit_small.py``): every block keeps its first N - r tokens at no cost,
and a rotary model's blocks still carry as many tokens' rotations as they keep (what every method pays too); and its
sizes floor: tokens pruned, sizes counted as a merge counts them; and the batch its profile feeds."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import timm
import torch

from tofu_export import merge
from tofu_export.models.family import patch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "latency_deit_small.py"


def _load_bench() -> ModuleType:
    """``bench/latency_deit_small.py`` as a module."""
    spec = importlib.util.spec_from_file_location("latency_bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "deit_tiny_patch16_224"])
def test_the_bound_keeps_n_minus_r_tokens_and_their_rotations(name: str) -> None:
    bench = _load_bench()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=2, img_size=64, embed_dim=64, num_heads=2).eval()
    patch(model, r=4, mode="prune", img_size=64)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    seen: list[int] = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    rotary = getattr(model, "rope", None) is not None
    with torch.no_grad(), bench._free_reduction(rotations=rotary):
        model(torch.randn(3, 3, 64, 64))
    assert seen == [tokens - 4]  # block 0 kept its first N - r tokens
    rope = model._tofu.rope  # the last block's kept rotations: [B, 1, N - 2r - p, D], or none without rotations
    assert (tuple(rope.shape[:3]) == (3, 1, tokens - 8 - model.num_prefix_tokens)) if rotary else rope is None


@pytest.mark.parametrize("with_sizes", [False, True])
def test_the_sizes_floor_prunes_tokens_but_counts_sizes_as_a_merge_does(with_sizes: bool) -> None:
    bench = _load_bench()
    torch.manual_seed(0)
    x, metric = torch.randn(2, 17, 8), torch.randn(2, 17, 4)
    size = torch.randint(1, 4, (2, 17, 1)).float() if with_sizes else None
    matching = merge.bipartite_soft_matching(metric, 5, 1)
    pruned, _ = merge.reduce_tokens(x, size, matching, "prune", 1, static=True)
    _, merged_size = merge.reduce_tokens(x, size, matching, "mean", 1, static=True)
    with bench._sizes_only_fold():
        tokens, sizes = merge.reduce_tokens(x, size, matching, "mean", 1, static=True)
    assert torch.equal(tokens, pruned) and torch.equal(sizes, merged_size)
    assert merged_size.sum() == (2 * 17 if size is None else size.sum())  # nothing counted twice or lost
    merged, _ = merge.reduce_tokens(x, size, matching, "mean", 1, static=True)  # the fold is itself again after
    assert not torch.equal(merged, pruned)


def test_the_profiled_feed_has_the_batch_asked_for() -> None:
    bench = _load_bench()
    session = SimpleNamespace(get_inputs=lambda: [SimpleNamespace(name="pixels", shape=["batch", 3, 8, 8])])
    noise = bench.feed(session, None, 0, batch=3)["pixels"]
    assert noise.shape == (3, 3, 8, 8) and not np.array_equal(noise[0], noise[1])  # three different noise images
    image = np.arange(3 * 8 * 8, dtype=np.float32).reshape(1, 3, 8, 8)
    repeated = bench.feed(session, image, 0, batch=2)["pixels"]
    assert repeated.shape == (2, 3, 8, 8) and all(np.array_equal(one, image[0]) for one in repeated)
    assert bench.feed(session, None, 0)["pixels"].shape == (1, 3, 8, 8)  # batch 1 unless asked

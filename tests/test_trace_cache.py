"""The session trace cache's key (``tests/trace_cache.py``): equal for the same model built twice, different for
anything that changes the traced graph."""

from __future__ import annotations

import torch
from trace_cache import trace_key

from tofu_export.models.family import patch

EXAMPLE = torch.zeros(1, 3, 64, 64)


def _key(model, *settings) -> str:
    return trace_key(model, EXAMPLE, *(settings or (17, "input", "output")))


def test_the_same_model_built_twice_has_one_key(make_vit) -> None:
    first = patch(make_vit("deit_tiny_patch16_224", depth=2, img_size=64), r=2, img_size=64)
    second = patch(make_vit("deit_tiny_patch16_224", depth=2, img_size=64), r=2, img_size=64)
    assert _key(first) == _key(second)


def test_what_changes_the_graph_changes_the_key(make_vit) -> None:
    def build(**kwargs):
        return make_vit("deit_tiny_patch16_224", depth=2, img_size=64, **kwargs)

    base = _key(patch(build(), r=2, img_size=64))
    other_heads = build()
    for block in other_heads.blocks:
        block.attn.num_heads, block.attn.head_dim = 6, 32  # same weights, another head split
    patch(other_heads, r=2, img_size=64)
    other_weights = build()
    with torch.no_grad():
        other_weights.head.bias[0] += 1
    patch(other_weights, r=2, img_size=64)
    keys = {
        "heads": _key(other_heads),
        "weights": _key(other_weights),
        "unpatched": _key(build()),
        "r": _key(patch(build(), r=1, img_size=64)),
        "mode": _key(patch(build(), r=2, mode="tome", img_size=64)),
        "prop_attn": _key(patch(build(), r=2, prop_attn=False, img_size=64)),
        "opset": _key(patch(build(), r=2, img_size=64), 16, "input", "output"),
        "seed": _key(patch(make_vit("deit_tiny_patch16_224", seed=1, depth=2, img_size=64), r=2, img_size=64)),
    }
    assert base not in keys.values() and len(set(keys.values())) == len(keys), keys

"""The merge algorithm: mode "tome" against an independent ToMe reference, MLERP, prune, eager vs static combine."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from tofu_export import parse_r, patch
from tofu_export.merge import Matching, bipartite_soft_matching, kept_patch_rows, reduce_tokens
from tofu_export.schedule import max_reduction

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"depth": 4, "img_size": 64}  # 16 patches + prefix tokens entering block 0


@contextlib.contextmanager
def _clipping_warned(expected: bool, match: str) -> Iterator[None]:
    """``pytest.warns`` for a patch whose r a block cannot remove, and a check that nothing warns otherwise."""
    if expected:
        with pytest.warns(UserWarning, match=match):
            yield
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (catch_warnings' own ``action`` needs Python 3.11)
            yield


# --------------------------------------------------------------------------------------------------------------
# An independent ToMe reference (Bolya et al., timm patch), one sample at a time, explicit loops.
# --------------------------------------------------------------------------------------------------------------


def _reference_attention(block: Block, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Block's attention branch with proportional attention, one head at a time, for ``x [N, C]``, ``size [N]``.

    Returns the branch output ``[N, C]`` and ToMe's metric, the keys averaged over heads ``[N, head_dim]``.
    """
    attn = block.attn
    assert all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm)), "reference: plain attn"
    n = x.shape[0]
    qkv = attn.qkv(block.norm1(x)).reshape(n, 3, attn.num_heads, attn.head_dim)
    heads = []
    for h in range(attn.num_heads):
        q, k, v = qkv[:, 0, h], qkv[:, 1, h], qkv[:, 2, h]  # [N, D]
        logits = (q * attn.scale) @ k.T + size.log()[None, :]  # [N, N]: key j counts size[j] times
        heads.append(logits.softmax(dim=-1) @ v)
    return attn.proj(torch.cat(heads, dim=-1)), qkv[:, 1].mean(dim=1)


def _reference_merge(x: Tensor, size: Tensor, metric: Tensor, r: int, distilled: bool) -> tuple[Tensor, Tensor]:
    """ToMe's bipartite soft matching + size-weighted average for one sample ``x [N, C]``, ``size [N]``.

    A = even positions, B = odd positions; the class token (A's first) may not be merged away and the distillation
    token (B's first) may not receive anything. Output order: [cls, (dist), unmerged A in order, B].
    """
    n = x.shape[0]
    protected = 2 if distilled else 1
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return x, size
    unit = metric / metric.norm(dim=-1, keepdim=True)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    receivers = [j for j in b_pos if not (distilled and j == 1)]
    best: dict[int, tuple[float, int]] = {}
    for i in a_pos[1:]:  # the class token's row is -inf
        scores = [float(unit[i] @ unit[j]) for j in receivers]
        k = max(range(len(scores)), key=scores.__getitem__)
        best[i] = (scores[k], receivers[k])
    merged = sorted(best, key=lambda i: best[i][0], reverse=True)[:r]
    groups = {j: [j] for j in b_pos}
    for i in merged:
        groups[best[i][1]].append(i)
    prefix = [[0], [1]] if distilled else [[0]]
    unmerged = [[i] for i in a_pos[1:] if i not in merged]
    kept_b = [groups[j] for j in receivers]
    rows, sizes = [], []
    for group in prefix + unmerged + kept_b:
        weight = size[group]  # [G]
        rows.append((x[group] * weight[:, None]).sum(dim=0) / weight.sum())
        sizes.append(weight.sum())
    return torch.stack(rows), torch.stack(sizes)


@torch.no_grad()
def reference_tome(model: VisionTransformer, images: Tensor, r: list[int]) -> tuple[list[Tensor], Tensor]:
    """ToMe's timm forward on an *unpatched* model: final tokens per sample ``[N', C]`` and logits ``[B, classes]``."""
    distilled = hasattr(model, "dist_token") and model.dist_token is not None
    features, logits = [], []
    for sample in images.split(1):
        x = model.norm_pre(model._pos_embed(model.patch_embed(sample)))[0]  # [N, C]
        size = torch.ones(x.shape[0])
        for block, block_r in zip(model.blocks, r, strict=True):
            branch, metric = _reference_attention(block, x, size)
            x, size = _reference_merge(x + block.ls1(branch), size, metric, block_r, distilled)
            x = x + block.ls2(block.mlp(block.norm2(x)))
        x = model.norm(x)
        features.append(x)
        logits.append(model.forward_head(x[None]))
    return features, torch.cat(logits)


@pytest.mark.filterwarnings("ignore:r=.*is more than block")
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("r", [2, 5, 8, (4, -1.0)], ids=["r2", "r5", "r8-clipped", "decreasing"])
def test_tome_mode_matches_reference_tome(
    make_vit: Callable[..., VisionTransformer],
    make_images: Callable[..., Tensor],
    name: str,
    r: int | tuple[int, float],
) -> None:
    model = make_vit(name, **TINY)
    images = make_images(3, TINY["img_size"])
    ref_features, ref_logits = reference_tome(model, images, parse_r(r, len(model.blocks)))
    assert ref_features[0].shape[0] < model.patch_embed.num_patches, "the reference removed no tokens"

    for img_size in (None, TINY["img_size"]):  # eager, then static
        patched = patch(copy.deepcopy(model), r=r, mode="tome", img_size=img_size)
        with torch.no_grad():
            features = patched.forward_features(images)
            logits = patched(images)
        for got, want in zip(features, ref_features, strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)


def test_reference_is_sensitive_to_what_it_checks(
    make_vit: Callable[..., VisionTransformer], make_images: Callable[..., Tensor]
) -> None:
    """Guards the reference test against vacuity: dropping proportional attention or averaging differently shows."""
    model = make_vit("deit_tiny_patch16_224", **TINY)
    images = make_images(2, TINY["img_size"])
    _, ref_logits = reference_tome(model, images, [4] * 4)
    for kwargs in ({"mode": "tome", "prop_attn": False}, {"mode": "mlerp"}, {"mode": "tome", "r": 3}):
        kwargs = {"r": 4, **kwargs}
        with _clipping_warned(kwargs["r"] == 4, "block 3 can remove"):  # 5 tokens enter block 3: at most 2
            patched = patch(copy.deepcopy(model), **kwargs)
        with torch.no_grad():
            assert (patched(images) - ref_logits).abs().max() > 1e-4, kwargs


# --------------------------------------------------------------------------------------------------------------
# reduce_tokens on random tensors: groups of merged tokens derived from first principles.
# --------------------------------------------------------------------------------------------------------------


def _groups(matching: Matching, num_tokens: int, num_prefix: int, sample: int) -> list[list[int]]:
    """Input positions combined into each output row of one sample, in output order [prefix, unmerged A, B]."""
    a_pos = [k for k in range(num_prefix, num_tokens) if k % 2 == 0]
    b_pos = [k for k in range(num_prefix, num_tokens) if k % 2 == 1]
    src, dst = matching.src_idx[sample, :, 0].tolist(), matching.dst_idx[sample, :, 0].tolist()
    received = [[b] + [a_pos[s] for s, d in zip(src, dst, strict=True) if d == j] for j, b in enumerate(b_pos)]
    unmerged = [[a_pos[i]] for i in matching.unm_idx[sample, :, 0].tolist()]
    return [[k] for k in range(num_prefix)] + unmerged + received


def _duplicate_matching() -> Matching:
    """A hand-made matching on 11 tokens with 1 prefix (A = 2,4,6,8,10; B = 1,3,5,7,9) where B[1] gets two sources."""
    return Matching(
        unm_idx=torch.tensor([[1, 4], [0, 2]]).unsqueeze(-1),
        src_idx=torch.tensor([[0, 2, 3], [4, 1, 3]]).unsqueeze(-1),
        dst_idx=torch.tensor([[1, 1, 4], [0, 0, 0]]).unsqueeze(-1),
    )


def _random_tokens(batch: int, num_tokens: int, dim: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Tokens ``[B, N, C]`` with varied norms, and integer sizes ``[B, N, 1]`` in 1..4."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_tokens, dim, generator=generator)
    x = x * torch.rand(batch, num_tokens, 1, generator=generator).add(0.2) * 3
    size = torch.randint(1, 5, (batch, num_tokens, 1), generator=generator).float()
    return x, size


def _matchings() -> list[tuple[Matching, int]]:
    """The hand-made matching, and a real one on random keys (11 tokens, 1 prefix, r=4)."""
    metric = torch.randn(2, 11, 6, generator=torch.Generator().manual_seed(5))
    return [(_duplicate_matching(), 1), (bipartite_soft_matching(metric, 4, num_prefix=1), 1)]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("which", [0, 1], ids=["duplicates", "soft-matching"])
def test_mlerp_keeps_max_norm_and_mean_direction(static: bool, which: int) -> None:
    matching, num_prefix = _matchings()[which]
    x, size = _random_tokens(2, 11)
    out, out_size = reduce_tokens(x, size, matching, "mlerp", num_prefix, static=static)
    mean, _ = reduce_tokens(x, size, matching, "mean", num_prefix, static=static)
    assert out.shape == (2, 11 - matching.src_idx.shape[1], 8)

    merged_rows = 0
    for sample in range(2):
        for row, group in enumerate(_groups(matching, 11, num_prefix, sample)):
            tokens, weights = x[sample, group], size[sample, group]  # [G, C], [G, 1]
            got = out[sample, row]
            assert out_size[sample, row, 0] == weights.sum()
            if len(group) == 1:
                exact = torch.equal(got, tokens[0])
                assert exact or (static and torch.allclose(got, tokens[0], rtol=1e-6, atol=0)), (sample, row)
                continue
            merged_rows += 1
            weighted_mean = (tokens * weights).sum(dim=0) / weights.sum()
            max_norm = tokens.norm(dim=-1).max()
            torch.testing.assert_close(got.norm(), max_norm, rtol=1e-6, atol=0)
            cosine = torch.nn.functional.cosine_similarity(got, weighted_mean, dim=0)
            assert cosine > 1 - 1e-6
            # Plain averaging of non-parallel tokens shrinks the norm; MLERP is there to undo exactly that.
            torch.testing.assert_close(mean[sample, row], weighted_mean, rtol=0, atol=1e-6)
            assert mean[sample, row].norm() < max_norm - 1e-3
    assert merged_rows >= 2


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("with_size", [False, True], ids=["no-size", "size"])
def test_prune_drops_sources_and_copies_survivors_bit_exactly(static: bool, with_size: bool) -> None:
    for matching, num_prefix in _matchings():
        x, size = _random_tokens(2, 11)
        r = matching.src_idx.shape[1]
        out, out_size = reduce_tokens(x, size if with_size else None, matching, "prune", num_prefix, static=static)
        assert out.shape == (2, 11 - r, 8)
        assert (out_size is None) == (not with_size)
        for sample in range(2):
            survivors = [group[0] for group in _groups(matching, 11, num_prefix, sample)]
            dropped = set(range(11)) - set(survivors)
            assert len(dropped) == r and len(set(survivors)) == 11 - r
            assert torch.equal(out[sample], x[sample, survivors])
            if with_size:
                assert torch.equal(out_size[sample], size[sample, survivors])


@pytest.mark.parametrize("mode", ["mean", "prune", "mlerp"])
@pytest.mark.parametrize(("num_tokens", "num_prefix"), [(10, 0), (11, 0), (17, 1), (18, 2), (21, 5), (12, 3)])
def test_static_combine_equals_eager_scatter(mode: str, num_tokens: int, num_prefix: int) -> None:
    x, size = _random_tokens(3, num_tokens, seed=num_tokens)
    metric = torch.randn(3, num_tokens, 4, generator=torch.Generator().manual_seed(num_prefix))
    for r in sorted({1, max_reduction(num_tokens, num_prefix) // 2, max_reduction(num_tokens, num_prefix)}):
        matching = bipartite_soft_matching(metric, r, num_prefix)
        for sizes in (None, size):
            eager = reduce_tokens(x, sizes, matching, mode, num_prefix, static=False)
            static = reduce_tokens(x, sizes, matching, mode, num_prefix, static=True)
            assert eager[0].shape == static[0].shape == (3, num_tokens - r, 8)
            torch.testing.assert_close(static[0], eager[0], rtol=0, atol=1e-6)
            if eager[1] is None or static[1] is None:
                assert mode == "prune" and sizes is None and eager[1] is static[1] is None
            else:
                assert torch.equal(static[1], eager[1])


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])
def test_bipartite_matching_picks_the_best_scored_a_tokens(num_prefix: int) -> None:
    num_tokens = 19
    metric = torch.randn(2, num_tokens, 6, generator=torch.Generator().manual_seed(num_prefix), requires_grad=True)
    r = 4
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        matching = bipartite_soft_matching(metric, r, num_prefix)
    assert saved == [], "the matching recorded an autograd graph; its metric must be detached"
    unit = (metric / metric.norm(dim=-1, keepdim=True)).detach()
    a_pos = [k for k in range(num_prefix, num_tokens) if k % 2 == 0]
    b_pos = [k for k in range(num_prefix, num_tokens) if k % 2 == 1]
    for sample in range(2):
        scores = unit[sample, a_pos] @ unit[sample, b_pos].T  # [Na, Nb]
        best, target = scores.max(dim=-1)
        assert matching.src_idx.shape == matching.dst_idx.shape == (2, r, 1)
        chosen = matching.src_idx[sample, :, 0].tolist()
        assert sorted(chosen) == sorted(best.argsort(descending=True)[:r].tolist())
        assert matching.dst_idx[sample, :, 0].tolist() == target[chosen].tolist()
        unmerged = matching.unm_idx[sample, :, 0].tolist()
        assert sorted(unmerged + chosen) == list(range(len(a_pos)))
        if num_prefix > 0:  # ToMe keeps unmerged tokens in their original order when a class token is present
            assert unmerged == sorted(unmerged)


@pytest.mark.parametrize("num_prefix", [0, 1, 5])
def test_kept_patch_rows_point_at_each_kept_token_in_a_shared_or_per_sample_table(num_prefix: int) -> None:
    """A rotary model's rotations follow the tokens by these rows: a kept token's own, a merged token's
    destination's, read off the positions the reduction itself keeps."""
    batch, num_tokens, r = 3, 20, 4
    metric = torch.randn(batch, num_tokens, 6, generator=torch.Generator().manual_seed(num_prefix))
    matching = bipartite_soft_matching(metric, r, num_prefix)
    positions = torch.arange(num_tokens, dtype=torch.float32).view(1, -1, 1).expand(batch, -1, 1)
    kept, _ = reduce_tokens(positions, None, matching, "prune", num_prefix)  # a destination keeps its position
    expected = kept[:, num_prefix:, 0].long() - num_prefix  # [B, N - r - p]: each kept patch token's row
    assert torch.equal(kept_patch_rows(matching, num_tokens, num_prefix, None, shared=True), expected)
    per_sample = kept_patch_rows(matching, num_tokens, num_prefix, None, shared=False)
    assert torch.equal(per_sample, expected + torch.arange(batch).view(-1, 1) * (num_tokens - num_prefix))


def test_exported_matching_has_no_grad_mode_subgraph() -> None:
    """Without gradient by detaching, not by switching grad mode: ``torch.export`` captures a ``no_grad`` block as a
    grad-mode subgraph (``wrap_with_set_grad_enabled``); with it a ToFu ViT's whole export took 2-13% longer."""

    class Match(nn.Module):
        def forward(self, metric: Tensor) -> Tensor:
            matching = bipartite_soft_matching(metric, 3, 1)
            return torch.cat([matching.unm_idx, matching.src_idx, matching.dst_idx], dim=1)

    metric = torch.randn(2, 11, 8)
    program = torch.export.export(Match(), (metric,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if "grad" in t or "higher_order" in t], targets
    assert any("topk" in t for t in targets)  # the matching was traced, at the top level
    torch.testing.assert_close(program.module()(metric), Match()(metric), rtol=0, atol=0)


@pytest.mark.parametrize(("num_tokens", "num_prefix"), [(17, 1), (18, 2), (9, 5), (6, 0)])
@pytest.mark.parametrize("mode", ["mean", "prune", "mlerp"])
def test_removing_every_matchable_a_token_is_allowed(num_tokens: int, num_prefix: int, mode: str) -> None:
    """r = max_reduction leaves no unmerged A token (the clipped-r case of late blocks)."""
    r = max_reduction(num_tokens, num_prefix)
    assert r == (num_tokens - num_prefix) // 2
    x, size = _random_tokens(2, num_tokens)
    matching = bipartite_soft_matching(x, r, num_prefix)
    assert matching.unm_idx.shape[1] == math.ceil((num_tokens - num_prefix) / 2) - r
    eager = reduce_tokens(x, size, matching, mode, num_prefix, static=False)
    static = reduce_tokens(x, size, matching, mode, num_prefix, static=True)
    assert eager[0].shape == static[0].shape == (2, num_tokens - r, 8)
    torch.testing.assert_close(static[0], eager[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("mode", ["mean", "prune", "mlerp"])
def test_r0_matching_only_reorders_the_tokens(static: bool, mode: str) -> None:
    x, size = _random_tokens(2, 11)
    matching = bipartite_soft_matching(x, 0, num_prefix=1)
    out, out_size = reduce_tokens(x, size, matching, mode, 1, static=static)
    for sample in range(2):
        order = [group[0] for group in _groups(matching, 11, 1, sample)]  # [prefix, A, B]
        assert sorted(order) == list(range(11))
        torch.testing.assert_close(out[sample], x[sample, order], rtol=1e-6, atol=0)
        assert torch.equal(out_size[sample], size[sample, order])


def test_unknown_reduce_mode_is_rejected() -> None:
    x, size = _random_tokens(1, 11)
    with pytest.raises(ValueError, match="unknown reduce mode 'median'"):
        reduce_tokens(x, size, _duplicate_matching(), "median", 1)  # type: ignore[arg-type]

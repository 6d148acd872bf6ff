"""Dense Token Fusion as pure functions: match sources to window destinations, reduce, unmerge.

For a token sequence ``x [B, N, C]`` on a grid with a ``WindowLayout`` (``Ns`` sources, ``Nd`` destinations):

1. ``match_dense``: every source proposes its most similar destination (cosine of ``metric``); the ``r`` sources
   with the most similar proposals are reduced away. Static: one constant-K TopK orders the proposals, a second
   one inverts that order; no scatter, no data-dependent shape.
2. ``reduce_dense``: the reduced sequence ``[B, N - r, C]`` is ``[unmatched sources, destinations]``; a destination
   absorbs its sources by ``"prune"`` (unchanged), ``"mean"`` (ToMe for SD) or ``"mlerp"`` (norm-preserving), with
   ``tofu_export.merge``'s one-hot combine.
3. ``unmerge_dense``: ``[B, N - r, C']`` back to ``[B, N, C']`` with one row gather: every token takes the output
   of the reduced token that stands for it (a matched source takes its destination's).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tofu_export.dense.windows import WindowLayout
from tofu_export.merge import fold_sources, sample_index, take_tokens
from tofu_export.names import REDUCE_MODES, ReduceMode


class DenseMatching(NamedTuple):
    """One matching of ``r`` sources onto destinations; indices are columns, as ``take_tokens`` takes them."""

    unm_idx: Tensor  # [B, Ns - r, 1] sources that stay (indices into the source set), best match first
    src_idx: Tensor  # [B, r, 1]      sources that are reduced away
    dst_idx: Tensor  # [B, r, 1]      the destination (index into the destination set) of each of them
    token_map: Tensor  # [B, N, 1]    for every original position, the index of its token in the reduced sequence
    metric: Tensor | None = None  # [B, N, C] the tensor matched on (identity: MLERP reuses its norms on it)
    norms: Tensor | None = None  # [B, N, 1] the row norms of ``metric`` (computed for the cosine anyway)


def match_dense(metric: Tensor, layout: WindowLayout, r: int) -> DenseMatching:
    """Match ``r`` of the sources of ``metric [B, N, C]`` onto destinations (cosine). ``0 <= r <= Ns``."""
    num_src = layout.num_src
    if not 0 <= r <= num_src:
        raise ValueError(f"r={r} is out of range: {num_src} source tokens can be reduced")
    given = metric
    metric = metric.detach()  # no gradient, without a grad-mode switch in exported graphs (merge.py)
    norms = metric.norm(dim=-1, keepdim=True)  # [B, N, 1]
    metric = metric / norms.clamp_min(1e-12)
    src, dst = metric[:, layout.src], metric[:, layout.dst]  # [B, Ns, C], [B, Nd, C]
    scores = src @ dst.transpose(-1, -2)  # [B, Ns, Nd]
    node_max, node_idx = scores.max(dim=-1, keepdim=True)  # [B, Ns, 1]
    edge_idx = node_max.topk(num_src, dim=1).indices  # [B, Ns, 1] sources, most similar first
    rank = edge_idx.topk(num_src, dim=1, largest=False).indices  # [B, Ns, 1] each source's place in edge_idx
    src_idx = edge_idx[:, :r]  # [B, r, 1]
    dst_idx = node_idx.gather(dim=1, index=src_idx)  # [B, r, 1]
    kept = num_src - r
    src_map = torch.where(rank < r, node_idx + kept, rank - r)  # [B, Ns, 1]
    dst_map = (torch.arange(layout.num_dst, device=metric.device) + kept).view(1, -1, 1)  # [1, Nd, 1]
    token_map = torch.cat([src_map, dst_map.expand(src_map.shape[0], -1, -1)], dim=1)[:, layout.inverse]
    return DenseMatching(edge_idx[:, r:], src_idx, dst_idx, token_map, given, norms)


def reduce_dense(x: Tensor, matching: DenseMatching, layout: WindowLayout, mode: ReduceMode) -> Tensor:
    """``x [B, N, C]`` -> ``[B, N - r, C]`` ordered ``[unmatched sources, destinations]``."""
    if mode not in REDUCE_MODES:
        raise ValueError(f"unknown reduce mode {mode!r}; expected one of {REDUCE_MODES}")
    src, dst = x[:, layout.src], x[:, layout.dst]  # [B, Ns, C], [B, Nd, C]
    rows, offsets = src.reshape(-1, int(src.shape[-1])), sample_index(x).reshape(-1, 1) * int(src.shape[1])
    unm = rows[offsets + matching.unm_idx.flatten(1)]  # [B, Ns - r, C]: one row Gather
    if mode != "prune" and matching.src_idx.shape[1] > 0:
        picked = offsets + matching.src_idx.flatten(1)  # [B, r] rows of the merged sources
        merged = rows[picked]  # [B, r, C]
        norms = None
        if mode == "mlerp" and matching.norms is not None and matching.metric is x:  # matched on x: reuse its norms
            src_norms = matching.norms[:, layout.src].reshape(-1, 1)  # [B * Ns, 1]
            norms = (src_norms[picked].reshape(-1, 1, int(picked.shape[1])), matching.norms[:, layout.dst])
        dst = _fold(dst, merged, matching.dst_idx, mode, norms)
    return torch.cat([unm, dst], dim=1)


def _fold(dst: Tensor, src: Tensor, dst_idx: Tensor, mode: ReduceMode,
          norms: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Fold fresh (size 1) sources ``src [B, r, C]`` into ``dst [B, Nd, C]`` at ``dst_idx [B, r, 1]``: a
    ``[B, Nd, r]`` one-hot and ``merge.fold_sources``, as the ViT path does; MLERP takes ``norms`` (sources
    ``[B, 1, r]``, destinations ``[B, Nd, 1]``) where the matching already has them."""
    slots = torch.arange(int(dst.shape[1]), device=dst.device).unsqueeze(-1)  # [Nd, 1]
    one_hot = (slots == dst_idx.reshape(-1, 1, int(src.shape[1]))).to(dst.dtype)  # [B, Nd, r]
    return fold_sources(dst, None, src, None, one_hot, mode, norms)[0]


def unmerge_dense(y: Tensor, matching: DenseMatching) -> Tensor:
    """Reduced outputs ``y [B, N - r, C']`` -> ``[B, N, C']``: every token takes its reduced token's output."""
    (out,) = take_tokens(matching.token_map, y)
    return out


def dense_tofu(x: Tensor, layout: WindowLayout, r: int, mode: ReduceMode, fn,
               matching: DenseMatching | None = None) -> Tensor:
    """``fn`` (``[B, M, C] -> [B, M, C']``, token-wise or attention) on ``x [B, N, C]`` reduced by ``r`` tokens,
    unmerged to ``[B, N, C']``; ``matching`` of ``x`` where one was made (a block's sub-layers share one), else
    matched on ``x`` here."""
    if r == 0:
        return fn(x)
    matching = match_dense(x, layout, r) if matching is None else matching
    return unmerge_dense(fn(reduce_dense(x, matching, layout, mode)), matching)

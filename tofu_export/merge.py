"""Token Fusion: bipartite soft matching and the three ways a matched token is reduced.

The whole algorithm lives here as pure functions of tensors; `tofu_export.models` only decides where to call it.

Matching is ToMe's (Bolya et al., ICLR 2023), unchanged: tokens alternate between set A (even positions) and set B
(odd positions), every A token proposes its most similar B token (cosine of the attention keys averaged over heads),
and the r most similar proposals are carried out. Prefix tokens (class, distillation, register) are never matched.

What happens to a matched source token is ToFu's choice (Kim et al., WACV 2024, arXiv 2312.01026):

- ``"mean"``  (ToMe): size-weighted average of the source tokens and their destination.
- ``"prune"``:        the source token is dropped; the destination is unchanged.
- ``"mlerp"``:        MLERP, the multi-token generalisation of norm-preserving interpolation: the direction of the
                      size-weighted average, rescaled to the largest norm among the merged tokens, so merging does
                      not shrink feature norms the way plain averaging does.

Two implementations of the combine step give the same numbers (to float rounding):

- *eager*  (``static=False``): ``scatter_reduce``, as ToMe does it; convenient and fast in PyTorch.
- *static* (``static=True``):  a one-hot assignment matrix and a batched matmul, with max-norms taken by masking.
  It uses only Gather/Equal/MatMul/ReduceMax-style ops, so the exported ONNX graph has no ScatterElements with a
  reduction (a TensorRT plugin-only op) and no data-dependent shapes.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

ReduceMode = Literal["mean", "prune", "mlerp"]
REDUCE_MODES: tuple[str, ...] = ("mean", "prune", "mlerp")
_NORM_EPS = 1e-6


class Matching(NamedTuple):
    """The outcome of one bipartite soft matching step.

    Indices refer to the *matchable* part of each set (prefix tokens excluded).
    ``Na``/``Nb`` are the numbers of matchable tokens in set A / set B.
    """

    unm_idx: Tensor  # [B, Na - r] A tokens that stay, in the order they are emitted
    src_idx: Tensor  # [B, r]      A tokens that are reduced away
    dst_idx: Tensor  # [B, r]      the B token each source token was matched to


def split_sets(x: Tensor, num_prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``x [B, N, C]`` into prefix ``[B, p, C]``, matchable set A ``[B, Na, C]`` and set B ``[B, Nb, C]``.

    Sets alternate over the *whole* sequence (A = even positions, B = odd positions), exactly as in ToMe, and the
    prefix tokens are then taken out of whichever set they fell into.
    """
    a_start, b_start = 2 * ((num_prefix + 1) // 2), 2 * (num_prefix // 2) + 1  # first matchable A / B positions
    return x[:, :num_prefix], x[:, a_start::2], x[:, b_start::2]


def set_sizes(num_tokens: int, num_prefix: int) -> tuple[int, int]:
    """Matchable tokens ``(Na, Nb)`` in sets A and B when ``num_prefix`` of ``num_tokens`` tokens are protected."""
    return (num_tokens + 1) // 2 - (num_prefix + 1) // 2, num_tokens // 2 - num_prefix // 2


def max_reduction(num_tokens: int, num_prefix: int) -> int:
    """Largest r one bipartite matching step can remove from ``num_tokens`` tokens."""
    return max(0, (num_tokens - num_prefix) // 2)


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int) -> Matching:
    """Match ``r`` tokens of set A onto set B by cosine similarity of ``metric [B, N, C]``.

    ``r`` must already be clipped to ``max_reduction(N, num_prefix)``. Indices are computed without gradient.
    Every count is a Python int derived from ``N``, so an exported graph gets constant TopK sizes.
    """
    num_a, _ = set_sizes(int(metric.shape[1]), num_prefix)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        _, a, b = split_sets(metric, num_prefix)
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]

        node_max, node_idx = scores.max(dim=-1)  # [B, Na]
        # argsort(descending) written as a full top-k so the exported TopK has a constant K (TensorRT needs one)
        edge_idx = node_max.topk(num_a, dim=-1).indices  # [B, Na]

        unm_idx = edge_idx[:, r:]  # [B, Na - r]
        src_idx = edge_idx[:, :r]  # [B, r]
        dst_idx = node_idx.gather(dim=-1, index=src_idx)  # [B, r]
        if num_prefix > 0 and num_a > r:
            # ToMe keeps the unmerged tokens in their original order when a class token is present.
            unm_idx = unm_idx.topk(num_a - r, dim=-1, largest=False).values
    return Matching(unm_idx, src_idx, dst_idx)


def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, N, C]``, ``idx [B, K]`` -> ``[B, K, C]``."""
    return x.gather(dim=1, index=idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _combine_eager(
    dst: Tensor, dst_size: Tensor, src: Tensor, src_size: Tensor, dst_idx: Tensor, mode: ReduceMode
) -> tuple[Tensor, Tensor]:
    """Fold ``src [B, r, C]`` into ``dst [B, Nb, C]`` with ``scatter_reduce`` (ToMe's way)."""
    index = dst_idx.unsqueeze(-1)  # [B, r, 1]
    weighted = dst * dst_size
    weighted = weighted.scatter_reduce(1, index.expand_as(src), src * src_size, reduce="sum")
    size = dst_size.scatter_reduce(1, index, src_size, reduce="sum")  # [B, Nb, 1]
    mean = weighted / size
    if mode == "mean":
        return mean, size
    max_norm = dst.norm(dim=-1).scatter_reduce(1, dst_idx, src.norm(dim=-1), reduce="amax")  # [B, Nb]
    merged = size > dst_size  # [B, Nb, 1] destinations that received at least one source
    return torch.where(merged, _rescale(mean, max_norm), dst), size


def _unit_sizes(x: Tensor) -> Tensor:
    """Sizes of fresh tokens, ``[B, N, 1]`` of ones. Computed from ``x`` (not ``ones_like``, which the ONNX tracer
    records as a constant of the example's batch size)."""
    return x[..., :1].detach() * 0 + 1


def _rescale(x: Tensor, norm: Tensor) -> Tensor:
    """Give every token of ``x [B, N, C]`` the norm ``norm [B, N]`` (MLERP's last step)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS) * norm.unsqueeze(-1)


def reduce_tokens(
    x: Tensor,
    size: Tensor | None,
    matching: Matching,
    mode: ReduceMode,
    num_prefix: int,
    static: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Apply a matching to tokens ``x [B, N, C]`` with sizes ``size [B, N, 1]`` (None: all ones).

    Returns the reduced tokens ``[B, N - r, C]``, ordered ``[prefix, unmerged A, B]`` as in ToMe, and their sizes.
    ``"prune"`` leaves sizes untouched (None stays None), so sizes are only tracked once something was merged.
    """
    if mode not in REDUCE_MODES:
        raise ValueError(f"unknown reduce mode {mode!r}; expected one of {REDUCE_MODES}")
    if static:
        return _reduce_static(x, size, matching, mode, num_prefix)
    prefix, a, b = split_sets(x, num_prefix)
    unm = _gather_tokens(a, matching.unm_idx)  # [B, Na - r, C]
    if mode == "prune":
        if size is not None:
            size_prefix, size_a, size_b = split_sets(size, num_prefix)
            size = torch.cat([size_prefix, _gather_tokens(size_a, matching.unm_idx), size_b], dim=1)
        return torch.cat([prefix, unm, b], dim=1), size

    if size is None:
        size = _unit_sizes(x)
    size_prefix, size_a, size_b = split_sets(size, num_prefix)
    src = _gather_tokens(a, matching.src_idx)  # [B, r, C]
    src_size = _gather_tokens(size_a, matching.src_idx)  # [B, r, 1]
    dst, dst_size = _combine_eager(b, size_b, src, src_size, matching.dst_idx, mode)
    x = torch.cat([prefix, unm, dst], dim=1)
    size = torch.cat([size_prefix, _gather_tokens(size_a, matching.unm_idx), dst_size], dim=1)
    return x, size


def static_layout(matching: Matching, num_tokens: int, num_prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where every token goes, as index arithmetic on the matching (no scatter, Python-int sizes).

    Returns ``row_pos [B, N - r]`` (the input position each output row copies: prefix, unmerged A, all of B),
    ``src_pos [B, r]`` (input positions of the source tokens) and ``dst_row [B, r]`` (the output row each source
    token is folded into).
    """
    unm_idx, src_idx, dst_idx = matching
    r = int(src_idx.shape[1])
    a_skip, b_skip = (num_prefix + 1) // 2, num_prefix // 2
    num_a, num_b = set_sizes(num_tokens, num_prefix)
    device = src_idx.device
    zero = (src_idx if r else unm_idx)[:, :1] * 0  # [B, 1], from data so the ONNX trace keeps batch dynamic
    prefix_pos = torch.arange(num_prefix, device=device) + zero  # [B, p]
    b_pos = 2 * (torch.arange(num_b, device=device) + b_skip) + 1 + zero  # [B, Nb]
    row_pos = torch.cat([prefix_pos, 2 * (unm_idx + a_skip), b_pos], dim=1)
    return row_pos, 2 * (src_idx + a_skip), num_prefix + num_a - r + dst_idx


def _batch_offsets(positions: Tensor, num_tokens: int) -> Tensor:
    """``[B, 1]`` offsets ``b * N`` that turn per-sample token positions into rows of a ``[B * N, C]`` tensor."""
    return torch.arange(positions.shape[0], device=positions.device).unsqueeze(1) * num_tokens


def _take_rows(x: Tensor, positions: Tensor, offsets: Tensor) -> Tensor:
    """``x [B, N, C]``, ``positions [B, K]`` -> ``[B, K, C]``: one row Gather on the batch-flattened tensor.

    Whole tokens are copied (``torch.gather`` would need a ``[B, K, C]`` index and export element-wise
    GatherElements), and every reshape uses constant sizes, so no Shape arithmetic enters the graph.
    """
    count, channels = int(positions.shape[1]), int(x.shape[2])
    rows = (positions + offsets).reshape(-1)
    return x.reshape(-1, channels).index_select(0, rows).reshape(-1, count, channels)


def _reduce_static(
    x: Tensor, size: Tensor | None, matching: Matching, mode: ReduceMode, num_prefix: int
) -> tuple[Tensor, Tensor | None]:
    """``reduce_tokens`` with row gathers and a small one-hot matmul: static shapes, no scatter.

    Unmerged tokens and destinations are copied by one row gather; the ``r`` source tokens are folded into their
    destinations by ``[B, N - r, r] @ [B, r, C]``, where the ``[B, N - r, r]`` one-hot comes from ``Equal`` on
    index arithmetic. MLERP's max-norm is a masked max over that one-hot.
    """
    num_tokens = int(x.shape[1])
    row_pos, src_pos, dst_row = static_layout(matching, num_tokens, num_prefix)
    offsets = _batch_offsets(row_pos, num_tokens)  # [B, 1]
    x_kept = _take_rows(x, row_pos, offsets)  # [B, N - r, C]
    if mode == "prune":
        return x_kept, None if size is None else _take_rows(size, row_pos, offsets)
    if size is None:
        size = _unit_sizes(x)
    size_kept = _take_rows(size, row_pos, offsets)  # [B, N - r, 1]
    if src_pos.shape[1] == 0:  # nothing to fold in: a pure reordering
        return x_kept, size_kept
    x_src, size_src = _take_rows(x, src_pos, offsets), _take_rows(size, src_pos, offsets)  # [B, r, C], [B, r, 1]
    rows = torch.arange(int(row_pos.shape[1]), device=x.device)
    to_dst = (dst_row.unsqueeze(1) == rows.unsqueeze(1)).to(x.dtype)  # [B, N - r, r]
    new_size = size_kept + to_dst @ size_src
    x_sum = x_kept * size_kept + to_dst @ (x_src * size_src)  # [B, N - r, C]: size-weighted sums
    if mode == "mean":
        return x_sum / new_size, new_size
    # MLERP: the direction of the size-weighted mean is that of the weighted sum; give it the largest norm.
    incoming_norm = (to_dst * x_src.norm(dim=-1).unsqueeze(1)).amax(dim=-1)  # [B, N - r]
    return _rescale(x_sum, torch.maximum(x_kept.norm(dim=-1), incoming_norm)), new_size

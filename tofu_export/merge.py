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
- *static* (``static=True``):  one row gather of the kept tokens straight from ``x``, a one-hot assignment matrix
  and a batched matmul, with max-norms taken by masking. It uses only GatherND/Equal/MatMul/ReduceMax-style ops of
  plain PyTorch, so any ONNX exporter (torch's own included) writes a graph with no ScatterElements with a
  reduction (a TensorRT plugin-only op), no custom ops and no data-dependent shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tofu_export.names import REDUCE_MODES, ReduceMode

_NORM_EPS = 1e-6


class Matching(NamedTuple):
    """The outcome of one bipartite soft matching step.

    Indices refer to the *matchable* part of each set (prefix tokens excluded).
    ``Na``/``Nb`` are the numbers of matchable tokens in set A / set B. Indices are columns (a trailing axis of
    size 1), the shape a row gather takes them in.
    """

    unm_idx: Tensor  # [B, Na - r, 1] A tokens that stay, in the order they are emitted
    src_idx: Tensor  # [B, r, 1]      A tokens that are reduced away
    dst_idx: Tensor  # [B, r, 1]      the B token each source token was matched to


def split_sets(x: Tensor, num_prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``x [B, N, C]`` into prefix ``[B, p, C]``, matchable set A ``[B, Na, C]`` and set B ``[B, Nb, C]``.

    Sets alternate over the *whole* sequence (A = even positions, B = odd positions), exactly as in ToMe, and the
    prefix tokens are then taken out of whichever set they fell into.
    """
    a_start, b_start = 2 * ((num_prefix + 1) // 2), 2 * (num_prefix // 2) + 1  # first matchable A / B positions
    return x[:, :num_prefix], x[:, a_start::2], x[:, b_start::2]


def _matchable_sets(x: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """``split_sets`` without the prefix: sets A ``[B, Na, C]`` and B ``[B, Nb, C]``."""
    _, a, b = split_sets(x, num_prefix)
    return a, b


def set_sizes(num_tokens: int, num_prefix: int) -> tuple[int, int]:
    """Matchable tokens ``(Na, Nb)`` in sets A and B when ``num_prefix`` of ``num_tokens`` tokens are protected."""
    return (num_tokens + 1) // 2 - (num_prefix + 1) // 2, num_tokens // 2 - num_prefix // 2


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int) -> Matching:
    """Match ``r`` tokens of set A onto set B by cosine similarity of ``metric [B, N, C]``.

    ``r`` must already be clipped to ``max_reduction(N, num_prefix)``. Indices are computed without gradient.
    Every count is a Python int derived from ``N``, so an exported graph gets constant TopK sizes.
    """
    num_a, _ = set_sizes(int(metric.shape[1]), num_prefix)
    metric = metric.detach()  # no gradient, as under ToMe's no_grad, without a grad-mode switch in exported graphs
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = _matchable_sets(metric, num_prefix)
    scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]

    node_max, node_idx = scores.topk(1, dim=-1)  # [B, Na, 1]: each A token's best B token, one TopK
    # argsort(descending) written as a full top-k so the exported TopK has a constant K (TensorRT needs one)
    edge_idx = node_max.topk(num_a, dim=1).indices  # [B, Na, 1]

    src_idx, unm_idx = edge_idx.split([r, num_a - r], dim=1)  # [B, r, 1], [B, Na - r, 1]: one Split
    dst_idx = node_idx.gather(dim=1, index=src_idx)  # [B, r, 1]
    if num_prefix > 0 and num_a > r:
        # ToMe keeps the unmerged tokens in their original order when a class token is present.
        unm_idx = unm_idx.topk(num_a - r, dim=1, largest=False).values
    return Matching(unm_idx, src_idx, dst_idx)


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, N, C]``, token indices ``idx [B, K, 1]`` -> ``[B, K, C]``."""
    return x.gather(dim=1, index=idx.expand(-1, -1, x.shape[-1]))


def take_tokens(idx: Tensor, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Tokens ``idx [B, K, 1]`` of every sample, from each of ``tensors`` (``[B, N, C]`` -> ``[B, K, C]``; None
    passes through). The eager path's gather (differentiable)."""
    return tuple(None if t is None else _gather_rows(t, idx) for t in tensors)


def sample_index(x: Tensor) -> Tensor:
    """``[B, 1, 1]``: the index of every sample of ``x [B, ...]``. Traced, it stays a function of the batch size."""
    return torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)


def _combine_eager(
    dst: Tensor, dst_size: Tensor, src: Tensor, src_size: Tensor, dst_idx: Tensor, mode: ReduceMode
) -> tuple[Tensor, Tensor]:
    """Fold ``src [B, r, C]`` into ``dst [B, Nb, C]`` with ``scatter_reduce`` (ToMe's way)."""
    weighted = dst * dst_size
    weighted = weighted.scatter_reduce(1, dst_idx.expand_as(src), src * src_size, reduce="sum")
    size = dst_size.scatter_reduce(1, dst_idx, src_size, reduce="sum")  # [B, Nb, 1]
    mean = weighted / size
    if mode == "mean":
        return mean, size
    max_norm = dst.norm(dim=-1, keepdim=True).scatter_reduce(1, dst_idx, src.norm(dim=-1, keepdim=True), reduce="amax")
    merged = size > dst_size  # [B, Nb, 1] destinations that received at least one source
    return torch.where(merged, rescale(mean, max_norm), dst), size


def _unit_sizes(x: Tensor) -> Tensor:
    """Sizes of fresh tokens, ``[B, N, 1]`` of ones. Computed from ``x`` (not ``ones_like``, which the ONNX tracer
    records as a constant of the example's batch size)."""
    return x[..., :1].detach() * 0 + 1


def rescale(x: Tensor, norm: Tensor) -> Tensor:
    """Give every token of ``x [..., C]`` the norm ``norm [..., 1]`` (MLERP's last step)."""
    return x * (norm / x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS))


def _row_offsets(x: Tensor, sample: Tensor | None) -> Tensor:
    """``[B, 1]``: the row of ``_rows(x)`` where each sample of ``x [B, N, C]`` starts (``sample``: its
    ``sample_index``, computed once per graph by the caller, or None)."""
    sample = sample_index(x) if sample is None else sample
    return sample.reshape(-1, 1) * int(x.shape[1])


def kept_patch_rows(matching: Matching, num_tokens: int, num_prefix: int, sample: Tensor | None,
                    shared: bool) -> Tensor:
    """``[B, N - r - p]``: where each patch token a reduction kept (a merged one: its destination) sits in a table of
    per-patch-token rows (patch token ``t`` at row ``t - p``): of ``[N - p, D]`` shared by every sample
    (``shared``), or of per-sample tables as rows ``[B * (N - p), D]``. The rows the reduction gathered from ``x``
    (the same nodes in a graph), less the prefix."""
    sample = sample_index(matching.unm_idx) if sample is None else sample
    offsets = sample.reshape(-1, 1) * num_tokens  # [B, 1], as _row_offsets
    kept = _kept_rows(matching.unm_idx, num_tokens, num_prefix, offsets)[:, num_prefix:]  # [B, N - r - p] of B * N
    table_start = offsets if shared else sample.reshape(-1, 1) * num_prefix  # s * N, or s * p: s * N - s * (N - p)
    return kept - (table_start + num_prefix)


def _kept_rows(unm_idx: Tensor, num_tokens: int, num_prefix: int, offsets: Tensor) -> Tensor:
    """Flat rows ``[B, N - r]`` of the output tokens in ToMe's order: prefix, unmerged A, then all of B."""
    a_start, b_start = 2 * ((num_prefix + 1) // 2), 2 * (num_prefix // 2) + 1
    parts = [offsets + torch.arange(num_prefix, device=offsets.device)] if num_prefix else []  # [B, p]
    parts.append(offsets + a_start + 2 * unm_idx.flatten(1))  # [B, Na - r]
    parts.append(offsets + torch.arange(b_start, num_tokens, 2, device=offsets.device))  # [B, Nb]
    return torch.cat(parts, dim=1)


def _rows(x: Tensor) -> Tensor:
    """``x [B, N, C]`` as rows ``[B * N, C]``: a ``Reshape`` to a constant ``[-1, C]`` (``flatten`` loses the
    static C in ONNX Runtime's symbolic shape inference, which TensorRT's checks rely on)."""
    return x.reshape(-1, int(x.shape[-1]))


def _reduce_static(
    x: Tensor, size: Tensor | None, matching: Matching, mode: ReduceMode, num_prefix: int, sample: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """``reduce_tokens`` without scatter and without slicing the sets apart: one row gather takes
    ``[prefix, unmerged A, B]`` straight from ``x`` (a ``Gather`` of rows of ``x [B * N, C]``), and the sources are
    folded into their destinations with a ``[B, N - r, r]`` one-hot and one batched matmul. MLERP's max-norm is a
    masked max over the same one-hot. Sizes are carried only when given (None: every token has size 1)."""
    num_tokens, num_src = int(x.shape[1]), int(matching.src_idx.shape[1])
    offsets = _row_offsets(x, sample)  # [B, 1]
    kept = _kept_rows(matching.unm_idx, num_tokens, num_prefix, offsets)  # [B, N - r]
    rows, size_rows = _rows(x), None if size is None else _rows(size)  # [B * N, C], [B * N, 1]
    out = rows[kept]  # [B, N - r, C]
    out_size = None if size_rows is None else size_rows[kept]  # [B, N - r, 1]
    if mode == "prune" or num_src == 0:
        return out, out_size
    a_start = 2 * ((num_prefix + 1) // 2)
    src_rows = offsets + a_start + 2 * matching.src_idx.flatten(1)  # [B, r]
    src = rows[src_rows]  # [B, r, C]
    first_b = num_prefix + int(matching.unm_idx.shape[1])  # where set B starts in the output
    slots = torch.arange(int(out.shape[1]), device=x.device).unsqueeze(-1)  # [N - r, 1]
    one_hot = (slots == first_b + matching.dst_idx.reshape(-1, 1, num_src)).to(x.dtype)  # [B, N - r, r]
    src_size = None if size_rows is None else size_rows[src_rows].reshape(-1, 1, num_src)  # [B, 1, r]
    return fold_sources(out, out_size, src, src_size, one_hot, mode)


def fold_sources(
    dst: Tensor, dst_size: Tensor | None, src: Tensor, src_size: Tensor | None, one_hot: Tensor, mode: ReduceMode,
    norms: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Fold sources ``src [B, r, C]`` into ``dst [B, M, C]`` without scatter: ``one_hot [B, M, r]`` says where each
    source goes, and one batched matmul sums them in. Sizes ``dst_size [B, M, 1]`` / ``src_size [B, 1, r]`` (None:
    every size is 1). MLERP's max-norm is a masked max over the same one-hot, on ``norms`` (sources ``[B, 1, r]``,
    destinations ``[B, M, 1]``) where the caller already has them. Returns tokens and sizes ``[B, M, 1]``."""
    if dst_size is None:  # fresh tokens: every weight is 1
        weighted = dst + one_hot @ src  # [B, M, C]: size-weighted sums
        new_size = one_hot.sum(dim=-1, keepdim=True) + 1  # [B, M, 1]
    else:
        to_dst = one_hot if src_size is None else one_hot * src_size  # [B, M, r]: source sizes
        weighted = dst * dst_size + to_dst @ src
        new_size = dst_size + to_dst.sum(dim=-1, keepdim=True)
    if mode == "mean":
        return weighted / new_size, new_size
    # MLERP: the size-weighted mean points the way of the weighted sum; give it the largest norm among the merged.
    src_norm, dst_norm = norms if norms is not None else (src.norm(dim=-1).unsqueeze(1), dst.norm(dim=-1, keepdim=True))
    incoming = (one_hot * src_norm).amax(dim=-1, keepdim=True)  # [B, M, 1]
    return rescale(weighted, torch.maximum(dst_norm, incoming)), new_size


def reduce_tokens(
    x: Tensor,
    size: Tensor | None,
    matching: Matching,
    mode: ReduceMode,
    num_prefix: int,
    static: bool = False,
    sample: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Apply a matching to tokens ``x [B, N, C]`` with sizes ``size [B, N, 1]`` (None: all ones).

    Returns the reduced tokens ``[B, N - r, C]``, ordered ``[prefix, unmerged A, B]`` as in ToMe, and their sizes.
    ``"prune"`` leaves sizes untouched (None stays None), so sizes are only tracked once something was merged.
    ``static`` folds sources in without scatter (see ``_reduce_static``); the numbers are the same to float
    rounding. ``sample`` (``sample_index(x)``) lets a model compute the batch indices once per forward.
    """
    if mode not in REDUCE_MODES:
        raise ValueError(f"unknown reduce mode {mode!r}; expected one of {REDUCE_MODES}")
    if static:
        return _reduce_static(x, size, matching, mode, num_prefix, sample)
    if mode != "prune" and size is None:
        size = _unit_sizes(x)
    prefix, a, b = split_sets(x, num_prefix)
    size_prefix, size_a, size_b = split_sets(size, num_prefix) if size is not None else (None, None, None)
    unm, size_unm = take_tokens(matching.unm_idx, a, size_a)  # [B, Na - r, C], [B, Na - r, 1]
    if mode != "prune" and matching.src_idx.shape[1] > 0:
        src, src_size = take_tokens(matching.src_idx, a, size_a)  # [B, r, C], [B, r, 1]
        b, size_b = _combine_eager(b, size_b, src, src_size, matching.dst_idx, mode)
    x = torch.cat([prefix, unm, b], dim=1)
    return x, None if size is None else torch.cat([size_prefix, size_unm, size_b], dim=1)

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
  It uses only GatherND/Equal/MatMul/ReduceMax-style ops, so the exported ONNX graph has no ScatterElements with a
  reduction (a TensorRT plugin-only op) and no data-dependent shapes.

Both take tokens out of a set with ``take_tokens``, which exports as one row ``GatherND`` per tensor.
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

        node_max, node_idx = scores.max(dim=-1, keepdim=True)  # [B, Na, 1]
        # argsort(descending) written as a full top-k so the exported TopK has a constant K (TensorRT needs one)
        edge_idx = node_max.topk(num_a, dim=1).indices  # [B, Na, 1]

        unm_idx = edge_idx[:, r:]  # [B, Na - r, 1]
        src_idx = edge_idx[:, :r]  # [B, r, 1]
        dst_idx = node_idx.gather(dim=1, index=src_idx)  # [B, r, 1]
        if num_prefix > 0 and num_a > r:
            # ToMe keeps the unmerged tokens in their original order when a class token is present.
            unm_idx = unm_idx.topk(num_a - r, dim=1, largest=False).values
    return Matching(unm_idx, src_idx, dst_idx)


class _GatherRows(torch.autograd.Function):
    """``take_tokens`` in an exported graph: one ``GatherND`` over ``(sample, token)`` index pairs.

    ``batch_dims=1`` would spare the sample column, but ONNX Runtime's symbolic shape inference (which its TensorRT
    provider relies on) ignores that attribute and gives up on the graph. Export runs only ``forward``.
    """

    @staticmethod
    def forward(ctx: object, x: Tensor, pairs: Tensor) -> Tensor:  # x [B, N, C], pairs [B, K, 2]
        return _gather_rows(x, pairs[..., 1:])

    @staticmethod
    def symbolic(g: object, x: object, pairs: object) -> object:
        out = g.op("GatherND", x, pairs)
        # Without this the tracer types the output with the example's batch size, and a simplifier folds it in.
        x_sizes, pair_sizes = x.type().varyingSizes(), pairs.type().varyingSizes()
        if x_sizes is not None and pair_sizes is not None:
            out.setType(x.type().with_sizes([None, pair_sizes[1], x_sizes[2]]))
        return out


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, N, C]``, token indices ``idx [B, K, 1]`` -> ``[B, K, C]``."""
    return x.gather(dim=1, index=idx.expand(-1, -1, x.shape[-1]))


@torch.library.custom_op("tofu_export::gather_rows", mutates_args=())
def gather_rows(x: Tensor, pairs: Tensor) -> Tensor:
    """``_GatherRows`` for torch.export: ``x [B, N, C]``, ``pairs [B, K, 2]`` -> ``[B, K, C]`` as one graph node, which
    the dynamo ONNX exporter translates to ``GatherND`` (``tofu_export.exporters.dynamo``)."""
    return _gather_rows(x, pairs[..., 1:])


@gather_rows.register_fake
def _(x: Tensor, pairs: Tensor) -> Tensor:
    return x.new_empty(pairs.shape[0], pairs.shape[1], x.shape[2])


def sample_index(x: Tensor) -> Tensor:
    """``[B, 1, 1]``: the index of every sample of ``x [B, ...]``. Traced, it stays a function of the batch size."""
    return torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)


def take_tokens(idx: Tensor, *tensors: Tensor | None, sample: Tensor | None = None) -> tuple[Tensor | None, ...]:
    """Tokens ``idx [B, K, 1]`` of every sample, from each of ``tensors`` (``[B, N, C]`` -> ``[B, K, C]``; None
    passes through).

    In PyTorch this is ``gather`` (differentiable). In an exported graph each tensor costs one row ``GatherND``
    (not an element-wise ``GatherElements`` over a ``[B, K, C]`` index), with the ``(sample, token)`` pairs built
    once; ``sample`` (``sample_index`` of the batch) can be passed in so that a model computes it once, not per
    call.
    """
    if not torch.onnx.is_in_onnx_export():
        return tuple(None if t is None else _gather_rows(t, idx) for t in tensors)
    num_taken = int(idx.shape[1])
    if num_taken == 0:  # nothing to take (a block that reduces all of set A); Expand to 0 rows would be mistyped
        return tuple(None if t is None else t[:, :0] for t in tensors)
    if sample is None:
        sample = sample_index(idx)
    pairs = torch.cat([sample.expand(-1, num_taken, -1), idx], dim=-1)  # [B, K, 2]
    gather = _GatherRows.apply if torch.jit.is_tracing() else gather_rows  # TorchScript tracer : torch.export
    return tuple(None if t is None else gather(t, pairs) for t in tensors)


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
    return torch.where(merged, _rescale(mean, max_norm), dst), size


def _combine_static(
    dst: Tensor, dst_size: Tensor, src: Tensor, src_size: Tensor, dst_idx: Tensor, mode: ReduceMode
) -> tuple[Tensor, Tensor]:
    """``_combine_eager`` without scatter: a ``[B, Nb, r]`` one-hot (``Equal`` on the destination indices) and a
    batched matmul; MLERP's max-norm is a masked max over the same one-hot."""
    slots = torch.arange(int(dst.shape[1]), device=dst.device)
    to_dst = (dst_idx == slots).to(dst.dtype)  # [B, r, Nb]: where each source goes
    gather_in = to_dst.transpose(1, 2)  # [B, Nb, r]
    size = dst_size + gather_in @ src_size  # [B, Nb, 1]
    weighted = dst * dst_size + gather_in @ (src * src_size)  # [B, Nb, C]: size-weighted sums
    if mode == "mean":
        return weighted / size, size
    # MLERP: the size-weighted mean points the way of the weighted sum; give it the largest norm among the merged.
    incoming_norm = (to_dst * src.norm(dim=-1, keepdim=True)).amax(dim=1).unsqueeze(-1)  # [B, Nb, 1]
    return _rescale(weighted, torch.maximum(dst.norm(dim=-1, keepdim=True), incoming_norm)), size


def _unit_sizes(x: Tensor) -> Tensor:
    """Sizes of fresh tokens, ``[B, N, 1]`` of ones. Computed from ``x`` (not ``ones_like``, which the ONNX tracer
    records as a constant of the example's batch size)."""
    return x[..., :1].detach() * 0 + 1


def _rescale(x: Tensor, norm: Tensor) -> Tensor:
    """Give every token of ``x [..., C]`` the norm ``norm [..., 1]`` (MLERP's last step)."""
    return x * (norm / x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS))


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
    ``static`` folds sources in without scatter (see the module docstring); the numbers are the same.
    ``sample`` is passed on to ``take_tokens``.
    """
    if mode not in REDUCE_MODES:
        raise ValueError(f"unknown reduce mode {mode!r}; expected one of {REDUCE_MODES}")
    if mode != "prune" and size is None:
        size = _unit_sizes(x)
    prefix, a, b = split_sets(x, num_prefix)
    size_prefix, size_a, size_b = split_sets(size, num_prefix) if size is not None else (None, None, None)
    unm, size_unm = take_tokens(matching.unm_idx, a, size_a, sample=sample)  # [B, Na - r, C], [B, Na - r, 1]
    if mode != "prune" and matching.src_idx.shape[1] > 0:
        src, src_size = take_tokens(matching.src_idx, a, size_a, sample=sample)  # [B, r, C], [B, r, 1]
        combine = _combine_static if static else _combine_eager
        b, size_b = combine(b, size_b, src, src_size, matching.dst_idx, mode)
    x = torch.cat([prefix, unm, b], dim=1)
    return x, None if size is None else torch.cat([size_prefix, size_unm, size_b], dim=1)

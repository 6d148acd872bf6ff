"""The family-independent part of a ToFu patch: the one state object a patched model's blocks share, and the
``reduce`` submodule that removes tokens after a block's attention using the keys the attention just computed.

A family's patch creates one ``ToFuState`` (``model._tofu``), gives every block a ``TokenReduction`` and hands it
the block's keys through a forward hook (``capture_keys`` for ``[B, H, N, D]`` keys,
``capture_token_keys`` for a key projection's ``[B, N, H * D]`` output).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tofu_export.merge import Matching, bipartite_soft_matching, kept_patch_rows, reduce_tokens, sample_index
from tofu_export.schedule import TokenPlan, plan_tokens


@dataclass
class ToFuState:
    """Everything ToFu knows about a patched model. ``size`` and ``sample`` are the fields that change during a
    forward."""

    r: list[int]  # [depth] requested tokens to remove per block
    modes: list[str]  # [depth] "mean" | "prune" | "mlerp"
    prop_attn: bool
    num_prefix: int
    plan: TokenPlan | None  # static token counts, or None for the eager (any input size) path
    img_size: tuple[int, int] | None
    size: Tensor | None = field(default=None, repr=False)  # [B, N, 1] token sizes of the forward in flight
    sample: Tensor | None = field(default=None, repr=False)  # [B, 1, 1] sample indices, only while exporting
    rope: Tensor | None = field(default=None, repr=False)  # [B, 1, N - p, 2D] kept tokens' rotations (rotary models)

    @property
    def static(self) -> bool:
        return self.plan is not None


class TokenReduction(nn.Module):
    """Removes ``r`` tokens after a block's attention, using the keys its attention just computed."""

    def __init__(self, state: ToFuState, index: int, heads: int = 1) -> None:
        super().__init__()
        self.state, self.index, self.heads = state, index, heads
        self.metric: Tensor | None = None  # [B, N, head_dim], set by the key hook
        self.matching: Matching | None = None  # the last forward's; None where it removed nothing

    def capture_keys(self, module: nn.Module, args: tuple, keys: Tensor) -> None:
        """Forward hook on a module whose output is the per-head keys ``[B, H, N, D]`` (timm's ``attn.k_norm``)."""
        self.metric = head_mean_keys(keys)

    def capture_token_keys(self, module: nn.Module, args: tuple, keys: Tensor) -> None:
        """Forward hook on a key projection whose output is ``[B, N, H * D]`` (``self.heads`` heads)."""
        tokens, width = (int(n) for n in keys.shape[1:])
        heads = self.heads
        per_head = keys.reshape(-1, heads, width // heads)  # [B * N, H, D]
        mean = keys.new_full((1, heads), 1.0 / heads) @ per_head  # [B * N, 1, D]
        self.metric = mean.reshape(-1, tokens, width // heads)

    def forward(self, x: Tensor, size: Tensor | None, rotations: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``x [B, N, C]``, ``size [B, N, 1] | None`` -> reduced ``[B, N - r, C]`` and sizes.

        ``rotations``: a rotary model's embeddings of ``x``'s patch tokens (``[N - p, D]``, shared, or
        ``[B, 1, N - p, D]``). Where tokens are removed, ``state.rope`` becomes the kept tokens' (``kept_rotations``),
        here, so that an exported graph's ``reduce`` scope holds all the reduction costs (``check --costs``)."""
        state, metric = self.state, self.metric
        self.metric = self.matching = None
        if state.plan is not None:
            expected = state.plan.tokens[self.index]
            if x.shape[1] != expected:
                raise ValueError(
                    f"block {self.index} expected {expected} tokens (model patched statically for input size "
                    f"{state.img_size}) but got {x.shape[1]}; patch again with img_size=None for any input size, "
                    "or with the input size you feed."
                )
            r = state.plan.r[self.index]
        else:
            r = plan_tokens(x.shape[1], state.num_prefix, [state.r[self.index]], warn=False).r[0]  # eager: any size
        if r == 0:
            return x, size
        if metric is None:
            raise RuntimeError("ToFu found no keys for this block: was attn.k_norm skipped or replaced?")
        matching = self.matching = bipartite_soft_matching(metric, r, state.num_prefix)
        if torch.onnx.is_in_onnx_export() and state.sample is None:
            state.sample = sample_index(x)  # one batch-size computation in the graph, shared by every block's gathers
        mode = state.modes[self.index]
        reduced = reduce_tokens(x, size, matching, mode, state.num_prefix, static=state.static, sample=state.sample)
        if rotations is not None:
            state.rope = kept_rotations(self, rotations, x)
        return reduced

    def extra_repr(self) -> str:
        plan = self.state.plan
        r = plan.r[self.index] if plan is not None else self.state.r[self.index]
        return f"r={r}, mode={self.state.modes[self.index]}, static={self.state.static}"


def kept_rotations(reduce: TokenReduction, rotations: Tensor, x: Tensor) -> Tensor:
    """The rotary embeddings of the tokens ``reduce``'s last forward kept, a merged token keeping its destination's:
    ``rotations`` of the patch tokens (``[N - p, D]``, shared, or ``[B, 1, N - p, D]``), ``x`` the tokens ``[B, N, C]``
    it reduced -> ``[B, 1, N' - p, D]``, per sample (the layout timm's patch dropout hands its blocks). One row
    gather, at the rows the reduction gathered its tokens from."""
    prefix, (tokens, dim) = reduce.state.num_prefix, (int(n) for n in rotations.shape[-2:])
    if tokens != int(x.shape[1]) - prefix or rotations.dim() not in (2, 4):
        raise ValueError(f"rotations {tuple(rotations.shape)} are not [N - p, D] or [B, 1, N - p, D] for "
                         f"{int(x.shape[1])} tokens of which {prefix} prefix")
    rows = kept_patch_rows(reduce.matching, int(x.shape[1]), prefix, reduce.state.sample, rotations.dim() == 2)
    return rotations.reshape(-1, dim)[rows].unsqueeze(1)  # [B, 1, N' - p, D]


def head_mean_keys(keys: Tensor) -> Tensor:
    """Keys averaged over heads, ``[B, H, N, D] -> [B, N, D]``.

    The mean is a ``[1, H] @ [B, H, N * D]`` product, so an exported graph adds one small MatMul between two
    reshapes (on ONNX Runtime's CPU provider a ReduceMean over the head axis costs several times more).
    """
    heads, tokens, dim = (int(n) for n in keys.shape[1:])  # the batch stays symbolic under torch.export
    head_mean = keys.new_full((1, heads), 1.0 / heads)
    return (head_mean @ keys.reshape(-1, heads, tokens * dim)).reshape(-1, tokens, dim)


def start_forward(state: ToFuState) -> None:
    """A new forward starts: every token stands for one patch, no sample index yet, every token at its position."""
    state.size = state.sample = state.rope = None


def size_bias(size: Tensor) -> Tensor:
    """``log(size)`` as an additive attention mask over the keys, ``size [B, N, 1]`` -> ``[B, 1, 1, N]``: each key
    token weighs in the softmax as ``size`` copies of itself would."""
    return size.log().reshape(-1, 1, 1, size.shape[1])


def proportional_mask(state: ToFuState) -> Tensor | None:
    """``[B, 1, 1, N]`` additive attention mask ``log(size)`` for proportional attention, or None."""
    size = state.size
    if not state.prop_attn or size is None:
        return None
    return size_bias(size)


def size_weighted_mean(x: Tensor, size: Tensor | None) -> Tensor:
    """``x [B, N, C]`` averaged over tokens, each counted as many times as the patches it stands for: ``[B, C]``."""
    if size is None:
        return x.mean(dim=1)
    return (x * size).sum(dim=1) / size.sum(dim=1)

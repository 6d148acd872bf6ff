"""How many tokens each block removes, and how: r schedules, per-layer modes, token counts and FLOPs.

Everything here is plain Python on integers, so a static model's token counts are constants fixed at build time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tofu_export.errors import UserError
from tofu_export.names import MODES, REDUCE_MODES
from tofu_export.user_warnings import warn_user

# The per-layer reduce mode each uniform user-facing mode expands to.
_UNIFORM = {"tome": "mean", "prune": "prune", "mlerp": "mlerp"}

RSpec = int | Sequence[int] | tuple[int, float]


class ScheduleError(UserError, ValueError):
    """A token-reduction schedule that cannot be built for this model and input size."""


def parse_r(r: RSpec, depth: int) -> list[int]:
    """Expand ``r`` into one value per block.

    - ``int``: the same r in every block (ToMe's constant schedule).
    - ``(r, inflection)``: ToMe's schedule with an inflection in [-1, 1]; ``(r, -1.0)`` is the *decreasing* schedule
      (2r in the first block down to 0 in the last), ``(r, 0.0)`` is constant. Both remove about ``r * depth`` tokens.
    - a list: one r per block, taken as given (its length must equal the depth).
    """
    if isinstance(r, bool):
        raise ScheduleError("r must be an int, an (r, inflection) pair or a list of ints, not a bool")
    if isinstance(r, int):
        values = [r] * depth
    elif isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        base, inflection = r
        if not -1.0 <= inflection <= 1.0:
            raise ScheduleError(f"inflection must lie in [-1, 1], got {inflection}")
        low = int(base * (1.0 - inflection))
        high = 2 * base - low
        step = (high - low) / max(depth - 1, 1)
        values = [int(low + step * i) for i in range(depth)]
    else:
        values = [int(v) for v in r]
        if len(values) != depth:
            raise ScheduleError(f"an r list needs one value per block: got {len(values)} values for {depth} blocks")
    if any(v < 0 for v in values):
        raise ScheduleError(f"r must be >= 0 in every block, got {values}")
    return values


def decreasing_schedule(r: int, depth: int) -> list[int]:
    """ToMe's decreasing schedule: remove more tokens early (2r) and fewer late (0), ``r * depth`` in total."""
    return parse_r((r, -1.0), depth)


# How many leading blocks ToFu prunes in before it switches to MLERP merging, without data: none. Measured on the real
# DINOv2 ViT-S/14 weights at r=16 (Fashion-MNIST test images, cosine of the pooled feature to the unreduced model,
# bench/results/matched_latency_dinov2.md): MLERP in every block stays within 0.0005 of ToMe's cosine at no higher ORT
# CPU latency, while pruning in even the first block alone falls further behind, and removing tokens in one block at a
# time pruning damaged the output more than merging in every block. So the default prunes nowhere; ``prune_layers``
# is the explicit speed knob, and ``tofu-export calibrate`` measures a per-block choice on your own model and images.
DEFAULT_PRUNE_LAYERS = 0


def layer_modes(mode: str | Sequence[str], depth: int, prune_layers: int | None = None) -> list[str]:
    """Expand a user mode into one reduce mode per block (``"mean"``, ``"prune"`` or ``"mlerp"``).

    ``"tofu"`` prunes in the first ``prune_layers`` blocks (default none, see ``DEFAULT_PRUNE_LAYERS``) and merges
    with MLERP after them. A list gives each block's reduce mode explicitly (it may use the user names ``"tome"``
    for ``"mean"``).
    """
    if isinstance(mode, str):
        if mode == "tofu":
            k = DEFAULT_PRUNE_LAYERS if prune_layers is None else prune_layers
            if not 0 <= k <= depth:
                raise ScheduleError(f"prune_layers must lie in [0, {depth}], got {k}")
            return ["prune"] * k + ["mlerp"] * (depth - k)
        if mode not in _UNIFORM:
            raise ScheduleError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        return [_UNIFORM[mode]] * depth
    modes = [_UNIFORM.get(m, m) for m in mode]
    if len(modes) != depth or any(m not in REDUCE_MODES for m in modes):
        raise ScheduleError(f"a per-block mode list needs {depth} entries from {REDUCE_MODES}, got {list(mode)}")
    return modes


@dataclass(frozen=True)
class TokenPlan:
    """Tokens entering each block, and the r each block really removes (after clipping)."""

    tokens: list[int]  # [depth] tokens entering block i
    r: list[int]  # [depth] tokens removed in block i
    requested: list[int]  # [depth] r before clipping

    @property
    def final_tokens(self) -> int:
        return self.tokens[-1] - self.r[-1] if self.tokens else 0

    @property
    def clipped(self) -> list[int]:
        """Blocks whose requested r could not be removed."""
        return [i for i, (got, want) in enumerate(zip(self.r, self.requested, strict=True)) if got < want]


def max_reduction(num_tokens: int, num_prefix: int) -> int:
    """Largest r one bipartite matching step (``merge.bipartite_soft_matching``) can remove from ``num_tokens``
    tokens: every removed token is one of the alternating set A, matched onto set B."""
    return max(0, (num_tokens - num_prefix) // 2)


def plan_tokens(
    num_tokens: int, num_prefix: int, r: Sequence[int], strict: bool = False, warn: bool = True
) -> TokenPlan:
    """Token count entering each block when block i removes ``r[i]`` tokens, clipped to what matching allows.

    This is the one place that decides how many tokens a block can remove. With ``strict=True`` an impossible r
    raises ``ScheduleError``; otherwise it is clipped, with a warning unless ``warn=False``.
    """
    tokens, removed = [], []
    n = num_tokens
    for want in r:
        got = min(want, max_reduction(n, num_prefix))
        tokens.append(n)
        removed.append(got)
        n -= got
    return report_clipping(TokenPlan(tokens, removed, list(r)), num_prefix, strict, warn)


def report_clipping(plan: TokenPlan, num_prefix: int, strict: bool = False, warn: bool = True) -> TokenPlan:
    """``plan`` as ``plan_tokens`` reports it: ``ScheduleError`` (``strict``) or a warning (``warn``) when it clipped
    a block's r; a plan made earlier (``ToFuConfig.resolve``'s) is reported here when a model is patched with it."""
    if plan.clipped:
        first = plan.clipped[0]
        message = (
            f"r={plan.requested[first]} is more than block {first} can remove: it receives {plan.tokens[first]} "
            f"tokens ({num_prefix} protected) and one bipartite matching step removes at most "
            f"{max_reduction(plan.tokens[first], num_prefix)}; blocks {plan.clipped} were clipped "
            f"(removing {sum(plan.r)} of the {sum(plan.requested)} tokens asked for). Lower r or use a "
            "decreasing schedule."
        )
        if strict:
            raise ScheduleError(message)
        if warn:
            warn_user(message)  # at the user's line that asked for it
    return plan


def planned_for(plan: TokenPlan | None, num_tokens: int, num_prefix: int, r: Sequence[int],
                strict: bool = False) -> TokenPlan:
    """The static plan of a model receiving ``num_tokens`` with per-block ``r``: ``plan`` where one was made for
    exactly these (reported as ``plan_tokens`` would report it), else a new one. A plan made for other tokens or r is a
    caller's error (``ValueError``)."""
    if plan is None:
        return plan_tokens(num_tokens, num_prefix, r, strict=strict)
    if plan.tokens[:1] != [num_tokens] or plan.requested != list(r):
        raise ValueError(f"a token plan for {plan.tokens[:1]} tokens and r={plan.requested} was handed to a model "
                         f"receiving {num_tokens} tokens with r={list(r)}")
    return report_clipping(plan, num_prefix, strict)


def block_macs(tokens: int, removed: int, dim: int, mlp_hidden: int, num_prefix: int, metric_dim: int) -> int:
    """Multiply-accumulates of one ViT block that receives ``tokens`` and removes ``removed`` before its MLP.

    Counts the linear layers and the two attention matmuls (fvcore's convention, which papers report as "FLOPs"),
    plus the similarity matmul of the matching step when tokens are removed.
    """
    n_mlp = tokens - removed
    attention = 4 * tokens * dim * dim + 2 * tokens * tokens * dim
    mlp = 2 * n_mlp * dim * mlp_hidden
    matching = 0
    if removed:
        matchable = tokens - num_prefix
        matching = math.ceil(matchable / 2) * (matchable // 2) * metric_dim
    return attention + mlp + matching


def compact_r(r: Sequence[int]) -> str:
    """Per-block r, run-length: ``16 x11, 10`` for [16] * 11 + [10]; the form every command prints."""
    runs: list[list[int]] = []
    for value in r:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return ", ".join(f"{value} x{count}" if count > 1 else str(value) for value, count in runs)

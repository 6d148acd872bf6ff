"""Calibration for denoisers: choose every block's reduce mode by its damage to the final sample.

``run(policy)`` produces the samples of a policy from fixed noise (the caller owns model, sampler and noise); the
unreduced samples (``DensePolicy({})``) are the reference. Damage is PSNR against them (higher is better).

1. start from the best uniform mode (every candidate block reduced ``ratio`` with prune, mean or MLERP);
2. one pass of coordinate descent over the blocks: give a block another mode when that raises the PSNR of the
   samples with every other block as chosen (the blocks interact, so this is measured on the whole model);
3. with ``min_psnr``, blocks stop reducing, the most damaging first (its single-block damage under its chosen
   mode), until the samples reach ``min_psnr`` dB: the speed given up for fidelity (a floor that only reducing no
   block at all meets is unreachable: the error names the least damaging block's PSNR);
4. with ``speedup`` (``cost(policy)``: the step's predicted cost, e.g. FLOPs), a block stops reducing only while
   the predicted speed-up ``cost(unreduced) / cost(policy)`` stays at least ``speedup``: with ``speedup`` alone,
   blocks are dropped (most damaging first) as far as the speed budget allows; with both, the PSNR must be met
   inside the speed budget. A budget no policy meets is a ``UserError`` naming what is reachable.

Every choice costs one sampling run; ``Calibration.log`` lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from tofu_export.dense.metrics import mean_psnr, ssim
from tofu_export.dense.plan import BlockPlan, DensePolicy
from tofu_export.errors import Hint, UserError
from tofu_export.names import REDUCE_MODES, ReduceMode

if TYPE_CHECKING:
    from tofu_export.dense.measured import StepLatency

Run = Callable[[DensePolicy], Tensor]


@dataclass
class Calibration:
    policy: DensePolicy
    psnr: float
    ssim: float
    log: list[dict] = field(default_factory=list)
    measured: StepLatency | None = None  # the chosen policy's exported step timed against the unreduced one


def _score(run: Run, policy: DensePolicy, reference: Tensor, log: list[dict], step: str) -> float:
    value = mean_psnr(run(policy), reference)
    log.append({"step": step, "blocks": {k: f"{v.ratio:g}/{v.mode}" for k, v in policy.blocks.items()},
                "psnr": value})
    return value


def calibrate_denoiser(run: Run, blocks: Sequence[str], ratio: float, *, modes: Sequence[ReduceMode] = REDUCE_MODES,
                       min_psnr: float | None = None, speedup: float | None = None,
                       cost: Callable[[DensePolicy], float] | None = None, stride: int = 2,
                       seed: int | None = None, sublayers: Sequence[str] = ("self",)) -> Calibration:
    """A per-block policy for ``blocks`` at ``ratio``, reducing before ``sublayers`` (see the module docstring)."""
    if not blocks:
        raise UserError("no block to calibrate", hint=Hint("max_downsample", "2", "allow coarser levels"))
    if not 0 < ratio < 1:
        raise UserError(f"ratio {ratio} is out of range", hint=Hint("ratio", "0.5", "a fraction in (0, 1)"))

    def policy_of(choice: dict[str, ReduceMode]) -> DensePolicy:
        return DensePolicy({b: BlockPlan(ratio, m) for b, m in choice.items()}, stride, seed, sublayers=sublayers)

    fast = _speed_budget(cost, policy_of, blocks, ratio, speedup) if speedup is not None else None
    reference = run(policy_of({}))
    log: list[dict] = []
    uniform = {m: _score(run, policy_of(dict.fromkeys(blocks, m)), reference, log, f"uniform {m}") for m in modes}
    best_mode = max(uniform, key=uniform.__getitem__)
    choice, best = dict.fromkeys(blocks, best_mode), uniform[best_mode]
    for block in blocks:
        for mode in modes:
            if mode == choice[block]:
                continue
            trial = {**choice, block: mode}
            value = _score(run, policy_of(trial), reference, log, f"{block} -> {mode}")
            if value > best:
                choice, best = trial, value
    if (min_psnr is not None and best < min_psnr) or (fast is not None and min_psnr is None):
        damage = {b: _score(run, policy_of({b: choice[b]}), reference, log, f"alone {b}") for b in choice}
        for block in sorted(damage, key=damage.__getitem__):  # lowest PSNR alone = most damaging first
            if min_psnr is not None and best >= min_psnr:
                break
            trial = {k: v for k, v in choice.items() if k != block}
            if fast is not None and not fast(policy_of(trial)):
                continue  # dropping it would leave the speed budget
            choice = trial
            best = _score(run, policy_of(choice), reference, log, f"drop {block}") if choice else float("inf")
        if min_psnr is not None and (best < min_psnr or not choice):
            _unreachable(min_psnr, best if choice else max(damage.values()), ratio, speedup)
    policy = policy_of(choice)
    samples = run(policy)
    policy.notes = {"ratio": ratio, "calibration_psnr": mean_psnr(samples, reference), "min_psnr": min_psnr,
                    "runs": len(log) + 2}
    if fast is not None:
        policy.notes |= {"speedup_budget": speedup, "predicted_speedup": fast.speedup(policy)}
    return Calibration(policy, mean_psnr(samples, reference), float(ssim(samples, reference).mean()), log)


def _unreachable(min_psnr: float, reachable: float, ratio: float, speedup: float | None) -> None:
    """The ``UserError`` for a PSNR floor no reducing policy meets (reducing nothing is not a policy)."""
    where = (f"at a predicted speed-up of {speedup:g}x: the best policy inside that budget" if speedup is not None
             else f"with any block reducing {ratio:g} of its tokens: the least damaging block alone")
    floor = math.floor(reachable * 10) / 10
    raise UserError(f"{min_psnr:g} dB is not reachable {where} keeps {reachable:.2f} dB",
                    hint=Hint("min_psnr", f"{floor:.1f}"))


class _SpeedBudget:
    """``budget(policy)``: whether ``policy``'s predicted speed-up over the unreduced step is at least ``target``."""

    def __init__(self, cost: Callable[[DensePolicy], float], base: float, target: float) -> None:
        self.cost, self.base, self.target = cost, base, target

    def speedup(self, policy: DensePolicy) -> float:
        return self.base / self.cost(policy)

    def __call__(self, policy: DensePolicy) -> bool:
        return self.speedup(policy) >= self.target


def _speed_budget(cost, policy_of, blocks: Sequence[str], ratio: float, speedup: float) -> _SpeedBudget:
    """The budget, or a ``UserError`` naming the largest predicted speed-up (every block reduced at ``ratio``)."""
    if cost is None:
        raise UserError("a speed-up budget needs a cost model for this denoiser")
    if speedup <= 1.0:
        raise UserError(f"speed-up {speedup:g} must be above 1", hint=Hint("speedup", "1.1"))
    budget = _SpeedBudget(cost, cost(policy_of({})), speedup)
    reachable = budget.speedup(policy_of(dict.fromkeys(blocks, "mean")))
    if reachable <= 1.0:
        raise UserError(f"reducing tokens does not speed this step up at ratio {ratio:g} (predicted {reachable:.3f}x "
                        "with every candidate block reducing: the matching costs more than it saves)",
                        hint=Hint("ratio", None, "a larger ratio, or finer (larger) samples"))
    if reachable < speedup:
        raise UserError(f"a predicted speed-up of {speedup:g}x is not reachable at ratio {ratio:g}: reducing every "
                        f"candidate block gives {reachable:.3f}x", hint=Hint("speedup", f"{reachable:.3f}"))
    return budget

"""Calibration for denoisers: choose every block's reduce mode by its damage to the final sample.

``run(policy)`` produces the samples of a policy from fixed noise (the caller owns model, sampler and noise); the
unreduced samples (``DensePolicy({})``) are the reference. Damage is PSNR against them (higher is better).

1. start from the best uniform mode (every candidate block reduced ``ratio`` with prune, mean or MLERP);
2. one pass of coordinate descent over the blocks: give a block another mode when that raises the PSNR of the
   samples with every other block as chosen (the blocks interact, so this is measured on the whole model);
3. with ``min_psnr``, blocks stop reducing, the most damaging first (its single-block damage under its chosen
   mode), until the samples reach ``min_psnr`` dB: the speed given up for fidelity.

Every choice costs one sampling run; ``Calibration.log`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from tofu_export.dense.metrics import mean_psnr, ssim
from tofu_export.dense.plan import BlockPlan, DensePolicy
from tofu_export.errors import Hint, UserError
from tofu_export.merge import REDUCE_MODES, ReduceMode

Run = Callable[[DensePolicy], Tensor]


@dataclass
class Calibration:
    policy: DensePolicy
    psnr: float
    ssim: float
    log: list[dict] = field(default_factory=list)


def _score(run: Run, policy: DensePolicy, reference: Tensor, log: list[dict], step: str) -> float:
    value = mean_psnr(run(policy), reference)
    log.append({"step": step, "blocks": {k: f"{v.ratio:g}/{v.mode}" for k, v in policy.blocks.items()},
                "psnr": value})
    return value


def calibrate_denoiser(run: Run, blocks: Sequence[str], ratio: float, *, modes: Sequence[ReduceMode] = REDUCE_MODES,
                       min_psnr: float | None = None, stride: int = 2, seed: int | None = None) -> Calibration:
    """A per-block policy for ``blocks`` at ``ratio`` (see the module docstring)."""
    if not blocks:
        raise UserError("no block to calibrate", hint=Hint("max_downsample", "2", "allow coarser levels"))
    if not 0 < ratio < 1:
        raise UserError(f"ratio {ratio} is out of range", hint=Hint("ratio", "0.5", "a fraction in (0, 1)"))
    reference = run(DensePolicy({}, stride, seed))
    log: list[dict] = []

    def policy_of(choice: dict[str, ReduceMode]) -> DensePolicy:
        return DensePolicy({b: BlockPlan(ratio, m) for b, m in choice.items()}, stride, seed)

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
    if min_psnr is not None and best < min_psnr:
        damage = {b: _score(run, policy_of({b: choice[b]}), reference, log, f"alone {b}") for b in choice}
        for block in sorted(damage, key=damage.__getitem__):  # lowest PSNR alone = most damaging first
            del choice[block]
            best = _score(run, policy_of(choice), reference, log, f"drop {block}") if choice else float("inf")
            if best >= min_psnr:
                break
    policy = policy_of(choice)
    samples = run(policy)
    policy.notes = {"ratio": ratio, "calibration_psnr": mean_psnr(samples, reference), "min_psnr": min_psnr,
                    "runs": len(log) + 2}
    return Calibration(policy, mean_psnr(samples, reference), float(ssim(samples, reference).mean()), log)

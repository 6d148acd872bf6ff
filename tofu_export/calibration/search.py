"""Measure a model on the user's images once (``measure``), then search for a ToFu policy under a budget
(``choose_policy``); ``calibrate`` does both.

    images, source = load_images("data/fashion-mnist", model, 64)
    policy = calibrate(model, images, r=16, budget=Budget(min_cosine=0.995), source=source)
    policy.save("policy.json"); plot_policy(policy, "policy.png")

    measured = measure(model, images, r=24)           # measure once, then choose for several budgets
    policies = [choose_policy(measured, Budget(speedup=s)) for s in (1.2, 1.5)]

Stages (a progress bar on stderr follows them): one unreduced pass keeping every block's input and the linearity
criterion (``trace``); the damage of reducing in each block alone per mode, measured at r and 2r and derived at
r/2 and 3r/2, on at most ``images.DAMAGE_IMAGES`` of the search images (``damage``); one-block latencies per mode
on the backend (``latency``); the Pareto front over per-block modes and r in {0, r/2, r, 3r/2, 2r} and the budget's
pick (``select``); and a verification that runs the chosen policy on the images and records the measured cosine
beside the predicted one. Under a latency budget the prediction only shortlists: the front's nearest candidates and
the uniform and stepped policies within the budget are each run once on the search images, the best few again on
the confirm images where there are any, and the best measured wins (``shortlist``). Under a fidelity floor the
front's and the stepped policies' nearest on both sides of the predicted floor are run, fastest predicted first,
then each ladder is bisected between its measured passes and misses, and the fastest measuring at least the floor
wins (``floor``).

Two rules choose a block's mode: ``"damage"`` (the default: the search picks the mode by its measured damage) and
``"linearity"`` (the paper's criterion: prune where the block's mean criterion exceeds ``linearity_threshold``,
MLERP elsewhere; the search then picks only r). The measurements record the mode each rule names per block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tofu_export.calibration.damage import damage_by_r, damage_trace, verify
from tofu_export.calibration.floor import floor_choice
from tofu_export.calibration.images import DAMAGE_IMAGES, check_damage_images
from tofu_export.calibration.latency import measure_block_latency, sample_token_counts
from tofu_export.calibration.linearity import LINEARITY_THRESHOLD, linearity_modes
from tofu_export.calibration.measured import ExportSettings, split_held_out
from tofu_export.calibration.select import Budget, Candidate, check_rule, pareto_front, r_choices
from tofu_export.calibration.shortlist import measured_choice
from tofu_export.calibration.state import Calibration
from tofu_export.calibration.trace import reference_pass, trace
from tofu_export.calibration.versus_tome import timed_against_tome
from tofu_export.errors import Hint, UserError
from tofu_export.evaluation.metrics import cosine_standard_error
from tofu_export.models.family import family_of, unpatched
from tofu_export.names import REDUCE_MODES
from tofu_export.policy import Policy, model_record
from tofu_export.profiling.timing import clock_threads
from tofu_export.progress import Progress, tracker
from tofu_export.schedule import max_reduction, plan_tokens


def check_images(model: nn.Module, images: Tensor) -> None:
    """``images`` must be ``[B, 3, H, W]`` float at the model's input size."""
    size = family_of(model).img_size(model)
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        got = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise UserError(f"calibration images must be a float tensor [B, 3, H, W], got {got}")
    if tuple(images.shape[2:]) != size:
        raise UserError(f"calibration images are {list(images.shape[2:])} but the model takes {list(size)}",
                        hint=Hint("img_size", str(images.shape[2])))


def choose_policy(calibration: Calibration, budget: Budget, progress: bool = False, *,
                  measure_latency: bool = True, rounds: int = 20, rule: str = "damage") -> Policy:
    """The budget's pick from ``calibration``: under a latency budget the best measured of the shortlist
    (``shortlist``); under a fidelity floor the fastest predicted candidate measured to keep the floor
    (``floor``). Then checked once on the held-out images and, with ``measure_latency``, timed on
    its exported graph against the unreduced one and ToMe (``rounds`` interleaved rounds); the measurements are
    recorded beside the predictions. ``rule`` chooses the modes (module docstring)."""
    check_rule(rule)
    shortlisted = budget.min_cosine is None
    searching = ("calibrate: measuring the shortlisted policies on the search images" if shortlisted else
                 "calibrate: measuring the candidates around the floor")
    with tracker(searching, 0, enabled=progress, announce=True) as bar:
        if shortlisted:
            chosen, attempts, choice = measured_choice(calibration, budget, rule, on_step=bar.advance)
        else:
            chosen, attempts, choice = floor_choice(calibration, budget, rule, on_step=bar.advance)
        return _finish(calibration, chosen, budget, rule, attempts, choice, measure_latency, rounds, bar)


def _finish(calibration: Calibration, chosen: Candidate, budget: Budget, rule: str, attempts: list[dict],
            extra: dict, measure_latency: bool, rounds: int, bar: Progress) -> Policy:
    """The chosen policy with its measurements: held-out cosine and, with ``measure_latency``, its exported graph
    timed against the unreduced one and ToMe, ``bar`` following the exports and the timed rounds as two stages."""
    cal = calibration
    held = cal.held_out if cal.held_out is not None else cal.trace.reference[:0]
    per_image = cal.held_out_cosines(chosen.modes, chosen.r)  # [held]
    measurements = dict(cal.measurements(), rule=rule, predicted_cosine=attempts[-1]["predicted_cosine"],
                        measured_cosine=attempts[-1]["measured_cosine"], predicted_ms=chosen.latency_ms,
                        predicted_speedup=cal.baseline_ms / chosen.latency_ms, attempts=attempts,
                        held_out_images=len(held), **extra,
                        held_out_cosine=sum(per_image) / len(per_image) if per_image else None,
                        held_out_standard_error=held_out_error(per_image))
    if measure_latency:
        timed = "calibrate: the chosen policy's graph exported and timed: "

        def exporting(graphs: int) -> None:  # the exports take most of the time: a stage each, so the ETA holds
            bar.stage(f"{timed}exporting it, the unreduced model and ToMe at {graphs - 2} r", graphs)

        measurements.update(timed_against_tome(
            cal, chosen, held, per_image, rounds, on_step=bar.advance, on_exporting=exporting,
            on_timing=lambda: bar.stage(f"{timed}{rounds} interleaved rounds", rounds)))
    return Policy(chosen.modes, chosen.r, model_record(cal.model), dict(cal.record, budget=budget.to_dict()),
                  measurements)


def held_out_error(per_image: list[float]) -> float | None:
    """The standard error of the held-out mean cosine (``evaluation.metrics.cosine_standard_error``; None for fewer
    than two images)."""
    return cosine_standard_error(torch.tensor(per_image)) if len(per_image) > 1 else None


def measure(
    model: nn.Module,
    images: Tensor,
    *,
    r: int = 16,
    provider: str = "cpu",
    threads: int | None = None,
    prop_attn: bool = True,
    source: dict | None = None,
    progress: bool = True,
    holdout: float = 0.25,
    settings: ExportSettings | None = None,
    linearity_threshold: float = LINEARITY_THRESHOLD,
    clock: str = "wall",
    confirm: Tensor | None = None,
    damage_images: int | None = DAMAGE_IMAGES,
) -> Calibration:
    """Measure ``model`` (a plain timm ViT; a patched one is unpatched first) on ``images [B, 3, H, W]``: every
    stage of the module docstring but the choice. ``r`` is the tokens a reducing block removes; ``provider`` and
    ``threads`` choose the ONNX Runtime backend the latencies are measured on; ``source`` describes the images.
    ``holdout`` of the images (an even spread) are kept out of the search and checked once on the final choice;
    ``settings`` is how the user exports (exporter, opset, simplification), for the measured latency. ``confirm``
    ``[C, 3, H, W]``: more images, on which the search's best few candidates are run again before one is chosen
    (``shortlist.confirmed_choice``, ``floor.confirmed_floor``); only their unreduced pass is taken here.
    ``damage_images``: how many of the search images (an even spread) the damage per block and the anchors are
    measured on (None: all; ``images.DAMAGE_IMAGES``); every candidate a search runs is run on all of them."""
    from tofu_export import __version__

    family = family_of(model)
    model.eval()
    check_images(model, images)
    if confirm is not None:
        check_images(model, confirm)
    threads = clock_threads(clock, threads)
    check_damage_images(damage_images)
    images, held_out = split_held_out(images, holdout)
    depth, prefix, tokens0 = family.depth(model), family.num_prefix(model), family.num_tokens(model)
    if not 0 < r <= max_reduction(tokens0, prefix):
        limit = max_reduction(tokens0, prefix)
        raise UserError(f"r must lie in [1, {limit}] for this model ({tokens0} tokens, {prefix} protected), got {r}",
                        hint=Hint("r", "16" if limit >= 16 else str(limit)))
    counts = sample_token_counts(tokens0, prefix, r, depth)
    rounds = 40
    choices = tuple(k for k in r_choices(r) if k <= max_reduction(tokens0, prefix))
    measured_r = tuple(sorted({r, max(choices)}))  # every mode at r, a subset at the largest (damage.damage_by_r)
    first = "calibrate: unreduced pass (every block's input, the linearity test)"
    with torch.no_grad(), tracker(first, 1, enabled=progress, announce=True) as bar, unpatched(model):
        tr = trace(model, images, r)
        on = damage_trace(tr, damage_images)  # [D <= B] the damage images, with every block's input
        tr = tr.first_block_only()  # past the damage, running a policy needs only block 0's input
        at_top = 2 if max(choices) > r else 0  # at most two modes a block at the largest r; exact once known
        bar.stage("calibrate: damage per block, mode and r", depth * (len(REDUCE_MODES) + at_top))
        by_linearity = linearity_modes(tr.linearity, linearity_threshold)
        damage = damage_by_r(model, on, choices, r, also=by_linearity, prop_attn=prop_attn, on_step=bar.advance,
                             on_total=bar.resize)
        bar.stage("calibrate: latency per block and mode: exporting one-block graphs", 1 + len(counts) * 5)
        timing = f"calibrate: latency per block and mode: {rounds} interleaved rounds"
        latency = measure_block_latency(model, r, tr.inputs[0], images[:1], provider=provider, threads=threads,
                                        rounds=rounds, prop_attn=prop_attn, settings=settings, clock=clock,
                                        on_step=bar.advance, on_timing=lambda: bar.stage(timing, rounds))
        baseline_ms = latency.predict_ms(tokens0, prefix, [0] * depth, ["mean"] * depth)
        confirmed = None if confirm is None or not len(confirm) else reference_pass(model, confirm)
        bar.stage("calibrate: every mode in every block", len(REDUCE_MODES))
        # Anchors: each mode in every block, really run. Damage compounds (pruning in every block does several
        # times the sum of its single-block damages), so each mode's single-block damages are scaled by its
        # anchor's measured / summed damage before they are added up.
        uniform = {}
        uniform_r = plan_tokens(tokens0, prefix, [r] * depth, warn=False).r
        for mode in REDUCE_MODES:
            ms = latency.predict_ms(tokens0, prefix, uniform_r, [mode] * depth)
            summed = sum(damage[mode][r][i] for i, k in enumerate(uniform_r) if k)  # at r, as every block is timed
            measured = verify(model, on, [mode] * depth, uniform_r, prop_attn)  # on the damage's images
            uniform[mode] = {"r": uniform_r, "predicted_cosine": 1.0 - summed, "measured_cosine": measured,
                             "predicted_ms": ms, "compounding": (1.0 - measured) / max(summed, 1e-12)}
            bar.advance()
    confirm_count = 0 if confirmed is None else len(confirmed.reference)
    record = {"images": dict(source or {}, count=int(images.shape[0]) + len(held_out), held_out=len(held_out),
                             confirm=confirm_count, damage=len(on.reference)),
              "tool": f"tofu-export {__version__}", "backend": latency.backend, "threads": threads,
              "prop_attn": prop_attn}
    calibration = Calibration(model, tr, r, damage, latency, uniform, {}, baseline_ms, prop_attn, record, held_out,
                              settings or ExportSettings(), provider, threads, measured_r, clock, linearity_threshold,
                              confirmed)
    scaled = calibration.scaled_damage()
    calibration.fronts = {"damage": pareto_front(scaled, latency, tokens0, prefix),
                          "linearity": pareto_front(scaled, latency, tokens0, prefix, [[m] for m in by_linearity])}
    return calibration


def calibrate(
    model: nn.Module,
    images: Tensor,
    *,
    r: int = 16,
    budget: Budget | None = None,
    provider: str = "cpu",
    threads: int | None = None,
    prop_attn: bool = True,
    source: dict | None = None,
    progress: bool = True,
    holdout: float = 0.25,
    settings: ExportSettings | None = None,
    clock: str = "wall",
    rule: str = "damage",
    linearity_threshold: float = LINEARITY_THRESHOLD,
    confirm: Tensor | None = None,
    damage_images: int | None = DAMAGE_IMAGES,
) -> Policy:
    """``measure`` then ``choose_policy``: the verified ``Policy`` the ``budget`` (default:
    ``min_cosine=0.995``) picks, its latency measured on its exported graph. Writes nothing."""
    check_rule(rule)  # before the measurements, not after them
    calibration = measure(model, images, r=r, provider=provider, threads=threads, prop_attn=prop_attn,
                          source=source, progress=progress, holdout=holdout, settings=settings, clock=clock,
                          linearity_threshold=linearity_threshold, confirm=confirm, damage_images=damage_images)
    return choose_policy(calibration, budget or Budget(min_cosine=0.995), progress=progress, rule=rule)

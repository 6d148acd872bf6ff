"""The calibrated policy against ToMe at the policy's own measured latency, not at the same r.

ToMe is exported at three uniform r values around the one whose predicted latency is nearest the policy's
(``measured.tome_bracket``) and timed in the same interleaved rounds as the policy and the unreduced graph
(``measured.measure_policy_latency``); its cosine (on the search images and on the held-out ones) at those r is
interpolated linearly between the two nearest at the policy's measured speed-up (``measured.at_speedup``), so the
two are compared at equal measured speed; on the held-out images the comparison is also made image by image, for
the standard error of the policy's lead (``held_out_vs_tome``). ``better_tome`` names the one of those ToMe graphs,
if any, that measured at least as fast as the policy and closer to the unreduced model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from tofu_export.calibration.damage import verify
from tofu_export.calibration.measured import at_speedup, measure_policy_latency, tome_bracket
from tofu_export.calibration.select import Candidate
from tofu_export.evaluation.metrics import paired_difference
from tofu_export.models.family import family_of
from tofu_export.schedule import max_reduction, plan_tokens

if TYPE_CHECKING:
    from tofu_export.calibration.state import Calibration


def timed_against_tome(calibration: Calibration, chosen: Candidate, held: Tensor, held_cosines: Sequence[float],
                       rounds: int, on_step: Callable[[], None] | None = None,
                       on_timing: Callable[[], None] | None = None,
                       on_exporting: Callable[[int], None] | None = None) -> dict:
    """The chosen policy timed on its exported graph against the unreduced one and ToMe at three uniform r around
    its predicted latency (every graph run on the first held-out image; noise where none is held out); ToMe's
    cosines (search images; ``held [B', 3, H, W]``) interpolated at the policy's
    measured speed-up, and on the held-out images the policy's lead over that ToMe image by image
    (``held_cosines [B']``: the policy's) with its standard error (``held_out_vs_tome``). ``on_exporting`` once
    with the number of graphs to export (the policy, the unreduced model and ToMe's r: fewer than three where the
    model cannot remove that many tokens a block), ``on_step`` after each export and timed round, ``on_timing``
    once between the two."""
    c, model = calibration, calibration.model
    family = family_of(model)
    tokens0, prefix, depth = family.num_tokens(model), family.num_prefix(model), family.depth(model)

    def tome_r(k: int) -> list[int]:
        return plan_tokens(tokens0, prefix, [k] * depth, warn=False).r

    def tome_ms(k: int) -> float:
        return c.latency.predict_ms(tokens0, prefix, tome_r(k), ["mean"] * depth)

    bracket = tome_bracket(tome_ms, chosen.latency_ms, max_reduction(tokens0, prefix), max(2, c.r // 4))
    if on_exporting is not None:
        on_exporting(2 + len(bracket))
    measured = measure_policy_latency(model, chosen.modes, chosen.r, prop_attn=c.prop_attn, settings=c.settings,
                                      provider=c.provider, threads=c.threads, rounds=rounds, clock=c.clock,
                                      tome_r=bracket, image=held[:1] if len(held) else None, on_step=on_step,
                                      on_timing=on_timing)
    speedups = [measured.tome_speedup[k] for k in bracket]
    tome: dict = {"r": list(bracket), "measured_speedup": speedups}
    means = ["mean"] * depth
    cosines = {"cosine": [verify(model, c.trace, means, tome_r(k), c.prop_attn) for k in bracket]}
    per_image = [c.held_out_cosines(means, tome_r(k)) for k in bracket]  # 3 x [B'], one unreduced pass shared
    if len(held):
        cosines["held_out_cosine"] = [sum(values) / len(values) for values in per_image]
    for key, values in cosines.items():
        tome[key], tome["extrapolated"] = at_speedup(speedups, values, measured.speedup)
        tome[f"{key}_at_r"] = values
    result = {"measured_latency": measured.to_dict(), "measured_speedup": measured.speedup,
              "tome_at_measured_speedup": tome}
    if len(held):  # ToMe image by image at the policy's speed (the same lines between the r), then paired
        at_speed = [at_speedup(speedups, pair, measured.speedup)[0] for pair in zip(*per_image, strict=True)]
        result["held_out_vs_tome"] = paired_difference(held_cosines, at_speed)
    return result


def better_tome(m: Mapping[str, Any]) -> dict | None:
    """ToMe at one of the r timed beside the policy (``m``: its measurements) that measured at least as fast as
    the policy and kept more of the output on the held-out images (the search images where none were held out):
    ``{"r", "measured_speedup", "cosine", "policy_cosine", "images"}`` (the fastest such r), or None. Where it exists
    the calibration's own measurements say plain ToMe is the better export (with few images, possibly noise)."""
    tome, speed = m.get("tome_at_measured_speedup"), m.get("measured_speedup")
    if not tome or speed is None:
        return None
    if m.get("held_out_cosine") is not None and "held_out_cosine_at_r" in tome:
        mine, theirs, images = m["held_out_cosine"], tome["held_out_cosine_at_r"], "held-out"
    else:
        mine, theirs, images = m["measured_cosine"], tome["cosine_at_r"], "calibration"
    better = [(k, s, c) for k, s, c in zip(tome["r"], tome["measured_speedup"], theirs, strict=True)
              if s >= speed and c > mine]
    if not better:
        return None
    k, faster, cosine = max(better, key=lambda x: x[1])
    return {"r": k, "measured_speedup": faster, "cosine": cosine, "policy_cosine": mine, "images": images}

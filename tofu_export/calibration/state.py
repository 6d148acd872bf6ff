"""``Calibration``: everything ``search.measure`` measured on one model and image set, read by the searches that
choose a policy from it (``shortlist``, ``floor``, ``versus_tome``, ``search.choose_policy``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from tofu_export.calibration.damage import policy_cosines
from tofu_export.calibration.latency_model import BlockLatency
from tofu_export.calibration.linearity import LINEARITY_THRESHOLD, linearity_modes
from tofu_export.calibration.measured import ExportSettings
from tofu_export.calibration.select import Candidate
from tofu_export.calibration.trace import Trace, reference_pass
from tofu_export.models.family import unpatched


@dataclass
class Calibration:
    """Everything measured on one model and image set; ``search.choose_policy`` chooses and verifies a policy
    from it."""

    model: nn.Module
    trace: Trace
    r: int
    damage: dict[str, dict[int, list[float]]]  # mode -> tokens removed -> [depth] single-block damage
    latency: BlockLatency
    uniform: dict[str, dict]  # mode -> the anchor policy (mode everywhere at r): predicted and measured
    fronts: dict[str, list[Candidate]]  # rule -> Pareto front of the compounding-scaled prediction
    baseline_ms: float  # predicted latency without reduction
    prop_attn: bool
    record: dict  # images, tool, backend: the policy's source record (the budget is added per policy)
    held_out: Tensor | None = None  # [B', 3, H, W] images the search never saw (checked on the final choice)
    settings: ExportSettings | None = None  # how the user's graphs are exported (the measured latency's)
    provider: str = "cpu"
    threads: int | None = None
    measured_r: tuple[int, ...] = ()  # the counts damage was measured at (the others derived)
    clock: str = "wall"  # how latencies are timed (measured.CLOCKS)
    linearity_threshold: float = LINEARITY_THRESHOLD
    confirm: Trace | None = None  # more images (block 0's input, the reference) the search's best run again on

    @cached_property
    def held_out_reference(self) -> Trace | None:
        """The unreduced pass over the held-out images (block 0's input and the reference), run once however many
        policies are checked on them (the choice, ToMe at three r); None where none are held out."""
        if self.held_out is None or not len(self.held_out):
            return None
        with unpatched(self.model):
            return reference_pass(self.model, self.held_out)

    def held_out_cosines(self, modes: Sequence[str], r: Sequence[int]) -> list[float]:
        """Per-image cosine ``[held]`` of the policy ``(modes, r)`` on the held-out images to the unreduced model
        (``damage.policy_cosines`` on ``held_out_reference``); ``[]`` where none are held out."""
        reference = self.held_out_reference
        return [] if reference is None else policy_cosines(self.model, reference, modes, r, self.prop_attn).tolist()

    @property
    def front(self) -> list[Candidate]:
        """The default rule's front."""
        return self.fronts["damage"]

    def measurements(self) -> dict:
        linearity = [{"mean": float(x.mean()), "median": float(x.median()),
                      "p90": float(torch.quantile(x.flatten(), 0.9))} for x in self.trace.linearity]
        return {
            "r": self.r,
            "linearity": linearity,
            "linearity_definition": "||f((y1+y2)/2) - (f(y1)+f(y2))/2|| / ||f(y1)-f(y2)||, f = the block's MLP "
                                    "residual y + ls2(mlp(norm2(y))), on the r pairs the block's matching takes "
                                    "(unreduced model)",
            "damage": {m: by_r[self.r] for m, by_r in self.damage.items()},
            "damage_definition": "1 - mean cosine of the pooled output to the unreduced model's when only this "
                                 "block removes r tokens with this mode, over the damage images (an even spread of "
                                 "the search images; how many: the source record's images.damage)",
            "damage_by_r": {m: {str(k): v for k, v in by_r.items()} for m, by_r in self.damage.items()},
            "damage_measured_at": list(self.measured_r),
            "damage_derived": "every mode measured at r; at the largest count only the mode least damaging at r "
                              "and the linearity rule's where it is the other kind (prune against the merges), the "
                              "others with that block's growth exponent (of their own kind where measured); counts "
                              "in between by a power law through the two nearest, exponent >= 1 "
                              "(calibration.damage.damage_by_r)",
            "rule_modes": self.rule_modes(),
            "linearity_threshold": self.linearity_threshold,
            "latency": self.latency.to_dict(),
            "baseline_ms": self.baseline_ms,
            "uniform": self.uniform,
            "prediction": "damage = sum over reducing blocks of single-block damage x the mode's compounding factor "
                          "(uniform policy measured / summed, both on the damage images)",
            "front": [{"predicted_damage": c.damage, "predicted_ms": c.latency_ms} for c in self.front],
            "r_choices": sorted({k for by_r in self.damage.values() for k in by_r} | {0}),
        }

    def rule_modes(self) -> dict[str, list[str]]:
        """Per rule, the mode it names per block: the least damaging at r; the paper's criterion."""
        depth = len(self.trace.linearity)
        return {"damage": [min(self.damage, key=lambda m, i=i: self.damage[m][self.r][i]) for i in range(depth)],
                "linearity": linearity_modes(self.trace.linearity, self.linearity_threshold)}

    def scaled_damage(self) -> dict[str, dict[int, list[float]]]:
        """The single-block damages the front adds up: each mode's scaled by its anchor's compounding (>= 1)."""
        return {m: {k: [max(d, 0.0) * max(self.uniform[m]["compounding"], 1.0) for d in values]
                    for k, values in by_r.items()} for m, by_r in self.damage.items()}

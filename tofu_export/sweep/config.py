"""What a sweep runs and how it times it: one ``SweepConfig``, and a rough estimate of its run time."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tofu_export.class_names import ZeroShot
from tofu_export.config import OnnxConfig, ToFuConfig
from tofu_export.errors import Hint, UserError
from tofu_export.jobs.profile import Backend
from tofu_export.policy import Policy
from tofu_export.sweep.state import BASELINE, SweepPoint

POLICY = "policy"  # the mode name of a calibrated policy's point


@dataclass(frozen=True)
class SweepConfig:
    """The points (``modes`` x ``r_values``, plus a calibrated ``policy``), how each is exported (``template``: the
    settings shared by all points; ``onnx``), where and how it is timed, and what it is scored on.

    ``interleave``: time every point round-robin in one process after all are exported (a slow spell of a shared
    machine then hits all points alike); off: each point is timed alone, right after its export. ``batch``: the
    images per timed run (a GPU's speed-up from fewer tokens shows at larger batches than a CPU's).
    """

    r_values: tuple[int, ...] = (0, 4, 8, 12, 16)
    modes: tuple[str, ...] = ("tome", "prune", "mlerp", "tofu")
    backend: Backend = field(default_factory=lambda: Backend("ort"))
    iters: int = 30
    batch: int = 1
    threads: int | None = None
    spinning: bool = True
    interleave: bool = True
    data: Path | None = None
    limit: int | None = None
    template: ToFuConfig = field(default_factory=ToFuConfig)
    policy: Policy | None = None
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    arch: str | None = None
    trust_pickle: bool = False
    num_heads: int | None = None  # where the checkpoint does not state them
    zero_shot: ZeroShot | None = None  # score the points as zero-shot classifiers (a two-tower checkpoint)

    def __post_init__(self) -> None:
        if self.zero_shot is not None and self.data is None:
            raise UserError("zero-shot classification scores every point on images: it needs an image folder",
                            hint=Hint("data", "FOLDER"))
        for name, value in (("iters", self.iters), ("batch", self.batch)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}", hint=Hint(name, "1"))
        for mode in self.modes:  # an unknown mode fails here, before anything is loaded, exported or made
            ToFuConfig(mode=mode)

    def points(self) -> list[SweepPoint]:
        """One ``baseline`` point for r = 0 (when asked for), each mode's r > 0 points, then the policy's point."""
        points = sweep_points(self.modes, self.r_values)
        if self.policy is not None:
            points.append(SweepPoint(POLICY, round(sum(self.policy.r) / len(self.policy.r))))
        return points

    def tofu_for(self, point: SweepPoint) -> ToFuConfig:
        """The token-reduction settings of one point (r = 0: the same graph in every mode)."""
        if point.mode == POLICY:
            return dataclasses.replace(self.template, policy=self.policy)
        mode = self.modes[0] if point.mode == BASELINE else point.mode
        return dataclasses.replace(self.template, r=point.r, mode=mode)

    def export_key(self) -> str:
        """What makes the exports differ besides the point (the checkpoint and tool version are added by the job)."""
        key = f"prune_layers={self.template.prune_layers}:prop_attn={self.template.prop_attn}:{self.onnx}"
        if self.backend.name == "trt":
            key += ":engine"
        if self.policy is not None:  # a different policy file is a different graph
            key += ":policy=" + hashlib.sha256(json.dumps(self.policy.to_dict(), sort_keys=True).encode()).hexdigest()
        return key

    def measured_as(self) -> str:
        """How finished points were measured: reused only when measured the same way."""
        timing = "interleaved" if self.interleave else f"spinning={self.spinning}"
        graphs = ", CUDA graphs" if self.backend.cuda_graphs else ""  # absent before CUDA graphs: old records match
        batch = f", batch={self.batch}" if self.batch != 1 else ""  # likewise
        fed = ", timed on its images" if self.data is not None else ""  # before, on noise: those are timed again
        zero = self.zero_shot
        scored = "" if zero is None else f", zero-shot {list(zero.prompts)} names={zero.names_file}"  # likewise
        return (f"{self.backend.name}:{self.backend.device}{graphs}, {timing}, threads={self.threads}, "
                f"iters={self.iters}{batch}, data={self.data}, limit={self.limit}{fed}{scored}")


def sweep_points(modes: Sequence[str], r_values: Sequence[int]) -> list[SweepPoint]:
    """One ``baseline`` point for r = 0 (when asked for), then each mode's r > 0 points."""
    baseline = [SweepPoint(BASELINE, 0)] if 0 in r_values else []
    return baseline + [SweepPoint(mode, r) for mode in modes for r in r_values if r != 0]


def estimate_seconds(config: SweepConfig, *, to_export: int, forward_ms: float, images: int = 0,
                     busy: float = 1.0, workers: int = 1) -> float:
    """A rough run time: each new export (a fixed cost for tracing and simplifying plus ~40 forward passes for the
    parity check and shape inference), ``workers`` of them at a time, each point's ``iters`` timed runs and as many
    untimed ones, and the scoring of ``images`` per point by the graph and the reference. ``forward_ms``: one batch-1
    forward pass of the unreduced model measured here, now; ``busy``: the load average per core when it is over 1
    (other work shares the cores: the exports' fixed cost slows down by as much; a 2-core machine at load 14 took
    ~7x the idle time here)."""
    fixed = (12.0 if config.onnx.exporter == "dynamo" else 4.0) * max(busy, 1.0)
    points = len(config.points())
    export = math.ceil(to_export / max(workers, 1)) * (fixed + 40 * forward_ms / 1e3)
    timing = points * 2 * (config.iters + 5) * forward_ms * config.batch / 1e3  # a batch: about batch x the time
    scoring = points * 2 * images * forward_ms / 1e3
    return export + timing + scoring

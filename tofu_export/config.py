"""What to do to a model, said once: ``ToFuConfig`` (how to reduce tokens) and the export settings around it.

A ``ToFuConfig`` is resolved against a model exactly once, into a ``ResolvedToFu`` (r and reduce mode per block and
the static ``TokenPlan``); everything downstream (patching, the manifest, reports) reads that. How many tokens a
block can remove is decided in one place, ``schedule.plan_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from tofu_export.errors import Hint, UserError
from tofu_export.names import (
    DEFAULT_EXPORTER,
    DEFAULT_SIMPLIFIER,
    MODES,
    PRECISIONS,
    SIMPLIFIERS,
    Exporter,
    Precision,
    Simplifier,
)
from tofu_export.schedule import RSpec, ScheduleError, TokenPlan, layer_modes, parse_r, plan_tokens

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from tofu_export.policy import Policy

Target = Literal["onnx", "ort", "trt"]


@dataclass(frozen=True)
class ResolvedToFu:
    """A ``ToFuConfig`` applied to one model at one input size."""

    r: list[int]  # [depth] tokens asked to be removed per block
    modes: list[str]  # [depth] "prune" | "mean" | "mlerp"
    plan: TokenPlan  # tokens entering each block and the r each really removes
    img_size: int
    prop_attn: bool
    source: str  # "mode tofu" or "policy <path>", for manifests and reports

    def patch(self, model: nn.Module, *, static: bool = True) -> ResolvedToFu:
        """Patch ``model`` (the one this was resolved against) in place (``static``: fixed input size, ready for
        export); returns ``self``."""
        from tofu_export.models.family import family_of  # torch: not needed to check a configuration

        family_of(model).patch(model, self.r, self.modes, self.prop_attn, self.img_size if static else None,
                               plan=self.plan if static else None)  # the plan is made once, by resolve
        return self


@dataclass(frozen=True)
class ToFuConfig:
    """How to reduce tokens: an r schedule and a mode (or a measured per-block policy), and the input size.

    ``mode`` is one of ``MODES`` or one reduce mode per block; a ``policy`` (from ``tofu-export calibrate``)
    replaces both ``r`` and ``mode``.
    """

    r: RSpec = 16
    mode: str | Sequence[str] = "tofu"
    prune_layers: int | None = None
    prop_attn: bool = True
    img_size: int | None = None  # None: the model's own input size
    policy: Policy | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mode, str) and self.mode not in MODES:
            raise ScheduleError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}",
                                hint=Hint("mode", "tofu", f"one of {', '.join(MODES)}"))
        if self.prune_layers is not None and self.prune_layers < 0:
            raise ScheduleError(f"prune_layers must be >= 0, got {self.prune_layers}", hint=Hint("prune_layers"))
        if self.img_size is not None and self.img_size <= 0:
            raise UserError(f"the input size must be a positive number of pixels, got {self.img_size}",
                            hint=Hint("img_size"))

    @property
    def label(self) -> str:
        """A short name for file names and tables: ``tofu``, ``tome``, ``policy``."""
        if self.policy is not None:
            return "policy"
        return self.mode if isinstance(self.mode, str) else "custom"

    def resolve(self, model: nn.Module) -> ResolvedToFu:
        """Per-block r and modes and the token plan of ``model`` at ``img_size``; an r that the first block cannot
        remove is an error (later blocks are clipped to what they can remove, with a warning)."""
        from tofu_export.models.family import family_of

        family = family_of(model)
        depth, num_prefix = family.depth(model), family.num_prefix(model)
        img_size = self.img_size or int(family.img_size(model)[0])
        if self.policy is not None:
            self.policy.check_fits(model, img_size)
            r, modes = list(self.policy.r), list(self.policy.modes)
            source = "policy"
        else:
            r = parse_r(self.r, depth)
            modes = layer_modes(self.mode, depth, self.prune_layers)
            source = f"mode {self.label}"
        plan = plan_tokens(family.num_tokens(model, img_size), num_prefix, r, strict=False, warn=False)
        if plan.clipped and plan.clipped[0] == 0:
            limit = plan.r[0]
            raise ScheduleError(
                f"r={r[0]} is impossible for this model at this input size: the first block receives "
                f"{plan.tokens[0]} tokens ({num_prefix} protected) and one bipartite matching step "
                f"removes at most {limit} (typical: 8-16 for 224px ViT-S/B).",
                hint=Hint("r", str(limit), "or less"),
            )
        return ResolvedToFu(r, modes, plan, img_size, self.prop_attn, source)

    def patch(self, model: nn.Module, *, static: bool = True) -> ResolvedToFu:
        """Resolve against ``model`` and patch it in place (``static``: fixed input size, ready for export)."""
        return self.resolve(model).patch(model, static=static)


@dataclass(frozen=True)
class OnnxConfig:
    """How the ONNX graph is produced and verified."""

    opset: int | None = None  # None: the newest the TensorRT targets parse (tensorrt.targets.export_opset)
    simplify: bool = True
    tolerance: float = 1e-4  # max |ONNX - PyTorch|, relative to the output scale
    exporter: Exporter = DEFAULT_EXPORTER
    precision: Precision = "fp32"  # fp16: FP16 graph; int8: Q/DQ graph; see exporters.precision (rules, parity floors)
    simplifier: Simplifier = DEFAULT_SIMPLIFIER  # onnxslim | onnxsim | none (simplify=False is none)
    calibration_data: Path | None = None  # int8: a folder of images to calibrate on; None: synthetic, with a note

    def __post_init__(self) -> None:
        if self.opset is not None and not 13 <= self.opset <= 21:
            raise UserError(f"ONNX opset {self.opset} is outside the supported range 13-21",
                            hint=Hint("opset", "17", "16 for TensorRT 8.5 / JetPack 5"))
        if not self.tolerance > 0:
            raise UserError(f"the parity tolerance must be a positive number, got {self.tolerance}",
                            hint=Hint("tolerance", "1e-4"))
        if self.exporter not in ("torchscript", "dynamo"):
            raise UserError(f"unknown exporter {self.exporter!r}; choose torchscript or dynamo",
                            hint=Hint("exporter", "dynamo"))
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}",
                            hint=Hint("precision", "fp16"))
        if self.simplifier not in SIMPLIFIERS:
            raise UserError(f"unknown simplifier {self.simplifier!r}; choose one of {', '.join(SIMPLIFIERS)}",
                            hint=Hint("simplifier", "onnxslim"))


@dataclass(frozen=True)
class TrtConfig:
    """The TensorRT engine build: precision, the batch range of the optimisation profile, the workspace."""

    fp16: bool = False
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_gib: float = 2.0
    targets: tuple[str, ...] = ("10",)  # TensorRT releases the export is for (the check covers every known one)

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UserError(
                f"the TensorRT batch range must satisfy 1 <= min <= opt <= max, got min={self.min_batch}, "
                f"opt={self.opt_batch}, max={self.max_batch}", hint=Hint("min_batch"),
            )
        if not self.workspace_gib > 0:
            raise UserError(f"the TensorRT workspace must be positive, got {self.workspace_gib} GiB",
                            hint=Hint("workspace_gib", "2"))


@dataclass(frozen=True)
class ExportConfig:
    """Everything an export is told: the ToFu config, ONNX and TensorRT settings, and the output."""

    tofu: ToFuConfig = field(default_factory=ToFuConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    trt: TrtConfig = field(default_factory=TrtConfig)
    target: Target = "onnx"
    arch: str | None = None
    num_heads: int | None = None  # where the checkpoint does not state them
    trust_pickle: bool = False
    force: bool = False
    command: str = ""  # the command line that asked for this export, recorded in the manifest

    def __post_init__(self) -> None:
        if self.target not in ("onnx", "ort", "trt"):
            raise UserError(f"unknown target {self.target!r}; choose onnx, ort or trt", hint=Hint("target", "onnx"))
        if self.trt.fp16 and self.target != "trt":
            raise UserError("FP16 applies to TensorRT engines only; it would be ignored for this target",
                            hint=Hint("target", "trt", "FP16 is a TensorRT build setting"))
        if self.trt.fp16 and self.onnx.precision == "fp32":  # TensorRT >= 10 takes the precision from the graph
            object.__setattr__(self, "onnx", replace(self.onnx, precision="fp16"))

"""``manifest.json``: what an artifact folder holds and how it was made, as one typed record of typed sections.

Written by the export pipeline (``pipeline.build_manifest``), read back by the CLI summary, the sweep cache, ``eval``,
``check`` and reports, always through attributes. Every section is a ``Section``: a dataclass with ``to_dict`` (JSON
ready) and ``from_dict`` (which also accepts a section already typed); a section given as a plain dict when a record
is built is typed on the spot, so the layout lives here only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tofu_export.errors import UserError
from tofu_export.tensorrt.issues import TrtIssue

MANIFEST = "manifest.json"
TOOL = "tofu-export"
S = TypeVar("S", bound="Section")


class ManifestError(UserError):
    """A manifest that is missing, not JSON, or not written by tofu-export."""


class Section:
    """Base of the manifest's sections: typed fields, ``to_dict``/``from_dict``, nested sections typed on creation."""

    def __post_init__(self) -> None:
        for name, kind in _nested(type(self)).items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):  # a dict from JSON, or something that is not one
                setattr(self, name, kind.from_dict(value))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[S], data: Any) -> S:
        """The section from its JSON form; unknown keys (a newer writer's) are ignored, a missing one is an error."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise ManifestError(f"the manifest's {cls.__name__} section is not an object: {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        try:
            return cls(**{key: value for key, value in data.items() if key in names})
        except TypeError as error:
            raise ManifestError(f"the manifest's {cls.__name__} section lacks or mistypes a field ({error})") from error


@functools.cache
def _nested(cls: type) -> dict[str, type[Section]]:
    """Field name -> the ``Section`` type it holds (``X`` or ``X | None``), for the fields that hold one."""
    found = {}
    for name, hint in typing.get_type_hints(cls).items():
        for kind in (hint, *typing.get_args(hint)):
            if isinstance(kind, type) and issubclass(kind, Section):
                found[name] = kind
    return found


@dataclass
class InputRecord(Section):
    path: str  # the checkpoint as given
    sha256: str


@dataclass
class ArchRecord(Section):
    name: str  # timm architecture name
    kwargs: dict[str, Any]
    reason: str  # how it was inferred
    provenance: dict[str, str] = field(default_factory=dict)  # value -> where it came from (weights, config, table)


@dataclass
class PolicyRecord(Section):
    """A calibrated policy the graph was made from."""

    source: dict[str, Any]  # the calibration images ("count", "path"), the tool version and the budget
    model: dict[str, Any] | None = None  # the geometry it was measured on ("arch", "depth", ...)
    path: str | None = None
    sha256: str | None = None

    def describe(self) -> str:
        """``calibrated on 64 images from data/train`` (what the record says, in words)."""
        count = self.source.get("count", self.source.get("images"))
        where = self.source.get("path")
        return "calibrated" + (f" on {count} images" if count is not None else "") + (f" from {where}" if where else "")


@dataclass
class TofuRecord(Section):
    """The token reduction baked into the graph; ``r`` (what the plan removes) is what every command shows."""

    mode: str  # "tofu" | "tome" | "prune" | "mlerp" | "custom" | "policy"
    layer_modes: list[str]  # [depth] reduce mode per block
    r_requested: list[int]  # [depth]
    r: list[int]  # [depth] tokens each block really removes
    prop_attn: bool
    tokens: list[int]  # [depth] tokens entering each block
    policy: PolicyRecord | None = None

    @property
    def clipped(self) -> list[int]:
        """Blocks that remove fewer tokens than asked for."""
        return [i for i, (got, want) in enumerate(zip(self.r, self.r_requested, strict=True)) if got < want]


@dataclass
class GflopsRecord(Section):
    original: float
    tofu: float
    ratio: float  # original / tofu


@dataclass
class ParityRecord(Section):
    """ONNX Runtime against PyTorch on seeded random images (``exporters.parity.Parity``)."""

    batch_sizes: list[int]
    max_abs_diff: float
    output_scale: float
    images_within_tolerance: float  # fraction
    min_cosine: float
    tolerance: float
    ok: bool
    mean_abs_diff: float | None = None
    top1_agreement: float | None = None  # fraction; classifiers only
    precision: str = "fp32"  # the graph's precision; its floors are precision.PARITY_FLOORS
    ort_optimization: str = "all"  # ONNX Runtime's graph optimisation level ("basic": an INT8 graph's Q/DQ unfused)


@dataclass
class OnnxRecord(Section):
    file: str
    opset: int
    exporter: str
    simplified: bool
    input: str
    output: str
    parity: ParityRecord | None = None
    precision: str = "fp32"  # fp32 | fp16 | int8 (exporters.precision)
    simplifier: str | None = None  # onnxslim | onnxsim | none


_ISSUE_FIELDS = tuple(f.name for f in dataclasses.fields(TrtIssue))


@dataclass
class TrtCheckRecord(Section):
    """The static TensorRT check of the graph (``TrtCompatReport.record``) and the releases it was made for; ``ok``:
    every ``build_for`` release builds natively (every checked one when ``build_for`` is empty)."""

    per_target: dict[str, bool]  # release -> builds natively
    issues: list[TrtIssue]  # typed on creation (JSON holds {"severity", "target", "op_type", "node", "message"})
    targets: list[str] = field(default_factory=list)  # releases checked
    build_for: list[str] = field(default_factory=list)  # releases the export was made for
    ok: bool = True
    opset: int | None = None
    op_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.issues = [i if isinstance(i, TrtIssue) else TrtIssue(**{k: i[k] for k in _ISSUE_FIELDS})
                           for i in self.issues]
        except (KeyError, TypeError) as error:
            raise ManifestError(f"the manifest's TrtCheckRecord lists a malformed issue ({error!r})") from error

    @property
    def requested(self) -> list[str]:
        return self.build_for or self.targets


@dataclass
class OrtRecord(Section):
    file: str
    optimization: str
    provider: str


@dataclass
class EngineRecord(Section):
    """The TensorRT engine, or (``file`` None) the trtexec line that builds it on the device."""

    precision: str
    trtexec: str
    batch_range: list[int]
    file: str | None = None
    build_seconds: float | None = None


@dataclass
class Spread(Section):
    """One model's per-round latencies, in ms."""

    p50_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    rounds: int


@dataclass
class QuickLatency(Section):
    baseline: Spread
    tofu: Spread
    speedup: float  # median of the per-round ratios baseline / ToFu
    speedup_per_round: dict[str, float]  # {"p10", "p90"} of the per-round ratios
    batch: int = 1
    provider: str = "CPUExecutionProvider"
    threads: int | None = None
    order: str = "shuffled round-robin"
    load: list[float] | None = None  # the 1, 5, 15-minute load averages when timing ended
    timed_on: str = "seeded normal noise"  # engines.base.NOISE, or "the first image" of the quick look's


@dataclass
class QuickFidelity(Section):
    images: int
    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None = None
    data: str | None = None
    name: str | None = None


@dataclass
class QuickLook(Section):
    """Baseline (r = 0) against the ToFu graph on this machine (``quicklook.run_quick_look``)."""

    label: str
    machine: dict[str, Any]  # {"cpu", "cores", "cpu_features"}
    gflops: dict[str, float]  # {"baseline", "tofu"}
    baseline: dict[str, Any] = field(default_factory=dict)  # {"r": 0, "parity_max_abs_diff"}
    latency: QuickLatency | None = None
    fidelity: QuickFidelity | None = None


@dataclass
class Manifest(Section):
    input: InputRecord
    arch: ArchRecord
    tofu: TofuRecord
    img_size: list[int]  # [H, W]
    gflops: GflopsRecord
    onnx: OnnxRecord
    tensorrt_check: TrtCheckRecord
    notes: list[str] = field(default_factory=list)
    command: str = ""
    ort: OrtRecord | None = None  # the ORT-optimised model, with --target ort
    tensorrt: EngineRecord | None = None  # the engine (or the trtexec line), with --target trt
    quick_look: QuickLook | None = None
    target: str | None = None  # "onnx" | "ort" | "trt": what the export was asked for
    preprocessing: dict[str, Any] | None = None  # the input's: timm data config (input_size, mean, std, crop, ...)
    tool: str = TOOL
    # Filled in when the folder is written (artifacts.write_manifest):
    created: str | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    machine: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in a stable key order; empty optional sections are left out."""
        data = dataclasses.asdict(self)
        return {key: value for key, value in data.items() if value is not None}

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping) or data.get("tool") != TOOL:
            raise ManifestError("not a tofu-export manifest (its 'tool' field is not 'tofu-export')")
        return super().from_dict(data)

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest of an artifact folder."""
        path = Path(folder) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as error:
            raise ManifestError(f"{folder} holds no {MANIFEST}: it is not a tofu-export artifact folder") from error
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ManifestError(f"{path} cannot be read as JSON ({error})") from error
        if isinstance(data, dict) and data.get("kind") == "denoiser-step":  # `tofu-export denoiser`'s folder
            raise ManifestError(f"{folder} holds a denoiser step (tofu-export denoiser), not an image encoder's "
                                "artifact: a step is scored by calibrate-denoiser (PSNR / SSIM of the final samples) "
                                "and timed by profile on its model.onnx")
        return cls.from_dict(data)

    @classmethod
    def read_if_any(cls, folder: str | Path) -> Manifest | None:
        """The manifest of ``folder`` where it holds a readable one (a regular file: a FIFO would block), else None:
        for the commands that use a graph without one and only read what its export recorded."""
        if not (Path(folder) / MANIFEST).is_file():
            return None
        try:
            return cls.read(folder)
        except ManifestError:
            return None

    def file_sha256(self, name: str) -> str | None:
        """The recorded content hash of one of the folder's files."""
        return next((entry["sha256"] for entry in self.files if entry.get("name") == name), None)

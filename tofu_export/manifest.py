"""``manifest.json``: what an artifact folder holds and how it was made, as one typed record.

Written by the export pipeline, read back by the CLI summary, the sweep cache and reports. Sections that come
from other parts of the tool (the ONNX parity figures, the TensorRT check, the ORT artifact, quick timings) are
kept as the plain dicts those parts produce; what identifies the artifact is typed here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tofu_export.errors import UserError

MANIFEST = "manifest.json"
TOOL = "tofu-export"


class ManifestError(UserError):
    """A manifest that is missing, not JSON, or not written by tofu-export."""


@dataclass
class TofuRecord:
    """The token reduction baked into the graph."""

    mode: str  # "tofu" | "tome" | "prune" | "mlerp" | "custom" | "policy"
    layer_modes: list[str]  # [depth] reduce mode per block
    r_requested: list[int]  # [depth]
    r: list[int]  # [depth] tokens each block really removes
    prop_attn: bool
    tokens: list[int]  # [depth] tokens entering each block
    policy: dict[str, Any] | None = None  # {"path", "sha256", "source"} when a calibrated policy was used


@dataclass
class Manifest:
    input: dict[str, Any]  # {"path", "sha256"} of the checkpoint
    arch: dict[str, Any]  # {"name", "kwargs", "reason"}
    tofu: TofuRecord
    img_size: list[int]  # [H, W]
    gflops: dict[str, float]  # {"original", "tofu", "ratio"}
    onnx: dict[str, Any]  # {"file", "opset", "exporter", "simplified", "input", "output", "parity"}
    tensorrt_check: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    command: str = ""
    ort: dict[str, Any] | None = None  # the ORT-optimised model, with --target ort
    tensorrt: dict[str, Any] | None = None  # the engine (or the trtexec line), with --target trt
    quick_look: dict[str, Any] | None = None  # baseline vs ToFu figures from a short interleaved run
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
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict) or data.get("tool") != TOOL:
            raise ManifestError("not a tofu-export manifest (its 'tool' field is not 'tofu-export')")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            fields = {key: value for key, value in data.items() if key in names}
            fields["tofu"] = TofuRecord(**data["tofu"])
            return cls(**fields)
        except (KeyError, TypeError) as error:
            raise ManifestError(f"the manifest lacks or mistypes a field ({error})") from error

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
        return cls.from_dict(data)

    def file_sha256(self, name: str) -> str | None:
        """The recorded content hash of one of the folder's files."""
        return next((entry["sha256"] for entry in self.files if entry.get("name") == name), None)

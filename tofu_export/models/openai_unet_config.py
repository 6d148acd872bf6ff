"""The configuration of an OpenAI / consistency-models UNet, in the original's terms, and its JSON file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from tofu_export.errors import Hint, UserError


@dataclass(frozen=True)
class UNetConfig:
    """``attention_resolutions`` are feature-map sizes (``image_size // downsample``), as in the original's flags."""

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 32
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    channel_mult: tuple[int, ...] = (1, 2)
    num_head_channels: int = 32  # -1: use num_heads
    num_heads: int = 1
    use_scale_shift_norm: bool = True
    label: Literal["none", "class", "continuous"] = "none"
    num_classes: int = 0
    # preconditioning (ConsistencyDenoiser); "none" means the bare network (x, t, y)
    denoiser: Literal["none", "consistency"] = "none"
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    clip: bool = True

    @property
    def attention_ds(self) -> set[int]:
        return {self.image_size // res for res in self.attention_resolutions}

    def to_json(self) -> str:
        return json.dumps({"kind": "openai-unet", **asdict(self)}, indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> UNetConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read the UNet config {path}: {error}") from error
        if not isinstance(data, dict) or data.pop("kind", None) != "openai-unet":
            raise UserError(f"{path} is not an OpenAI UNet config (no \"kind\": \"openai-unet\")",
                            hint=Hint("config", None, "the config.json written beside the checkpoint"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown keys in the UNet config {path}: {', '.join(unknown)}")
        for key in ("attention_resolutions", "channel_mult"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

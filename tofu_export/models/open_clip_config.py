"""Which open_clip model config an open_clip checkpoint was trained with, and whether ToFu can patch its visual tower.

The config is named by ``--arch open_clip:NAME`` (a config open_clip ships: ``open_clip.list_models()``, read
with ``open_clip.get_model_config``, no download; or a path to a JSON file), or read from the
``open_clip_config.json`` beside the checkpoint (the Hugging Face hub layout: ``{"model_cfg": ...,
"preprocess_cfg": ...}``). The head count is the config's (``width // head_width``): the weights do not state it.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tofu_export.checkpoint_limits import CheckpointError
from tofu_export.errors import Hint

__all__ = ["CONFIG_FILE", "PREFIX", "TowerConfig", "configs_matching", "hub_config", "open_clip_module",
           "resolve_config", "timm_preprocessing"]

PREFIX = "open_clip:"
CONFIG_FILE = "open_clip_config.json"
_BLOCK_FEATURES = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")  # what image_transform reads of preprocess_cfg
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # open_clip's default
_CROP_MODES = {"shortest": "center", "squash": "squash", "longest": "border"}  # open_clip resize_mode -> timm crop_mode


@dataclass(frozen=True)
class TowerConfig:
    """The visual tower an open_clip model config describes."""

    name: str  # the config's name, or the JSON file it came from
    source: str  # where it came from, for the provenance
    embed_dim: int  # the projection's output width (the CLIP embedding)
    vision: dict[str, Any]  # open_clip's vision_cfg
    quick_gelu: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)  # mean, std, interpolation, resize_mode

    @property
    def timm_trunk(self) -> str | None:
        """The timm model the visual tower wraps (``vision_cfg.timm_model_name``), or None for open_clip's own ViT."""
        name = self.vision.get("timm_model_name")
        return str(name) if name else None

    @property
    def heads(self) -> int:
        return int(self.vision.get("width", 768)) // int(self.vision.get("head_width", 64))

    @property
    def patch_size(self) -> int:
        return int(self.vision.get("patch_size", 16))

    @property
    def image_size(self) -> int:
        size = self.vision.get("image_size", 224)
        return int(size if isinstance(size, int) else size[0])


def open_clip_module() -> Any:
    """``open_clip``, or a clear error naming the extra."""
    try:
        import open_clip
    except ImportError as error:
        raise CheckpointError("this is an open_clip checkpoint, and open_clip is not installed",
                              hint=Hint("checkpoint", None, "pip install 'tofu-export[openclip]'")) from error
    return open_clip


def timm_preprocessing(preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """open_clip's eval transform (``open_clip.image_transform``) in timm's data-config keys: the image resized to
    the model's size (``resize_mode``: the shorter side then a center crop, a squash, or the longer side then
    padding) with ``interpolation``, then ``mean`` and ``std``, each as ``preprocess`` (a ``preprocess_cfg``) states
    it, open_clip's defaults (CLIP's mean and std, bicubic, shorter side) where it does not."""
    interpolation = preprocess.get("interpolation")
    return {"mean": tuple(preprocess.get("mean", CLIP_MEAN)), "std": tuple(preprocess.get("std", CLIP_STD)),
            "crop_pct": 1.0, "crop_mode": _CROP_MODES.get(preprocess.get("resize_mode"), "center"),
            "interpolation": interpolation if interpolation in ("bicubic", "bilinear") else "bicubic"}


def _pretrained_preprocess(open_clip: Any, name: str) -> dict[str, Any]:
    """The preprocessing open_clip's pretrained weights of config ``name`` are used with, where every tag it lists
    states the same (SigLIP's: mean and std 0.5, squash); {} where none is listed or they differ."""
    stated = [{key: cfg[key] for key in _PREPROCESS_KEYS if key in cfg}
              for tag in open_clip.list_pretrained_tags_by_model(name)
              if isinstance(cfg := open_clip.get_pretrained_cfg(name, tag), dict)]
    return stated[0] if stated and all(one == stated[0] for one in stated) else {}


def config_beside(path: Path) -> Path | None:
    """``open_clip_config.json`` in the folder ``path``, or beside the file ``path``; None when there is none."""
    candidate = (path if path.is_dir() else path.parent) / CONFIG_FILE
    return candidate if candidate.is_file() else None


def _read_json(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_cfg, preprocess_cfg)`` of a hub-style config file, or of a bare model config."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not a readable open_clip config (JSON): {error}") from error
    model_cfg = data.get("model_cfg", data) if isinstance(data, dict) else None
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict):
        raise CheckpointError(f"{path} holds no open_clip model config (a JSON object with a vision_cfg)",
                              hint=Hint("arch", "open_clip:ViT-B-32", "or another config open_clip ships"))
    preprocess = data.get("preprocess_cfg", {}) if "model_cfg" in data else {}
    return model_cfg, preprocess if isinstance(preprocess, dict) else {}


def _named(name: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The config ``--arch open_clip:NAME`` names: a JSON file, or one of open_clip's own."""
    if name.endswith(".json") or Path(name).is_file():
        model_cfg, preprocess = _read_json(Path(name))
        return model_cfg, preprocess, f"config file {name} (--arch)"
    open_clip = open_clip_module()
    model_cfg = open_clip.get_model_config(name) if name in open_clip.list_models() else None
    if model_cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.5)
        said = f"; did you mean {', '.join(close)}?" if close else ""
        raise CheckpointError(f"open_clip has no model config named {name!r}{said}",
                              hint=Hint("arch", f"open_clip:{close[0] if close else 'ViT-B-32'}",
                                        "or another of open_clip.list_models(), or a config JSON file"))
    return model_cfg, _pretrained_preprocess(open_clip, name), f"open_clip model config {name} (--arch)"


def _model_config(path: Path, arch: str | None,
                  dims: Mapping[str, int] | None) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    """``(model_cfg, preprocess_cfg, name, source)`` for the checkpoint ``path``: ``arch`` first, else the config
    beside it; ``dims`` names candidates when neither says."""
    if arch:
        name = arch[len(PREFIX):] if arch.startswith(PREFIX) else arch
        model_cfg, preprocess, source = _named(name)
        return model_cfg, preprocess, name, source
    beside = config_beside(path)
    if beside is not None:
        model_cfg, preprocess = _read_json(beside)
        return model_cfg, preprocess, str(beside), f"{CONFIG_FILE} beside the checkpoint"
    found = configs_matching(dims) if dims else []
    said = f" (its shapes fit {', '.join(found[:4])})" if found else ""
    raise CheckpointError(
        f"{path} is an open_clip checkpoint; the model config it was trained with is not in the weights{said}",
        hint=Hint("arch", f"open_clip:{found[0] if found else 'ViT-B-32'}",
                  f"naming its open_clip model config, or put its {CONFIG_FILE} beside the file"))


def resolve_config(path: Path, arch: str | None, dims: Mapping[str, int] | None = None) -> TowerConfig:
    """The config for the checkpoint ``path``: ``arch`` (``open_clip:NAME``) first, else the config beside it.
    ``dims`` (what the weights show, see ``configs_matching``) names candidates when neither says."""
    model_cfg, preprocess, name, source = _model_config(path, arch, dims)
    config = TowerConfig(name=name, source=source, embed_dim=int(model_cfg.get("embed_dim", 512)),
                         vision=dict(model_cfg["vision_cfg"]), quick_gelu=bool(model_cfg.get("quick_gelu", False)),
                         preprocess={k: preprocess[k] for k in _PREPROCESS_KEYS if k in preprocess})
    _check_supported(config)
    return config


def hub_config(path: Path, arch: str | None) -> dict[str, Any]:
    """The config of the checkpoint ``path`` as ``resolve_config`` finds it (``arch`` first), whole (the text
    tower's too), as an ``open_clip_config.json`` holds it: ``{"model_cfg": ..., "preprocess_cfg": ...}``."""
    model_cfg, preprocess, _, _ = _model_config(path, arch, None)
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def _timm_trunk_problem(config: TowerConfig) -> str | None:
    """Why a tower wrapping a timm model is not that timm model alone (open_clip's ``TimmModel``: a projection or
    an attention pool after it), or None where it is (SigLIP, SigLIP2: ``timm_proj`` ``"none"``)."""
    vision, name = config.vision, config.timm_trunk
    proj, pool = vision.get("timm_proj", "linear"), vision.get("timm_pool", "avg")
    if proj in ("linear", "mlp"):
        return (f"its visual tower is the timm model {name} followed by a {proj} projection (ToFu exports the trunk "
                "alone: save model.visual.trunk.state_dict() and pass that file as a timm checkpoint)")
    if pool in ("abs_attn", "rot_attn"):
        return f"its visual tower is the timm model {name} followed by an attention pool ({pool})"
    return None


def _check_supported(config: TowerConfig) -> None:
    """Refuse towers ToFu does not patch: timm models with a head of open_clip's after them, ResNets, attention
    pools, custom attention blocks. A timm model alone is checked as a timm checkpoint (``open_clip_timm``)."""
    vision = config.vision
    problem = (_timm_trunk_problem(config) if config.timm_trunk else
               "its visual tower is a ResNet" if isinstance(vision.get("layers"), Sequence) else
               "its visual tower pools with attention (CoCa)" if vision.get("attentional_pool") else
               "its blocks are custom attention blocks (" + ", ".join(k for k in _BLOCK_FEATURES if vision.get(k)) + ")"
               if any(vision.get(k) for k in _BLOCK_FEATURES) or vision.get("block_type") == "custom" else
               f"its position embeddings are {vision['pos_embed_type']}"
               if vision.get("pos_embed_type", "learnable") != "learnable" else None)
    if problem is not None:
        raise CheckpointError(f"open_clip config {config.name}: {problem}; ToFu patches open_clip ViT towers with "
                              "standard blocks and token or average pooling, and timm ViTs alone",
                              hint=Hint("arch", None, "with a ViT config such as open_clip:ViT-B-32"))


def configs_matching(dims: Mapping[str, int]) -> list[str]:
    """open_clip's ViT configs whose tower has the weights' ``width``, ``layers``, ``patch_size``, ``tokens``
    (position rows), ``embed_dim`` (projection width; 0: none) and ``hidden`` (MLP width)."""
    open_clip = open_clip_module()
    found = []
    for name in open_clip.list_models():
        model_cfg = open_clip.get_model_config(name)
        vision = model_cfg.get("vision_cfg", {})
        if vision.get("timm_model_name") or not isinstance(vision.get("layers"), int):
            continue
        width, patch = int(vision.get("width", 768)), int(vision.get("patch_size", 16))
        size = vision.get("image_size", 224)
        height, wide = (size, size) if isinstance(size, int) else size
        seen = {"width": width, "layers": vision["layers"], "patch_size": patch,
                "tokens": (height // patch) * (wide // patch) + 1, "embed_dim": int(model_cfg.get("embed_dim", 512)),
                "hidden": int(width * float(vision.get("mlp_ratio", 4.0)))}
        if all(seen[key] == value for key, value in dims.items() if key in seen):
            found.append(name)
    return found

"""tofu-export: Token Fusion (ToFu) for pretrained Vision Transformers, exported as static-shape artifacts.

    import timm, tofu_export
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    tofu_export.patch(model, r=16)                   # ToFu with the default per-block modes
    tofu_export.patch(model, r=16, img_size=224)     # static path, ready for ONNX / TensorRT export
    print(tofu_export.token_schedule(model))         # tokens per block, GFLOPs before / after

    policy = tofu_export.Policy.load("policy.json")  # measured on your model by `tofu-export calibrate`
    tofu_export.ToFuConfig(policy=policy, img_size=224).patch(model)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.5.0"

# Imported on first use (PEP 562), so that ``tofu_export.cli`` can install its signal handlers before torch loads.
_LAZY = {
    "TokenSchedule": "accounting", "token_schedule": "accounting",
    "ExportConfig": "config", "OnnxConfig": "config", "ToFuConfig": "config", "TrtConfig": "config",
    "CheckFailed": "errors", "EngineNotBuilt": "errors", "ToFuError": "errors", "UserError": "errors",
    "LoadedModel": "models.loading", "load_model": "models.loading",
    "UnsupportedModelError": "models.family", "family_of": "models.family", "is_patched": "models.family",
    "patch": "models.family", "patched": "models.family", "unpatch": "models.family",
    "Policy": "policy",
    "MODES": "schedule", "ScheduleError": "schedule", "decreasing_schedule": "schedule", "layer_modes": "schedule",
    "parse_r": "schedule",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tofu_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tofu_export.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "MODES",
    "CheckFailed",
    "EngineNotBuilt",
    "ExportConfig",
    "LoadedModel",
    "OnnxConfig",
    "Policy",
    "ScheduleError",
    "ToFuConfig",
    "ToFuError",
    "TokenSchedule",
    "TrtConfig",
    "UnsupportedModelError",
    "UserError",
    "__version__",
    "decreasing_schedule",
    "family_of",
    "is_patched",
    "layer_modes",
    "load_model",
    "parse_r",
    "patch",
    "patched",
    "token_schedule",
    "unpatch",
]

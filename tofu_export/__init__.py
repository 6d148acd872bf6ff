"""tofu-export: Token Fusion (ToFu) for pretrained Vision Transformers, exported as static-shape artifacts.

    import timm, tofu_export
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    tofu_export.patch(model, r=16)                   # ToFu with the default per-block modes
    tofu_export.patch(model, r=16, img_size=224)     # static path, ready for ONNX / TensorRT export
    print(tofu_export.token_schedule(model))         # tokens per block, GFLOPs before / after

    policy = tofu_export.Policy.load("policy.json")  # measured on your model by `tofu-export calibrate`
    tofu_export.ToFuConfig(policy=policy, img_size=224).patch(model)
"""

from tofu_export.accounting import TokenSchedule, token_schedule
from tofu_export.config import ExportConfig, OnnxConfig, ToFuConfig, TrtConfig
from tofu_export.errors import CheckFailed, EngineNotBuilt, ToFuError, UserError
from tofu_export.models.family import UnsupportedModelError, family_of, is_patched, patch, patched, unpatch
from tofu_export.models.loading import LoadedModel, load_model
from tofu_export.policy import Policy
from tofu_export.schedule import MODES, ScheduleError, decreasing_schedule, layer_modes, parse_r

__version__ = "0.4.0"

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

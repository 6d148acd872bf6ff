"""tofu-export: Token Fusion (ToFu) for pretrained Vision Transformers, exported as static-shape artifacts.

    import timm, tofu_export
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    tofu_export.patch(model, r=16)                   # ToFu: prune early, MLERP-merge later
    tofu_export.patch(model, r=16, img_size=224)     # static path, ready for ONNX / TensorRT export
    print(tofu_export.token_schedule(model))         # tokens per block, GFLOPs before / after
"""

from tofu_export.accounting import TokenSchedule, token_schedule
from tofu_export.models.timm_vit import UnsupportedModelError, is_patched, patch, unpatch
from tofu_export.schedule import MODES, ScheduleError, decreasing_schedule, layer_modes, parse_r

__version__ = "0.3.1"

__all__ = [
    "MODES",
    "ScheduleError",
    "TokenSchedule",
    "UnsupportedModelError",
    "__version__",
    "decreasing_schedule",
    "is_patched",
    "layer_modes",
    "parse_r",
    "patch",
    "token_schedule",
    "unpatch",
]
